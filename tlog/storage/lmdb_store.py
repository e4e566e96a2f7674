"""The log on LMDB: one environment, four sub-databases, one write transaction per batch.

    entries  uint64 BE index          -> entry bytes
    tiles    uint8 level, uint64 index -> concatenated hashes (full, or the current partial tile)
    sums     uint8 level, uint64 index -> tiles.tile_summary of that tile (16 hashes per full tile)
    dedup    leaf hash (32 bytes)      -> uint64 BE index
    meta     b"size", b"checkpoint"    -> uint64 BE size, signed checkpoint note
             b"published"              -> the latest published (cosigned) checkpoint note

Storage is about each entry plus 34 bytes of tile hash and summary (plus the dedup index).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

import lmdb

from ..errors import NotFoundError, StorageFullError, TlogError
from ..integrate import BatchPlan, TreeState, state_from_tiles

DEFAULT_MAP_SIZE = 64 << 30  # address space, not disk: LMDB grows the file as it fills
_U64 = struct.Struct(">Q")
_TILE_KEY = struct.Struct(">BQ")

CommitHook = Callable[[BatchPlan], None]


class LMDBLogStore:
    """A LogStore in an LMDB environment at path (a directory, created if missing)."""

    def __init__(
        self,
        path: str,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        before_commit: CommitHook | None = None,
        after_commit: CommitHook | None = None,
    ) -> None:
        os.makedirs(path, exist_ok=True)
        # sync and metasync stay on: a commit that returned is on disk (the crash story).
        self._env = lmdb.open(path, map_size=map_size, max_dbs=5, sync=True, metasync=True, max_readers=256)
        self._entries = self._env.open_db(b"entries")
        self._tiles = self._env.open_db(b"tiles")
        self._sums = self._env.open_db(b"sums")
        self._dedup = self._env.open_db(b"dedup")
        self._meta = self._env.open_db(b"meta")
        self.before_commit = before_commit  # fault injection for tests: raise to abort the txn
        self.after_commit = after_commit  # fault injection: raise after the data is durable

    def _size(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"size", db=self._meta)
        return 0 if raw is None else _U64.unpack(raw)[0]

    def load(self) -> tuple[TreeState, bytes | None]:
        with self._env.begin() as txn:
            size = self._size(txn)
            checkpoint = txn.get(b"checkpoint", db=self._meta)

            def fetch(level: int, index: int) -> bytes:
                raw = txn.get(_TILE_KEY.pack(level, index), db=self._tiles)
                if raw is None:
                    raise NotFoundError(f"tile {level}/{index} is missing from storage")
                return bytes(raw)

            return state_from_tiles(size, fetch), checkpoint

    def commit(self, plan: BatchPlan, checkpoint: bytes) -> None:
        try:
            # All-or-nothing: entries, dedup index, tiles, size and the signed
            # checkpoint become visible together at txn commit. A crash before it
            # leaves the previous tree; after it, a restart serves the new one.
            with self._env.begin(write=True) as txn:
                if self._size(txn) != plan.old_size:
                    raise TlogError(f"stored size {self._size(txn)} is not the batch's base size {plan.old_size}")
                index = plan.old_size
                with txn.cursor(db=self._entries) as cur:
                    cur.putmulti(
                        [(_U64.pack(index + i), e) for i, e in enumerate(plan.new_entries)], append=True
                    )
                for i, h in enumerate(plan.new_leaf_hashes):
                    txn.put(h, _U64.pack(index + i), db=self._dedup)
                for (level, tile_index), data in plan.tiles.items():
                    txn.put(_TILE_KEY.pack(level, tile_index), data, db=self._tiles)
                for (level, tile_index), data in plan.summaries.items():
                    txn.put(_TILE_KEY.pack(level, tile_index), data, db=self._sums)
                txn.put(b"size", _U64.pack(plan.state.size), db=self._meta)
                txn.put(b"checkpoint", checkpoint, db=self._meta)
                if self.before_commit is not None:
                    self.before_commit(plan)
        except lmdb.MapFullError:
            raise StorageFullError("log storage is full (LMDB map size reached); nothing of this batch was written") from None
        if self.after_commit is not None:
            self.after_commit(plan)

    def publish(self, note: bytes) -> None:
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(b"published", note)

    def published(self) -> bytes | None:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"published")
        return None if raw is None else bytes(raw)

    def lookup(self, leaf_hashes: Sequence[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        with self._env.begin(db=self._dedup) as txn:
            for h in leaf_hashes:
                raw = txn.get(h)
                if raw is not None:
                    found[h] = _U64.unpack(raw)[0]
        return found

    def read_tile(self, level: int, index: int) -> bytes:
        with self._env.begin(db=self._tiles) as txn:
            raw = txn.get(_TILE_KEY.pack(level, index))
        if raw is None:
            raise NotFoundError(f"tile {level}/{index} not found")
        return bytes(raw)

    def read_summary(self, level: int, index: int) -> bytes | None:
        with self._env.begin(db=self._sums) as txn:
            raw = txn.get(_TILE_KEY.pack(level, index))
        return None if raw is None else bytes(raw)

    def read_entries(self, start: int, end: int) -> list[bytes]:
        out: list[bytes] = []
        with self._env.begin(db=self._entries) as txn, txn.cursor() as cur:
            if end > start and cur.set_key(_U64.pack(start)):
                for key, value in cur:
                    if _U64.unpack(key)[0] >= end:
                        break
                    out.append(bytes(value))
        if len(out) != end - start:
            raise NotFoundError(f"entries [{start}, {end}) not found")
        return out

    def checkpoint(self) -> bytes | None:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"checkpoint")
        return None if raw is None else bytes(raw)

    def close(self) -> None:
        self._env.close()
