"""Loops that must stop on shutdown stop, even when cancelled in the turn they are woken.

Python 3.11's asyncio.wait_for returns normally when a cancellation arrives in the event-loop turn its
inner wait completes: a sequencer's loop cancelled then ran on forever, and the cancel_all of its
running() never returned (seen as a hang of tests/test_shared_log.py after the registry's tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest
from helpers import wait_until

from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.runloop import cancel_all, wait_at_most
from tlog.sequencer import Sequencer
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.memory import MemoryLogStore
from tlog.storage.shared import SharedLogStore

KEY = Ed25519Signer.generate("example.com/runloop")
STOP_SECONDS = 30.0  # a deadline for a stop that takes one event-loop turn: reaching it is the hang


def _waiting(event: asyncio.Event) -> bool:
    return bool(event._waiters)  # a task is suspended in event.wait()


async def test_a_cancellation_in_the_turn_the_event_is_set_ends_the_wait() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_at_most(event, 3600))
    await wait_until(lambda: _waiting(event), "the task waits for the event")
    event.set()  # the inner wait completes in the next turn...
    task.cancel()  # ...and the cancellation arrives in that same turn
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_wait_at_most_returns_when_set_or_after_the_time() -> None:
    event = asyncio.Event()
    await wait_at_most(event, 0.01)  # nobody sets it: returns after the time, no error
    event.set()
    await wait_at_most(event, 3600)  # set: returns at once


async def test_cancel_all_raises_a_cancellation_of_its_caller_and_the_tasks_errors() -> None:
    started, stopping, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopping.set()
            await release.wait()  # cleaning up takes until released

    async def fails_to_stop() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None

    slow = asyncio.create_task(slow_to_stop())
    await started.wait()
    caller = asyncio.create_task(cancel_all([slow]))
    await stopping.wait()
    caller.cancel()  # the caller gives up waiting: its own cancellation, not the task's
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    await asyncio.wait([slow])
    started.clear()
    failing = asyncio.create_task(fails_to_stop())
    await started.wait()
    with pytest.raises(ValueError, match="cleanup failed"):
        await cancel_all([failing])


async def test_a_sequencer_stopped_as_its_batch_fills_stops() -> None:
    sequencer = Sequencer(Log(MemoryLogStore(), KEY), interval=3600)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(sequencer.running())
        sequencer.submit(b"an entry")
        await wait_until(lambda: _waiting(sequencer._full), "the batching loop waits for a full batch")
        sequencer._full.set()  # woken in the turn running() cancels it
        async with asyncio.timeout(STOP_SECONDS):
            await stack.aclose()


async def test_a_shared_sequencer_stopped_as_it_is_woken_stops(pg_dsn, s3_path, seaweed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    store = SharedLogStore(pg_dsn, f"s3://{s3_path}/log")
    try:
        node = SharedSequencer(Log(store, KEY), interval=3600, poll_interval=3600)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(node.running())
            await wait_until(lambda: node.leading and _waiting(node._wake), "the integration loop waits after its first round")
            node._wake.set()  # woken in the turn running() cancels it
            async with asyncio.timeout(STOP_SECONDS):
                await stack.aclose()
    finally:
        store.close()


SERVING_GC_PROBE = """
import gc, weakref
from tlog.runloop import GC_YOUNG_THRESHOLD, serving_gc

class Node:
    pass

kept = Node(); kept.self = kept  # start-up state: frozen, never collected again
gone = Node(); gone.self = gone; left = weakref.ref(gone); del gone  # start-up garbage: collected
serving_gc()
assert left() is None and gc.get_freeze_count() > 0 and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
later = Node(); later.self = later; dropped = weakref.ref(later); del later  # a cycle made while serving
gc.collect()
assert dropped() is None and kept.self is kept
print("ok")
"""


def test_a_server_process_collects_start_up_garbage_freezes_the_rest_and_still_collects_cycles_later() -> None:
    """serving_gc (wasmlog/common.py run_app calls it before serving), in a process of its own."""
    done = subprocess.run([sys.executable, "-c", SERVING_GC_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
