"""The storage interface of the log, with its durability contract.

Stores are synchronous and thread-safe for readers; exactly one writer (the
sequencer) calls commit, from a worker thread, never from the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..integrate import BatchPlan, TreeState


class LogStore(Protocol):
    def load(self) -> tuple[TreeState, bytes | None]:
        """Return the committed tree state and the latest signed checkpoint (None if empty)."""
        ...

    def commit(self, plan: BatchPlan, checkpoint: bytes) -> None:
        """Write a batch and its signed checkpoint atomically and durably.

        When commit returns, everything is on stable storage; if it raises,
        either nothing of the batch was written or (for a failure after the
        commit point) all of it was: never a part. Raises StorageFullError
        when there is no room, and TlogError if plan.old_size is not the
        stored size (a second writer: refusing it is what keeps the tree from forking).
        """
        ...

    def publish(self, note: bytes) -> None:
        """Durably record the latest published (quorum-cosigned) checkpoint note."""
        ...

    def published(self) -> bytes | None:
        """The latest published checkpoint note, or None."""
        ...

    def lookup(self, leaf_hashes: Sequence[bytes]) -> dict[bytes, int]:
        """Return the index of each leaf hash that is already logged."""
        ...

    def read_tile(self, level: int, index: int) -> bytes:
        """Return the stored hashes of a hash tile (full, or the latest partial). Raises NotFoundError."""
        ...

    def read_summary(self, level: int, index: int) -> bytes | None:
        """Return the stored tiles.tile_summary of a hash tile, or None if there is none."""
        ...

    def read_entries(self, start: int, end: int) -> list[bytes]:
        """Return entries [start, end). Raises NotFoundError if any is missing."""
        ...

    def checkpoint(self) -> bytes | None:
        """Return the latest signed checkpoint, or None before the first commit."""
        ...

    def close(self) -> None: ...
