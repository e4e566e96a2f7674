"""The event loop every command runs on: uvloop when it is installed, else asyncio's own; and the
garbage collector's settings for a server process (serving_gc).

uvloop is faster (measured: about 5% more appends/s) but optional: it does not exist on
Windows, and nothing else in wasmlog depends on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
WORKER_THREADS = 64  # LMDB transactions and fsyncs block: many may wait on the disk at once


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # not installed: asyncio's loop does the same work, a little slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# Python's default (700 container allocations between young collections) had the registry's servers
# spend 17-27% of their CPU in the collector under load (bench/publish.py --store local, measured
# with gc.callbacks): objects alive across a few requests were copied up to the old generation and
# its full collections walked the whole heap. At 50,000 it spent 1.5-6%, each young collection
# ~20 ms, and no full collection in the run.
GC_YOUNG_THRESHOLD = 50_000


def serving_gc() -> None:
    """Set up the cyclic garbage collector of a server process, once start-up is done (the modules,
    clients and replayed state it made live as long as the process): collect what start-up left,
    freeze what it keeps (no later collection walks it again), and collect the young generation
    every GC_YOUNG_THRESHOLD allocations. Memory is still freed by reference counting at once;
    only garbage in reference cycles waits longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


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
    """Cancel every task, then wait for each to end; raise the first error one ended with other than
    its cancellation. A cancellation of the caller while it waits is raised, not taken for theirs
    (the tasks still running are cancelled once more: one may have swallowed the first)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:  # the caller's own (a timeout around it): ask them once more, and go
            for task in tasks:
                task.cancel()
            raise
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error


async def wait_at_most(event: asyncio.Event, seconds: float) -> None:
    """Wait until event is set or seconds have passed, whichever comes first.

    asyncio.timeout, not asyncio.wait_for: Python 3.11's wait_for swallows a cancellation that arrives
    in the turn the inner wait completes (it returns as if not cancelled), so a loop cancelled at
    shutdown just as it was woken ran on forever and its cancel_all never returned."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


class FreshRead(Generic[T]):
    """Concurrent callers of an async read share one run of it that began after each of them called:
    a flood of callers costs one read at a time, and none is answered from a read older than its call."""

    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._lock = asyncio.Lock()
        self._begun = 0  # reads begun
        self._last: tuple[int, T] | None = None  # the number of the last read completed, and its value

    async def __call__(self) -> T:
        asked = self._begun
        async with self._lock:
            if self._last is None or self._last[0] <= asked:  # no read begun since this call: read now
                self._begun += 1
                begun = self._begun
                self._last = (begun, await self._read())
            return self._last[1]
