"""The log's storage engines behind one test interface, for the contract suite (tests/test_store_contract.py)
and the HTTP tests parametrised by engine: LMDB on disk, and the shared engine (PostgreSQL + S3)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.sequencer import Sequencer
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.shared import SharedLogStore


class LMDBEngine:
    name = "lmdb"

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.stores: list[Any] = []

    def open(self, **kw: Any) -> Any:
        store = LMDBLogStore(str(self.path), **kw)
        self.stores.append(store)
        return store

    def sequencer(self, log: Log, **kw: Any) -> Sequencer:
        return Sequencer(log, **kw)

    def append(self, log: Log, entries: Sequence[bytes]) -> tuple[int, ...]:
        """Log entries through the engine's own path; return their indexes."""
        return log.integrate(entries)[0]

    def close(self) -> None:
        for store in self.stores:
            store.close()


class SharedEngine(LMDBEngine):
    name = "shared"

    def __init__(self, dsn: str, objects: str) -> None:
        self.dsn, self.objects = dsn, objects
        self.stores = []

    def open(self, **kw: Any) -> Any:
        store = SharedLogStore(self.dsn, self.objects, **kw)
        self.stores.append(store)
        return store

    def sequencer(self, log: Log, **kw: Any) -> Sequencer:
        return SharedSequencer(log, **kw)

    def append(self, log: Log, entries: Sequence[bytes]) -> tuple[int, ...]:
        """Sequence (deduplicating), then integrate what is sequenced, as the integrator does."""
        store = log.store
        assert isinstance(store, SharedLogStore)
        indexes = store.sequence(entries, [leaf_hash(e) for e in entries])
        pending = store.sequenced(log.state.size, 1 << 20)
        if pending:
            log.integrate(pending, dedup=False)
        return tuple(indexes)
