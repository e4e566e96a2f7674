"""What an application (the registry) checks while entries are sequenced on shared storage (storage/shared.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ..errors import TlogError


class Admission(Protocol):
    """What an application checks while entries are sequenced, under the sequencing lock (tlog_next's row lock).

    Every process sequences, one transaction at a time across all of them: an admission sees every
    entry sequenced before the ones it judges, so two processes can never both admit conflicting entries.
    """

    def admit(self, next_index: int, sequenced_since: Callable[[int], list[bytes]], entries: Sequence[bytes]) -> list[TlogError | None]:
        """For each new entry (in order): None to sequence it (at next_index, next_index + 1, ... among
        those admitted), or the error to refuse it with. sequenced_since(i) returns every entry already
        sequenced in [i, next_index), in order. Must not keep anything until committed() is called."""
        ...

    def trailer(self, index: int) -> bytes | None:
        """After admit() admitted at least one entry: an entry of its own to sequence at index, right
        after them in the same transaction (None: none). Must not keep anything until committed()."""
        ...

    def committed(self, next_index: int) -> None:
        """The transaction that called admit() committed; next_index is the next index to assign now."""
        ...
