"""Small builders shared by tests: trees grown through the real appender into a memory store."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

import aiohttp

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


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to sockets bound to port 0 and to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago, below the kernel's ephemeral range: a port
    taken from that range could be handed, before the test binds it, to a server on port 0 or to an
    outgoing connection (a test failed so: "Address already in use")."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def front_end_pids(port: int) -> list[int]:
    """Processes running a `... front ... --listen 127.0.0.1:port` front-end (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"front" in args and f"127.0.0.1:{port}".encode() in args:
            pids.append(int(pid))
    return pids


def wait_front_ends_gone(port: int, seconds: float = 10.0) -> list[int]:
    """Wait until no front-end of port runs; return those still running after seconds."""
    deadline = time.monotonic() + seconds
    while (pids := front_end_pids(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> bytes:
    """Poll url/checkpoint until the server answers 200; return the checkpoint. Fails if proc exits."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            async with session.get(url + "/checkpoint") as r:
                if r.status == 200:
                    return await r.read()
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("server did not start")


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], what: str, seconds: float = 10.0) -> None:
    """Poll condition (a function or coroutine function) until it holds; fail naming what after seconds."""
    deadline = time.monotonic() + seconds
    while True:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {seconds}s still waiting for: {what}")
        await asyncio.sleep(0.02)
