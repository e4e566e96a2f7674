"""Adversarial review of the shared engine (issue 17): stale and frozen integrators, the bucket's checkpoint,
sequencing races and crashes, migration against a moved target.

Real PostgreSQL and SeaweedFS (tests/services.py). Faults are injected only at the S3 call of our own
ObjectStore (a subclass pausing before a write), never by replacing a server. Storage errors and
credentials: test_shared_review_errors.py; the registry's races: test_shared_review_registry.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from typing import Any

import pytest
from helpers import wait_until
from test_shared_log import KEY, VERIFIER, leaf

from tlog.checkpoint import parse_checkpoint
from tlog.errors import NotFoundError, StorageUnavailableError, TlogError
from tlog.log import Log
from tlog.note import parse_note
from tlog.storage.objects import ObjectStore
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TileID


def bucket_size(url: str) -> int:
    """The size of the checkpoint object in the bucket at url, read by a fresh client."""
    return parse_checkpoint(parse_note(ObjectStore(url).get("checkpoint")).text).size

class PausedCheckpointWrite(ObjectStore):
    """Pauses the first write of the checkpoint object just before it reaches the bucket (a process
    frozen, or its lead lost, between the database commit and the bucket), once armed, until released."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.armed, self.paused, self.release = threading.Event(), threading.Event(), threading.Event()

    def _call(self, what: str, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        if method == "PUT" and path == "checkpoint" and self.armed.is_set() and not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(30)
        return super()._call(what, method, path, expect, **kwargs)

def test_a_stale_integrators_checkpoint_never_replaces_a_newer_one_in_the_bucket(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """Integrator A commits size 1 in the database and stalls before its checkpoint object; B takes over and
    commits size 2 (and writes its checkpoint); then A's write lands. The bucket must not go back to 1."""
    url = f"s3://{s3_path}/log"
    objects = PausedCheckpointWrite(url)
    a, b = shared(objects=objects), shared()
    a.sequence([b"one", b"two"], [leaf(b"one"), leaf(b"two")])
    log_a = Log(a, KEY)
    objects.armed.set()
    stalled = threading.Thread(target=log_a.integrate, args=([b"one"],), kwargs={"dedup": False})
    stalled.start()
    try:
        assert objects.paused.wait(30)
        log_b = Log(b, KEY)  # takes up the committed tree of size 1
        log_b.integrate([b"two"], dedup=False)
        assert bucket_size(url) == 2
    finally:
        objects.release.set()
        stalled.join(30)
    assert bucket_size(url) == 2
    a.put_checkpoint(log_a.integrated.note)  # a stale process rewriting "its" checkpoint, as a new leader's first round does
    assert bucket_size(url) == 2

def test_a_stale_publish_never_moves_the_published_checkpoint_back(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """A witnessed log: an ex-integrator whose cosigning of size 1 finished late publishes it after
    the new integrator published size 2. The database and the bucket keep size 2."""
    a, b = shared(publish_integrated=False), shared(publish_integrated=False)
    a.sequence([b"one", b"two"], [leaf(b"one"), leaf(b"two")])
    log_a = Log(a, KEY, witnessed=True)
    log_a.integrate([b"one"], dedup=False)
    old = log_a.integrated.note
    log_a.integrate([b"two"], dedup=False)
    new = log_a.integrated.note
    b.publish(new)
    with pytest.raises(TlogError, match="smaller"):
        a.publish(old)
    assert b.published() == new and a.published() == new
    assert bucket_size(f"s3://{s3_path}/log") == 2

def test_a_full_tile_written_again_with_other_bytes_is_refused_as_a_fork(seaweed, s3_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """If-None-Match on immutable objects: the second writer (a fresh client: nothing cached) reads back and refuses."""
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_path}/log"
    tile = TileID(0, 0, 256)
    first, other = bytes(range(256)) * 32, bytes(32 * 256)
    ObjectStore(url).put_tiles([(tile, first)])
    ObjectStore(url).put_tiles([(tile, first)])  # the same bytes again: a redo, accepted
    with pytest.raises(TlogError, match="refusing to fork"):
        ObjectStore(url).put_tiles([(tile, other)])
    assert ObjectStore(url).get(tile.path()) == first

def test_one_entry_submitted_through_two_processes_at_once_gets_one_index(shared) -> None:  # type: ignore[no-untyped-def]
    """Eight threads on two stores sequence overlapping, shuffled batches of the same 300 entries."""
    stores = [shared(), shared()]
    entries = [b"dup %d" % i for i in range(300)]
    answers: list[dict[bytes, int]] = []
    failures: list[BaseException] = []

    def submit(store: SharedLogStore, seed: int) -> None:
        rng = random.Random(seed)
        got: dict[bytes, int] = {}
        try:
            for _ in range(10):
                batch = rng.sample(entries, 60)
                for e, i in zip(batch, store.sequence(batch, [leaf(e) for e in batch]), strict=True):
                    assert isinstance(i, int)
                    got[e] = i
        except BaseException as e:  # reported below
            failures.append(e)
        answers.append(got)

    threads = [threading.Thread(target=submit, args=(stores[n % 2], n)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    index: dict[bytes, int] = {}
    for got in answers:
        for e, i in got.items():
            assert index.setdefault(e, i) == i, e
    assert sorted(index.values()) == list(range(len(index)))  # no gaps, no index given twice
    stored = stores[0].sequenced(0, 1000)
    assert len(stored) == len(index) and all(stored[i] == e for e, i in index.items())

def test_a_database_restart_while_sequencing_never_answers_an_index_it_did_not_commit(shared, postgres) -> None:  # type: ignore[no-untyped-def]
    """Four threads on two stores sequence fresh entries without pause; PostgreSQL is stopped with
    `-m immediate` (a crash) under them and started again. Every index a submitter was given is that
    entry's in the database after the restart; every other submission failed as StorageUnavailable."""
    stores = [shared(), shared()]
    answered: dict[bytes, int] = {}
    failed: list[bytes] = []
    odd: list[BaseException] = []
    stop = threading.Event()

    def submit(store: SharedLogStore, n: int) -> None:
        for round_ in range(100_000):
            if stop.is_set():
                return
            batch = [b"restart %d %d %d" % (n, round_, i) for i in range(20)]
            try:
                indexes = store.sequence(batch, [leaf(e) for e in batch])
            except StorageUnavailableError:
                failed.extend(batch)
                continue
            except BaseException as e:  # reported below
                odd.append(e)
                return
            answered.update(zip(batch, indexes, strict=True))  # type: ignore[arg-type]

    threads = [threading.Thread(target=submit, args=(stores[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until_sync(lambda: len(answered) >= 200, "sequencing under way")
        postgres.stop("immediate")
        postgres.start()
        done = len(answered)
        wait_until_sync(lambda: len(answered) >= done + 200, "sequencing again after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not odd, odd
    assert failed  # the restart was felt
    for store in stores:  # this thread's connections died in the restart: the first use of each is a 503
        with contextlib.suppress(StorageUnavailableError):
            store.committed_size()
    stored = stores[0].sequenced(0, 10**6)
    assert all(stored[i] == e for e, i in answered.items())
    # a failed submission may have committed all the same (the answer to COMMIT was lost): it keeps one index
    again = stores[1].sequence(failed[:100], [leaf(e) for e in failed[:100]])
    assert len(set(again)) == len(again) and not set(again) & set(answered.values())

def wait_until_sync(ready: Any, what: str, seconds: float = 60) -> None:
    """Poll ready() until true, failing after seconds (for tests that run threads, not an event loop)."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not after {seconds}s"
        time.sleep(0.01)

@pytest.mark.parametrize("moved", [True, False])
def test_an_interrupted_migration_resumed_against_a_target_that_moved(shared, tmp_path, s3_path, moved: bool) -> None:  # type: ignore[no-untyped-def]
    """A copy into the shared engine dies after its second batch was sequenced in the target (not committed);
    before it resumes, something else sequences a foreign entry there (a half copy is never served, so only
    another copy or a hand on the database can). The resumed copy refuses the moved target; an unmoved one
    is finished, to the source's checkpoint, in the bucket too."""
    from reference import mth

    from tlog.storage.lmdb_store import LMDBLogStore
    from wasmlog.migrate import copy_log

    entries = [b"migrated %d" % i for i in range(600)]
    source = LMDBLogStore(str(tmp_path / "src"))
    try:
        Log(source, KEY).integrate(entries)

        def die_on_the_second_batch(plan: Any) -> None:
            if plan.old_size > 0:
                raise RuntimeError("killed between the bucket and the database")

        with pytest.raises(RuntimeError, match="killed"):
            copy_log(source, shared(publish_integrated=False, before_commit=die_on_the_second_batch), VERIFIER, batch=256)
        target = shared(publish_integrated=False)
        assert target.committed_size() == 256 and target.sequenced(256, 1000) == entries[256:512]
        with pytest.raises(TlogError, match="does not match the stored tree"):
            Log(target, KEY)  # a half copy is never served
        if moved:
            target.sequence([b"foreign"], [leaf(b"foreign")])
            with pytest.raises(TlogError, match="sequenced other entries"):
                copy_log(source, target, VERIFIER, batch=256)
            with pytest.raises(NotFoundError):  # nothing in the bucket claims a copy
                ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
            return
        report = copy_log(source, target, VERIFIER, batch=256)
        assert (report.size, report.copied) == (600, 344)
        note = ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
        assert note == source.checkpoint()
        assert parse_checkpoint(parse_note(note).text).root_hash == mth(tuple(entries))
    finally:
        source.close()

class Counting(ObjectStore):
    """Counts the S3 requests made."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.requests: list[str] = []

    def _call(self, what: str, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        self.requests.append(method)
        return super()._call(what, method, path, expect, **kwargs)

def test_an_integrator_replaces_its_own_checkpoint_with_one_request(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """The compare-and-swap reads the bucket only when someone else wrote the checkpoint since our last write."""
    objects = Counting(f"s3://{s3_path}/log")
    log = Log(shared(objects=objects), KEY)
    entries = [b"c%d" % i for i in range(5)]
    log.store.sequence(entries, [leaf(e) for e in entries])  # type: ignore[attr-defined]
    for e in entries:
        objects.requests.clear()
        log.integrate([e], dedup=False)
        assert objects.requests.count("GET") == 0 and objects.requests.count("PUT") == 3  # tile, bundle, checkpoint
    assert bucket_size(f"s3://{s3_path}/log") == 5

async def test_the_bucket_is_a_consistent_tlog_tiles_log_at_every_moment_of_a_two_node_load(shared, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    """An auditor reads the bucket over plain HTTP again and again while two nodes append (each read of the
    checkpoint object must find every tile and bundle it covers, and be consistent with the last one read)."""
    import aiohttp

    from registry.audit import make_auditor
    from registry.audit_state import AuditState
    from tlog.note import Ed25519Verifier
    from tlog.shared_sequencer import SharedSequencer

    nodes = [SharedSequencer(Log(shared(), KEY), interval=0.005, batch_max=50) for _ in range(2)]
    entries = [b"moment %d" % i for i in range(900)]
    state, sizes, findings = AuditState(), [], []
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        adding = asyncio.gather(*(nodes[i % 2].add(e) for i, e in enumerate(entries)))
        async with aiohttp.ClientSession() as session:
            while True:
                finished = adding.done()
                auditor = make_auditor(log_url=f"{seaweed.endpoint}/{s3_path}/log", session=session,
                                       verifiers=[Ed25519Verifier(KEY.name, KEY.public_key)], state=state)
                sizes.append(await auditor.run())
                findings += auditor.report("bucket")["findings"]
                if finished:
                    break
        await adding
    assert findings == [] and sizes[-1] == len(entries)
    assert sizes == sorted(sizes) and len(set(sizes)) > 2, sizes  # audited at several sizes on the way, never backwards

async def test_a_frozen_integrator_loses_the_lead_and_the_log_carries_on(tmp_path, pg_dsn, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the integrating `log serve` process: its kernel still answers TCP keepalives, so only the
    database ending its idle lock session frees the lead. The other process must take over and log new
    entries; once the frozen one resumes (mid-round, deposed), it follows, and the bucket audits clean."""
    import aiohttp
    from test_shared_crash import Node
    from test_shared_log import audit_bucket

    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    nodes = [Node(str(key), pg_dsn, f"s3://{s3_path}/log", seaweed.env, str(tmp_path / f"node{i}.log")) for i in range(2)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        def accepted(node: Node, entry: bytes) -> Any:
            async def post() -> bool:
                async with session.post(node.url + "/add", data=entry) as r:
                    return r.status == 200
            return post

        try:
            for node in nodes:
                node.start()
            for node in nodes:
                await wait_until(lambda node=node: node.ready(session), f"node on {node.port} to serve", 60)  # type: ignore[misc]
            await wait_until(accepted(nodes[0], b"before"), "an entry before the freeze", 30)
            healths = [await node.health(session) for node in nodes]
            frozen, other = (nodes[0], nodes[1]) if "integrating" in (healths[0] or "") else (nodes[1], nodes[0])
            assert frozen.proc is not None
            frozen.proc.send_signal(signal.SIGSTOP)
            try:
                await wait_until(accepted(other, b"while the integrator is frozen"), "the other process to take over", 90)
                assert "integrating" in (await other.health(session) or "")
            finally:
                frozen.proc.send_signal(signal.SIGCONT)
            await wait_until(accepted(frozen, b"through the thawed one"), "the thawed process to serve as a follower", 60)
            assert "following" in (await frozen.health(session) or "")

            async def converged() -> bool:  # the checkpoint object follows the database commit that answered it
                return (await audit_bucket(seaweed, s3_path))[0] == 3

            await wait_until(converged, "the bucket's checkpoint to cover all three entries", 30)
        finally:
            for node in nodes:
                node.kill()
    assert await audit_bucket(seaweed, s3_path) == (3, [])


async def test_stopping_a_node_as_its_integrator_wakes_does_not_hang(shared) -> None:  # type: ignore[no-untyped-def]
    """Python 3.11's asyncio.wait_for returns normally when a cancellation arrives as the awaited event
    completes: the integration loop, cancelled by running()'s exit just as it was woken, went on polling
    and the exit waited for it forever (seen as a rare hang at the end of multi-node tests)."""
    from tlog.shared_sequencer import SharedSequencer

    node = SharedSequencer(Log(shared(), KEY), interval=0.01, poll_interval=5.0)
    deadline = asyncio.timeout(10)  # a deadline for the hang (cancel_all swallows its cancellation: see below)
    async with deadline:
        async with node.running():
            await node.add(b"one")  # answered by the integration loop, which then waits (5 s) to be woken
            node._wake.set()  # woken (as a flush does) ...
            await asyncio.sleep(0)  # ... its wait completes, and the exit cancels it at that moment
    assert not deadline.expired()
    assert not [t for t in asyncio.all_tasks() if t.get_name() in ("integrator", "sequencer")]


async def test_stopping_the_lmdb_sequencer_as_its_batch_fills_does_not_hang(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same wait_for race in Sequencer._run (one machine): cancelled just as its pool filled up."""
    from tlog.sequencer import Sequencer
    from tlog.storage.lmdb_store import LMDBLogStore

    store = LMDBLogStore(str(tmp_path / "log"))
    try:
        node = Sequencer(Log(store, KEY), interval=5.0)
        deadline = asyncio.timeout(10)
        async with deadline:
            async with node.running():
                node.submit(b"one")  # the batching loop now waits (5 s) for a full batch
                await asyncio.sleep(0)
                node._take_batch()  # (taken away: no batch is written while the store closes)
                node._full.set()  # full (as batch_max submissions make it) ...
                await asyncio.sleep(0)  # ... its wait completes, and the exit cancels it at that moment
        assert not deadline.expired()
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "sequencer"]
    finally:
        store.close()


async def test_cancel_all_passes_on_the_callers_own_cancellation() -> None:
    """A timeout around cancel_all, waiting for a task that swallowed its first cancellation (as 3.11's
    wait_for could), must still raise: the caller's own cancellation was suppressed with the tasks' own,
    and a stop that overran its deadline looked like a clean one."""
    from tlog.runloop import cancel_all

    async def swallows_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        await asyncio.sleep(30)  # the next cancellation ends it

    task = asyncio.create_task(swallows_once())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await cancel_all([task])
    await asyncio.wait([task], timeout=10)  # cancelled once more as the caller's own cancellation went through
    assert task.cancelled()
