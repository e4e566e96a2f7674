"""The event loop every command runs on: uvloop when it is installed, else asyncio's own.

uvloop is faster (measured: about 5% more appends/s) but optional: it does not exist on
Windows, and nothing else in wasmlog depends on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
WORKER_THREADS = 64  # LMDB transactions and fsyncs block: many may wait on the disk at once


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # not installed: asyncio's loop does the same work, a little slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop whose default executor has room for many blocking disk calls (for servers)."""
    loop = _loop_factory()()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="wasmlog-io"))
    return loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run coro to completion on a new event loop, as asyncio.run does, and return its result."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel every task, then wait for each to end (their cancellation is expected, not raised; the
    caller's own, as from a timeout around it, is)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    current = asyncio.current_task()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling():
                raise
