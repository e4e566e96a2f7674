"""Blob files: group-synced writes, torn-file repair, and the GroupSync contract."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import threading

import pytest

from registry.blobs import BlobStore
from registry.groupsync import GroupSync


def test_write_then_get_round_trips_and_is_idempotent(tmp_path: pathlib.Path) -> None:
    blobs = BlobStore(str(tmp_path))
    digest = blobs.write(b"module bytes")
    assert digest == hashlib.sha256(b"module bytes").hexdigest()
    assert blobs.write(b"module bytes") == digest
    blobs.sync()
    assert blobs.get(digest) == b"module bytes"
    assert not [n for n in os.listdir(blobs.dir) if n.startswith(".tmp-")]  # no temporary files left


@pytest.mark.parametrize("method", ["write", "put"])
@pytest.mark.parametrize("torn", [b"", b"module by", b"something else entirely"])
def test_a_torn_blob_left_by_a_crash_is_rewritten(tmp_path: pathlib.Path, method: str, torn: bytes) -> None:
    """A crash between write() and sync() may leave the digest's name with other content."""
    blobs = BlobStore(str(tmp_path))
    digest = hashlib.sha256(b"module bytes").hexdigest()
    (pathlib.Path(blobs.dir) / digest).write_bytes(torn)
    assert getattr(blobs, method)(b"module bytes") == digest
    assert blobs.get(digest) == b"module bytes"


async def test_group_sync_covers_each_waiter_with_a_sync_started_after_it() -> None:
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def slow_sync() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            started.set()
            release.wait(5)

    group = GroupSync(slow_sync)
    first = asyncio.create_task(group.wait())
    await asyncio.to_thread(started.wait, 5)  # sync 1 is running
    late = [asyncio.create_task(group.wait()) for _ in range(20)]  # arrive during sync 1
    await asyncio.sleep(0.05)
    assert not first.done() and not any(t.done() for t in late)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *late), 5)
    assert calls == [0, 1]  # the 20 late waiters shared one sync, the second
    assert group.rounds == 2


async def test_group_sync_failure_reaches_every_waiter_of_that_round_only() -> None:
    outcomes = iter([OSError("disk gone"), None])

    def flaky_sync() -> None:
        err = next(outcomes)
        if err is not None:
            raise err

    group = GroupSync(flaky_sync)
    results = await asyncio.gather(*(group.wait() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    await asyncio.wait_for(group.wait(), 5)  # the next round syncs again
