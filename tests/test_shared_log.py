"""The log on PostgreSQL and S3 (SharedLogStore, SharedSequencer), in one process with several "nodes".

Real PostgreSQL and SeaweedFS (tests/services.py). The bucket is checked by the existing auditor
over plain HTTP from SeaweedFS's S3 endpoint (anonymous reads), and against the naive RFC 6962
reference (tests/reference.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import string
import subprocess
import sys
from collections.abc import Callable, Sequence

import aiohttp
import pytest
import reference
from helpers import wait_until
from hypothesis import given
from hypothesis import strategies as st

from registry.audit import AuditState, make_auditor
from tlog.checkpoint import parse_checkpoint
from tlog.errors import MalformedError, StorageUnavailableError, TlogError
from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.server import make_app
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.objects import ObjectStore, parse_objects_url

KEY = Ed25519Signer.generate("example.com/shared")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()




async def audit_bucket(seaweed, bucket: str) -> tuple[int, list]:  # type: ignore[no-untyped-def,type-arg]
    """Audit the bucket as a tlog-tiles log over plain HTTP; return (size, findings)."""
    async with aiohttp.ClientSession() as session:
        auditor = make_auditor(log_url=f"{seaweed.endpoint}/{bucket}/log", session=session, verifiers=[VERIFIER], state=AuditState())
        size = await auditor.run()
        report = auditor.report("bucket")
    return size, report["findings"]


async def test_three_nodes_are_one_log_and_the_bucket_is_a_tlog_tiles_log(shared, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    nodes = [SharedSequencer(Log(shared(), KEY), interval=0.01, batch_max=100) for _ in range(3)]
    entries = [b"entry %d" % i for i in range(700)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        proofs = await asyncio.gather(*(nodes[i % 3].add(e) for i, e in enumerate(entries)))
        again = await nodes[2].add(entries[5])  # a duplicate through another node: its first index
        assert sum(node.leading for node in nodes) == 1
    by_index: dict[int, bytes] = {}
    for e, proof in zip(entries, proofs, strict=True):
        tp = parse_tlog_proof(proof)
        verify_tlog_proof(tp, leaf(e), VERIFIER)
        assert tp.index not in by_index
        by_index[tp.index] = e
    assert sorted(by_index) == list(range(700))
    assert parse_tlog_proof(again).index == parse_tlog_proof(proofs[5]).index
    size, findings = await audit_bucket(seaweed, s3_path)
    assert (size, findings) == (700, [])
    note = ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
    cp = parse_checkpoint(open_note(note, [VERIFIER])[0].text)
    assert cp.root_hash == reference.mth(tuple(by_index[i] for i in range(700)))
    async with aiohttp.ClientSession() as session:  # what a CDN in front of the bucket sees
        for path, cache in [("tile/0/001", "immutable"), ("tile/entries/001", "immutable"), ("tile/0/002.p/188", "max-age=60"),
                            ("tile/entries/002.p/188", "max-age=60"), ("checkpoint", "max-age=2")]:
            async with session.get(f"{seaweed.endpoint}/{s3_path}/log/{path}") as r:
                assert r.status == 200 and cache in r.headers["Cache-Control"], (path, r.headers.get("Cache-Control"))


async def test_the_lead_passes_on_when_the_integrator_stops(shared) -> None:  # type: ignore[no-untyped-def]
    first, second = (SharedSequencer(Log(shared(), KEY), interval=0.01) for _ in range(2))
    async with second.running():
        async with first.running():
            await wait_until(lambda: first.leading or second.leading, "a leader")
            leader, other = (first, second) if first.leading else (second, first)
            await other.add(b"through the follower")
        # first stopped (and resigned if it led): second must integrate on its own now
        proof = await asyncio.wait_for(second.add(b"after the stop"), 20)
        assert second.leading
    verify_tlog_proof(parse_tlog_proof(proof), leaf(b"after the stop"), VERIFIER)


async def test_a_crash_between_the_bucket_and_the_database_is_redone_to_the_same_bytes(shared, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    crashes = []

    def crash(plan) -> None:  # type: ignore[no-untyped-def]
        if not crashes and plan.state.size >= 256:
            crashes.append(plan.state.size)
            raise RuntimeError("injected: died after writing the objects")

    node = SharedSequencer(Log(shared(before_commit=crash), KEY), interval=0.01)
    entries = [b"crash %d" % i for i in range(300)]  # one full tile and bundle, written before the crash
    async with node.running():
        proofs = await asyncio.wait_for(asyncio.gather(*(node.add(e) for e in entries)), 30)
    assert crashes  # the first commit died; the redo wrote the same immutable objects (412 and equal bytes)
    assert [parse_tlog_proof(p).index for p in proofs] == list(range(300))
    assert await audit_bucket(seaweed, s3_path) == (300, [])


def test_a_second_writer_cannot_fork_the_tree(shared) -> None:  # type: ignore[no-untyped-def]
    a, b = shared(), shared()
    log_a, log_b = Log(a, KEY), Log(b, KEY)
    a.sequence([b"one", b"two"], [leaf(b"one"), leaf(b"two")])
    log_a.integrate(a.sequenced(0, 10), dedup=False)
    with pytest.raises(TlogError, match="another process integrated"):
        log_b.integrate(b.sequenced(0, 1), dedup=False)  # a plan from the stale size 0
    assert log_b.integrated.checkpoint.size == 2  # it reloaded the truth
    with pytest.raises(TlogError, match="not the one sequenced"):
        log_b.integrate([b"never sequenced"], dedup=False)
    assert a.committed_size() == 2


def test_sequencing_is_durable_ordered_and_deduplicated(shared) -> None:  # type: ignore[no-untyped-def]
    store = shared()
    entries = [b"a", b"b", b"c"]
    assert store.sequence(entries, [leaf(e) for e in entries]) == [0, 1, 2]
    assert store.sequence([b"d", b"b"], [leaf(b"d"), leaf(b"b")]) == [3, 1]
    assert store.sequenced(1, 10) == [b"b", b"c", b"d"]
    assert store.lookup([leaf(b"b")]) == {}  # sequenced, not yet logged


async def test_a_database_outage_is_a_503_and_the_log_carries_on_after(shared, postgres, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    node = SharedSequencer(Log(shared(), KEY), interval=0.01)
    client = await aiohttp_client(make_app(node))
    assert (await client.post("/add", data=b"before")).status == 200
    await asyncio.to_thread(postgres.stop, "immediate")
    try:
        r = await client.post("/add", data=b"during")
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "database" in await r.text()
    finally:
        await asyncio.to_thread(postgres.start)

    proofs: list[bytes] = []

    async def accepted() -> bool:
        r = await client.post("/add", data=b"after")  # a stale pooled connection may cost a 503 or two
        if r.status == 200:
            proofs.append(await r.read())
        return bool(proofs)

    await wait_until(accepted, "an add after the database came back", 30)
    assert parse_tlog_proof(proofs[0]).index == 1  # "during" was refused before it was sequenced


@pytest.mark.parametrize("args,message", [
    (["--store", "postgresql://x@127.0.0.1:1/x"], "--store postgresql://... with --objects"),
    (["--data", "DATA", "--store", "postgresql://x@127.0.0.1:1/x", "--objects", "s3://bucket/p"], "give --data DIR, or"),
    (["--data", "DATA", "--worker-of", "1"], "--worker-of is for the processes of --workers with --store"),
    (["--store", "postgresql://x@127.0.0.1:1/x", "--objects", "s3:/bucket"], "want s3://BUCKET[/PREFIX]"),
    (["--store", "postgresql://nobody@127.0.0.1:1/x", "--objects", "s3://bucket/p"], "the log's database"),
])
def test_log_serve_names_what_is_wrong_with_its_storage_options(tmp_path, args: list[str], message: str) -> None:
    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    args = [str(tmp_path / "data") if a == "DATA" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "wasmlog", "log", "serve", "--key", str(key), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and message in done.stderr, done.stderr


segment = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
bucket = st.from_regex(r"[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]", fullmatch=True)


@given(bucket, st.lists(segment, max_size=5))
def test_objects_urls_round_trip(name: str, segments: list[str]) -> None:
    prefix = "/".join(segments)
    url = f"s3://{name}/{prefix}" if prefix else f"s3://{name}"
    assert parse_objects_url(url) == (name, prefix)


@given(st.text(max_size=60))
def test_objects_urls_are_parsed_strictly(text: str) -> None:
    """Anything parsed re-forms into the same URL; anything else is a MalformedError, never another error."""
    try:
        name, prefix = parse_objects_url(text)
    except MalformedError:
        return
    assert text == (f"s3://{name}/{prefix}" if prefix else f"s3://{name}")


@pytest.mark.parametrize("url", ["s3://", "s3:/b", "http://bucket/p", "s3://Bucket/p", "s3://b/p", "s3://bucket//p", "s3://bucket/p/",
                                 "s3://bucket/../p", "s3://bucket/p q", "s3://-bucket/p", "s3://bucket/" + "p" * 600])
def test_objects_urls_refused(url: str) -> None:
    with pytest.raises(MalformedError):
        parse_objects_url(url)


class CheckpointWriteFails(ObjectStore):
    """The bucket refuses the first write of the checkpoint object (after the database committed)."""

    failed = False

    def put_unless(self, path: str, body: bytes, keep: Callable[[bytes], bool]) -> bool:
        if path == "checkpoint" and not self.failed and b"\n1\n" in body:  # the checkpoint of size 1
            self.failed = True
            raise StorageUnavailableError("injected: the bucket refused the checkpoint")
        return super().put_unless(path, body, keep)


async def test_the_bucket_checkpoint_converges_after_a_failure_between_database_and_bucket(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    objects = CheckpointWriteFails(f"s3://{s3_path}/log")
    store = shared(objects=objects)
    node = SharedSequencer(Log(store, KEY), interval=0.01)
    async with node.running():
        proof = await asyncio.wait_for(node.add(b"one"), 20)  # committed; its checkpoint object failed once

        def bucket_size() -> int:
            note = ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
            return parse_checkpoint(open_note(note, [VERIFIER])[0].text).size

        await wait_until(lambda: bucket_size() == 1, "the checkpoint object of size 1", 20)
    assert objects.failed
    verify_tlog_proof(parse_tlog_proof(proof), leaf(b"one"), VERIFIER)


class Trailing:
    """An Admission that admits every entry and closes each sequencing transaction with b"T<its index>"."""

    def prepare(self) -> None:
        pass

    def admit(self, next_index: int, sequenced_since: Callable[[int], list[bytes]], entries: Sequence[bytes]) -> list[TlogError | None]:
        return [None] * len(entries)

    def trailer(self, index: int) -> bytes:
        return b"T%d" % index

    def committed(self, next_index: int) -> None:
        pass


async def test_with_a_boundary_every_batch_ends_with_the_last_trailer_sequenced(shared) -> None:  # type: ignore[no-untyped-def]
    legacy = [b"old 0", b"old 1"]
    shared().sequence(legacy, [leaf(e) for e in legacy])  # sequenced with no trailer (before boundaries): integrated whole
    batches: list[list[bytes]] = []
    nodes = [SharedSequencer(Log(shared(before_commit=lambda plan: batches.append(list(plan.new_entries))), KEY),
                             interval=0.005, batch_max=4) for _ in range(2)]
    for node in nodes:
        node.admission = Trailing()
        node.boundary = lambda entry: entry.startswith(b"T")
    entries = [b"entry %d" % i for i in range(60)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        proofs = await asyncio.wait_for(asyncio.gather(*(nodes[i % 2].add(e) for i, e in enumerate(entries))), 30)
    for e, proof in zip(entries, proofs, strict=True):
        verify_tlog_proof(parse_tlog_proof(proof), leaf(e), VERIFIER)
    store = nodes[0].store
    logged = store.read_entries(0, store.committed_size())
    trailers = [i for i, e in enumerate(logged) if e.startswith(b"T")]
    assert all(logged[i] == b"T%d" % i for i in trailers)  # each at the index it was computed for
    assert trailers[-1] == len(logged) - 1 and sorted(set(logged) - set(legacy)) == sorted(entries + [logged[i] for i in trailers])
    assert len(trailers) >= len(entries) // 4  # one per transaction, of at most batch_max entries
    batches = [b for b in batches if b]  # (a commit of no new entries: a checkpoint republished)
    assert sum(len(b) for b in batches) == len(logged) and len(batches) > 1
    # every checkpoint ends with a trailer, but those that take up entries sequenced with none (before boundaries were)
    assert all(b[-1].startswith(b"T") or b[0] in legacy for b in batches), batches
    assert all(b[-1].startswith(b"T") for b in batches[1:]), batches
