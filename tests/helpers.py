"""Small builders shared by tests: trees grown through the real appender into a memory store."""

from __future__ import annotations

import socket

from tlog.integrate import TreeState, plan_batch
from tlog.storage.memory import MemoryLogStore
from tlog.tiles import TileNodeReader


def grow(entries: list[bytes], batch: int = 97) -> tuple[MemoryLogStore, TreeState]:
    """Append entries in batches through plan_batch into a MemoryLogStore; return it and the final state."""
    store = MemoryLogStore()
    state = TreeState(0)
    for i in range(0, len(entries), batch):
        plan = plan_batch(state, entries[i : i + batch], store.lookup_one)
        store.commit(plan, b"checkpoint %d\n" % plan.state.size)
        state = plan.state
    return store, state


def reader(store: MemoryLogStore, *, summaries: bool = False) -> TileNodeReader:
    """A reader over the store's tiles; with summaries, cold tiles are read through their stored summaries."""
    return TileNodeReader(store.read_tile, cache_tiles=16, summary=store.read_summary if summaries else None)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
