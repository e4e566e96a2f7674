"""A dict-backed LogStore for tests, with fault hooks and checks against misuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import NotFoundError, TlogError
from ..integrate import BatchPlan, TreeState, state_from_tiles
from ..tiles import FULL_TILE_BYTES

CommitHook = Callable[[BatchPlan], None]


class MemoryLogStore:
    """Everything in dicts; commit applies a plan all at once or not at all."""

    def __init__(self, *, before_commit: CommitHook | None = None, after_commit: CommitHook | None = None) -> None:
        self.entries: dict[int, bytes] = {}
        self.tiles: dict[tuple[int, int], bytes] = {}
        self.summaries: dict[tuple[int, int], bytes] = {}
        self.dedup: dict[bytes, int] = {}
        self.size = 0
        self._checkpoint: bytes | None = None
        self._published: bytes | None = None
        self.before_commit = before_commit
        self.after_commit = after_commit

    def load(self) -> tuple[TreeState, bytes | None]:
        return state_from_tiles(self.size, self.read_tile), self._checkpoint

    def commit(self, plan: BatchPlan, checkpoint: bytes) -> None:
        if plan.old_size != self.size:
            raise TlogError(f"stored size {self.size} is not the batch's base size {plan.old_size}")
        for key, data in plan.tiles.items():
            old = self.tiles.get(key)
            # A tile only grows, and a full tile never changes: a store that saw
            # otherwise is being fed a fork.
            if old is not None and (len(old) == FULL_TILE_BYTES or not data.startswith(old)):
                raise AssertionError(f"immutable tile {key} was modified")
        if self.before_commit is not None:
            self.before_commit(plan)
        for i, e in enumerate(plan.new_entries):
            self.entries[plan.old_size + i] = e
        for i, h in enumerate(plan.new_leaf_hashes):
            self.dedup[h] = plan.old_size + i
        self.tiles.update(plan.tiles)
        self.summaries.update(plan.summaries)
        self.size = plan.state.size
        self._checkpoint = checkpoint
        if self.after_commit is not None:
            self.after_commit(plan)

    def publish(self, note: bytes) -> None:
        self._published = note

    def published(self) -> bytes | None:
        return self._published

    def lookup(self, leaf_hashes: Sequence[bytes]) -> dict[bytes, int]:
        return {h: self.dedup[h] for h in leaf_hashes if h in self.dedup}

    def lookup_one(self, leaf_hash: bytes) -> int | None:
        return self.dedup.get(leaf_hash)

    def read_tile(self, level: int, index: int) -> bytes:
        try:
            return self.tiles[(level, index)]
        except KeyError:
            raise NotFoundError(f"tile {level}/{index} not found") from None

    def read_summary(self, level: int, index: int) -> bytes | None:
        return self.summaries.get((level, index))

    def read_entries(self, start: int, end: int) -> list[bytes]:
        try:
            return [self.entries[i] for i in range(start, end)]
        except KeyError:
            raise NotFoundError(f"entries [{start}, {end}) not found") from None

    def checkpoint(self) -> bytes | None:
        return self._checkpoint

    def close(self) -> None:
        pass
