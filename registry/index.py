"""The verifiable index over a registry's log (spec/status-proof.md). Pure.

Every log entry that decodes as a namespace record (valid or void: the index does not judge,
the verifier replays the rules) is listed under the keys index_keys gives it; the map
(registry/index_map.py) takes each key to the hash of its history: the complete list of
(log index, record type) of that key's records, in index order. Index-root records and
entries that do not decode are in no key's history.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .index_map import MapProof, SparseMap, key_hash
from .record import RECORD_TYPES, Action, Record, Release

TYPE_CODES = {t: i for i, t in enumerate(RECORD_TYPES)}  # release 0, key-grant 1, key-revocation 2, yank 3
History = tuple[tuple[int, int], ...]  # (log index, TYPE_CODES[type]) in index order
_HISTORY_PREFIX = b"wasmlog-index-history\x00"


def index_keys(record: Record) -> tuple[str]:
    """The key a record is listed under: its namespace for key grants and revocations,
    `namespace:name` for releases and yanks."""
    body = record.body
    if isinstance(body, Release):
        return (f"{body.ref.namespace}:{body.ref.name}",)
    assert isinstance(body, Action)
    if body.action == "yank":
        return (f"{body.namespace}:{body.name}",)
    return (body.namespace,)


def history_hash(history: Sequence[tuple[int, int]]) -> bytes:
    """The value hash of a history: SHA-256 over its items packed flat (a C-speed pack, one hash):

        "wasmlog-index-history" 0x00 || uint64_be(n) || n x uint64_be(index) || n x uint8(type)
    """
    n = len(history)
    indexes, codes = zip(*history, strict=True) if n else ((), ())
    return hashlib.sha256(_HISTORY_PREFIX + struct.pack(f">Q{n}Q", n, *indexes) + bytes(codes)).digest()


@dataclass(frozen=True)
class IndexState:
    """The index as of the log's first `size` entries: the map from each key's hash to its history's
    hash, each leaf carrying (key, history) (one structure the garbage collector stops tracking)."""

    size: int = 0
    map: SparseMap = field(default_factory=SparseMap)

    @property
    def root(self) -> bytes:
        return self.map.root

    def with_records(self, records: Iterable[tuple[int, Record | None]], size: int) -> IndexState:
        """The index after these (index, record) pairs (None: an entry in no history), in index
        order, all at or above self.size and below size; self never changes."""
        added: dict[str, list[tuple[int, int]]] = {}
        for index, record in records:
            assert self.size <= index < size, (index, self.size, size)
            if record is not None:
                for key in index_keys(record):
                    added.setdefault(key, []).append((index, TYPE_CODES[record.type]))
        tree = self.map
        updates = []
        for key, items in added.items():  # each key's path is hashed once per call, however many records it got
            kh = key_hash(key)
            old = tree.payload(kh)
            history = (() if old is None else old[1]) + tuple(items)
            updates.append((kh, history_hash(history), (key, history)))
        return IndexState(size, tree.set_many(updates))  # and each node once, however many keys' paths cross it

    def history(self, key: str) -> History:
        entry: tuple[str, History] | None = self.map.payload(key_hash(key))
        return () if entry is None else entry[1]

    @functools.cached_property
    def histories(self) -> dict[str, History]:
        """Every key's history (a walk of the map: computed once per state)."""
        return dict(self.map.payloads())

    def changed(self, since: IndexState | None) -> Iterator[tuple[str, History]]:
        """(key, history) of every key whose history is new or longer since that state (every key: since None)."""
        return self.map.payloads(None if since is None else since.map)

    def prove(self, key: str) -> MapProof:
        return self.map.prove(key_hash(key))

    @classmethod
    def from_histories(cls, size: int, histories: dict[str, History]) -> IndexState:
        """The index with these complete histories as of size (a saved audit state)."""
        return cls(size, SparseMap.build(((key_hash(k), history_hash(h)) for k, h in histories.items()), histories.items()))
