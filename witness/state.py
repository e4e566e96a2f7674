"""The witness's persistent state in LMDB: the latest cosigned checkpoint per origin."""

from __future__ import annotations

import os
import struct

import lmdb

from .errors import Conflict, Frozen
from .rules import EMPTY_TREE, Tree

_TREE = struct.Struct(">Q32s")


class WitnessState:
    def __init__(self, path: str, *, map_size: int = 1 << 30) -> None:
        os.makedirs(path, exist_ok=True)
        self._env = lmdb.open(path, map_size=map_size, max_dbs=4, sync=True, metasync=True)
        self._trees = self._env.open_db(b"trees")
        self._notes = self._env.open_db(b"checkpoints")
        self._evidence = self._env.open_db(b"evidence")  # uint64 BE sequence -> JSON
        self._frozen = self._env.open_db(b"frozen")  # origin -> b"" once a split view was found

    def latest(self, origin: str) -> Tree:
        with self._env.begin(db=self._trees) as txn:
            raw = txn.get(origin.encode())
        if raw is None:
            return EMPTY_TREE
        size, root = _TREE.unpack(raw)
        return Tree(size, root)

    def cosigned_checkpoint(self, origin: str) -> bytes | None:
        with self._env.begin(db=self._notes) as txn:
            raw = txn.get(origin.encode())
        return None if raw is None else bytes(raw)

    def compare_and_swap(self, origin: str, old_size: int, new: Tree, note: bytes) -> None:
        """Record new as the latest tree if the stored size is still old_size; durable on return.

        LMDB has one writer at a time, so the check and the put are atomic. Raises Conflict.
        """
        key = origin.encode()
        with self._env.begin(write=True) as txn:
            if txn.get(key, db=self._frozen) is not None:  # checked in the same txn as the update
                raise Frozen(f"split-view evidence is held for {origin}")
            raw = txn.get(key, db=self._trees)
            current = EMPTY_TREE.size if raw is None else _TREE.unpack(raw)[0]
            if current != old_size:
                raise Conflict(current)
            txn.put(key, _TREE.pack(new.size, new.root_hash), db=self._trees)
            txn.put(key, note, db=self._notes)

    def add_evidence(self, origin: str, record: bytes) -> None:
        """Persist split-view evidence and freeze the origin, in one transaction."""
        with self._env.begin(write=True) as txn:
            n = txn.stat(self._evidence)["entries"]
            txn.put(struct.pack(">Q", n), record, db=self._evidence)
            txn.put(origin.encode(), b"", db=self._frozen)

    def evidence(self) -> list[bytes]:
        with self._env.begin(db=self._evidence) as txn:
            return [bytes(v) for _, v in txn.cursor()]

    def is_frozen(self, origin: str) -> bool:
        with self._env.begin(db=self._frozen) as txn:
            return txn.get(origin.encode()) is not None

    def close(self) -> None:
        self._env.close()
