"""The registry on PostgreSQL and S3 (SharedRegistry): several registry "nodes" on one database and bucket.

Each node has its own connections, sequencer and in-memory state, and its own HTTP server on
loopback, as separate machines would; real PostgreSQL and SeaweedFS (tests/services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

import aiohttp
import pytest
from helpers import wait_until
from registry_helpers import REGISTRY_KEY, release_envelope, with_custom_section
from test_status import ALICE, BOB, NOW, POLICY, cosigned_proof, cosigned_status

from edge.verify import VerifyError, verify_module
from registry.audit import make_auditor
from registry.audit_state import AuditState
from registry.bucket_blobs import BucketBlobStore
from registry.client import RegistryClient, RegistryError
from registry.index import IndexState
from registry.record import Action, PackageRef, decode_entry, decode_index_root, is_index_root
from registry.server import make_app
from registry.shared_service import SharedRegistry
from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier, verifier_from_vkey
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.objects import ObjectStore
from tlog.storage.shared import SharedLogStore

EMPTY_MODULE = b"\x00asm\x01\x00\x00\x00"
VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


@pytest.fixture
def nodes(pg_dsn, s3_path, seaweed, monkeypatch, aiohttp_client):  # type: ignore[no-untyped-def]
    """A factory of registry nodes on one database and bucket: each returns its RegistryClient."""
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    closers = []

    async def make(follow_interval: float | None = None) -> tuple[RegistryClient, SharedRegistry]:
        """follow_interval: how often the node takes up what others logged (default: its sequencer's poll)."""
        store = SharedLogStore(pg_dsn, f"s3://{s3_path}/reg/log")
        blobs = BucketBlobStore(f"s3://{s3_path}/reg/blobs")
        closers.extend([store.close, blobs.close])
        sequencer = SharedSequencer(Log(store, REGISTRY_KEY), interval=0.01)
        registry = SharedRegistry(sequencer=sequencer, blobs=blobs)
        if follow_interval is not None:
            registry.poll_interval = follow_interval
        client = await aiohttp_client(make_app(registry, sequencer))
        return RegistryClient(str(client.make_url("")), client.session), registry

    yield make
    for close in closers:
        with contextlib.suppress(Exception):
            close()


async def claim(api: RegistryClient, signer: Ed25519Signer, ns: str) -> int | bytes:
    """A self-grant claiming ns: its tlog-proof, or the HTTP status it was refused with."""
    try:
        return await api.act(signer, Action("key-grant", ns, key=signer.vkey, issued=int(time.time())))
    except RegistryError as e:
        return e.status


async def test_concurrent_claims_of_one_namespace_through_two_nodes_exactly_one_wins(nodes) -> None:  # type: ignore[no-untyped-def]
    (first, reg_a), (second, reg_b) = await nodes(), await nodes()
    namespaces = [f"ns{i}" for i in range(40)]
    keys = {ns: (Ed25519Signer.generate(f"{ns}-a"), Ed25519Signer.generate(f"{ns}-b")) for ns in namespaces}
    answers = await asyncio.gather(*(
        claim(api, keys[ns][k], ns) for ns in namespaces for k, api in ((0, first), (1, second))
    ))
    for i, ns in enumerate(namespaces):
        a, b = answers[2 * i : 2 * i + 2]
        won = [k for k, answer in enumerate((a, b)) if isinstance(answer, bytes)]
        assert len(won) == 1, (ns, a, b)
        assert (b if won == [0] else a) == 403  # Unauthorized: the namespace is the other key's
        winner = keys[ns][won[0]]
        proof = parse_tlog_proof(a if won == [0] else b)  # type: ignore[arg-type]
        verify_tlog_proof(proof, leaf(proof.extra), VERIFIER)  # type: ignore[arg-type]
        assert decode_entry(proof.extra).signer == winner.vkey  # type: ignore[arg-type]
        for api in (first, second):  # every node serves every read
            await wait_until(lambda ns=ns, api=api: api.namespace(ns), f"{ns} visible")  # type: ignore[misc]
            assert (await api.namespace(ns))["keys"] == [winner.vkey]
    size = reg_a.log.integrated.checkpoint.size
    entries = reg_a.log.store.read_entries(0, size)
    assert is_index_root(entries[-1])  # every checkpoint ends with an index root
    assert sum(not is_index_root(e) for e in entries) == len(namespaces)  # nothing refused was logged
    await wait_until(lambda: reg_b.log.integrated.checkpoint.size == size, "the other node at the same size")
    assert reg_a.rejected == reg_b.rejected == []
    # Each node's index as of the last root (adopted from what it computed while sequencing, or computed
    # while following) is the index of the log's records, computed here from scratch.
    await wait_until(lambda: reg_a._applied_size >= size and reg_b._applied_size >= size, "both nodes follow the log")
    naive = IndexState().with_records([(i, decode_entry(e)) for i, e in enumerate(entries[:-1]) if not is_index_root(e)], size - 1)
    for reg in (reg_a, reg_b):
        assert reg.indexer.mismatches == []
        assert reg.indexer.index.size == size - 1 and reg.indexer.index.root == naive.root


async def test_a_release_published_through_one_node_is_served_by_the_other_from_the_bucket(nodes, s3_path) -> None:  # type: ignore[no-untyped-def]
    (first, _), (second, _) = await nodes(), await nodes()
    alice = Ed25519Signer.generate("alice")
    module = with_custom_section(EMPTY_MODULE, 100_000)  # over the inline size: written from a thread
    ref = PackageRef("acme", "hello", "1.0.0")
    proof = parse_tlog_proof(await first.publish(alice, ref, module))
    verify_tlog_proof(proof, leaf(proof.extra), VERIFIER)  # type: ignore[arg-type]
    digest = hashlib.sha256(module).hexdigest()
    objects = ObjectStore(f"s3://{s3_path}/reg/blobs")
    assert objects.get(f"sha256/{digest}") == module  # in the bucket, under its digest
    path = second.package_path(ref)
    await wait_until(lambda: _published(second, path), "the release visible through the second node")
    assert await second.get(path + "/module.wasm") == module
    assert (await second.get_json(path))["index"] == proof.index
    with pytest.raises(RegistryError) as refused:  # the version is taken, whichever node is asked
        await second.publish(alice, ref, with_custom_section(EMPTY_MODULE, 10))
    assert refused.value.status == 409
    again = parse_tlog_proof(await second.publish(alice, ref, module))  # the same release again: its index
    assert again.index == proof.index


async def test_status_proofs_from_every_node_verify_and_the_audit_of_the_bucket_finds_every_index_root_correct(  # type: ignore[no-untyped-def]
        nodes, seaweed, s3_path) -> None:
    (first, reg_a), (second, reg_b) = await nodes(), await nodes()
    await first.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await second.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await wait_until(lambda: BOB.vkey in reg_a.state.namespaces["acme"].keys, "the first node to know bob's grant")
    refs = [PackageRef("acme", f"p{i}", "1.0.0") for i in range(6)]
    modules = [with_custom_section(EMPTY_MODULE, i) for i in range(len(refs))]
    await asyncio.gather(*(api.publish(BOB, ref, module) for ref, module, api in zip(refs, modules, [first, second] * 3, strict=True)))
    await second.act(ALICE, Action("yank", "acme", name="p0", version="1.0.0", issued=2, reason="CVE"))
    size = reg_b.log.integrated.checkpoint.size
    await wait_until(lambda: reg_a._applied_size >= size and reg_b._applied_size >= size, "both nodes follow the log")
    for ref, module in zip(refs, modules, strict=True):
        for api in (first, second):  # each node serves status proofs from the index it computed itself
            path = api.package_path(ref)
            status = cosigned_status(await api.get(path + "/status-proof"))
            proof = cosigned_proof(await api.get(path + "/tlog-proof"))
            if ref.name == "p0":
                with pytest.raises(VerifyError) as refused:
                    verify_module(module=module, proof=proof, policy=POLICY, now=NOW, status_proof=status)
                assert refused.value.reason == "yanked"
                continue
            verified = verify_module(module=module, proof=proof, policy=POLICY, now=NOW, status_proof=status)
            assert verified.status is not None and verified.status.as_of >= size - 1
    entries = reg_a.log.store.read_entries(0, size)
    roots = [i for i, e in enumerate(entries) if is_index_root(e)]
    assert len(roots) >= 3 and roots[-1] == size - 1  # one per sequencing transaction (three acts at least)
    assert all(decode_index_root(entries[i]).size == i for i in roots)
    assert reg_a.indexer.mismatches == reg_b.indexer.mismatches == [] and reg_a.rejected == reg_b.rejected == []
    async with aiohttp.ClientSession() as session:  # the bucket alone, over plain HTTP
        auditor = make_auditor(log_url=f"{seaweed.endpoint}/{s3_path}/reg/log", session=session,
                               verifiers=[verifier_from_vkey(REGISTRY_KEY.vkey)], state=AuditState())
        audited = await auditor.run()
    assert audited >= size and auditor.findings == []
    assert auditor.state.index.size >= roots[-1]  # the auditor recomputed the index up to the last root


async def test_a_node_that_has_not_followed_yet_never_refuses_what_another_node_just_logged(nodes) -> None:  # type: ignore[no-untyped-def]
    """Node B takes up others' records only once an hour (its follower), so its view is stale throughout:
    whatever it would refuse or not find, it looks again in the database and the bucket before saying no."""
    (first, reg_a), (second, reg_b) = await nodes(), await nodes(follow_interval=3600)
    await first.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await first.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    assert "acme" not in reg_b._sequenced_state.namespaces  # B has not seen the claim nor the grant
    old = PackageRef("acme", "hello", "1.0.0")
    module = with_custom_section(EMPTY_MODULE, 1)
    signed = release_envelope(BOB, old, module, None)
    proof = parse_tlog_proof(await second.publish_signed(BOB.vkey, signed, module))  # bob's grant, through A a moment ago: accepted
    verify_tlog_proof(proof, leaf(proof.extra), VERIFIER)  # type: ignore[arg-type]
    assert decode_entry(proof.extra).signer == BOB.vkey  # type: ignore[arg-type]
    assert (await second.namespace("acme"))["keys"] == sorted([ALICE.vkey, BOB.vkey])  # not 404  # type: ignore[index]
    new = PackageRef("acme", "hello", "1.0.1")
    newer = parse_tlog_proof(await first.publish(BOB, new, with_custom_section(EMPTY_MODULE, 2)))
    assert (await second.get_json(second.package_path(new)))["index"] == newer.index  # not 404: B looks again
    assert (await second.get_json("/api/v1/packages/acme/hello"))["versions"] == ["1.0.0", "1.0.1"]
    status = await when_published(second, second.package_path(new) + "/status-proof")  # a 503 until B's checkpoint has it, never a 404
    checked = verify_module(module=with_custom_section(EMPTY_MODULE, 2), proof=cosigned_proof(newer.encode()), policy=POLICY, now=NOW,
                            status_proof=cosigned_status(status))
    assert checked.status is not None and checked.status.as_of >= newer.index
    revoked = Ed25519Signer.generate("carol")
    await first.act(ALICE, Action("key-grant", "acme", key=revoked.vkey, issued=2))
    await second.act(ALICE, Action("key-revocation", "acme", key=revoked.vkey, issued=3))  # judged under the lock: accepted
    await second.act(BOB, Action("yank", "acme", name="hello", version="1.0.1", issued=3, reason="CVE"))
    assert revoked.vkey in (await second.namespace("acme"))["revoked"]
    with pytest.raises(RegistryError) as refused:  # what B refuses after looking again is refused for real
        await second.publish(revoked, PackageRef("acme", "hello", "2.0.0"), module)
    assert refused.value.status == 403
    again = parse_tlog_proof(await second.publish(BOB, new, with_custom_section(EMPTY_MODULE, 2)))  # a replay: its index
    assert again.index == newer.index
    assert reg_a.rejected == reg_b.rejected == []


class IntegratesFirst(SharedLogStore):
    """A store on which another node integrates what is sequenced (its full bundle's rows leave the
    database) just before this one's next read of the sequenced rows."""

    other: Log | None = None

    def sequenced(self, start: int, limit: int) -> list[bytes]:
        if self.other is not None:
            other, self.other = self.other, None
            other.integrate(other.store.sequenced(other.state.size, 4096), dedup=False)  # type: ignore[attr-defined]
        return super().sequenced(start, limit)


def test_what_others_sequenced_is_read_whole_while_integration_moves_it_to_the_bucket(pg_dsn, s3_path, seaweed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    store = IntegratesFirst(pg_dsn, f"s3://{s3_path}/reg/log")
    other = SharedLogStore(pg_dsn, f"s3://{s3_path}/reg/log")
    blobs = BucketBlobStore(f"s3://{s3_path}/reg/blobs")
    try:
        registry = SharedRegistry(sequencer=SharedSequencer(Log(store, REGISTRY_KEY)), blobs=blobs)
        entries = [b"entry %d" % i for i in range(300)]  # a full bundle (256) and a partial one
        other.sequence(entries, [leaf(e) for e in entries])
        store.other = Log(other, REGISTRY_KEY)
        assert registry._read_sequenced(0) == entries  # read again: from the bucket now
        assert store.other is None and store.committed_size() == 300
    finally:
        for close in (store.close, other.close, blobs.close):
            close()


async def when_published(api: RegistryClient, path: str) -> bytes:
    """GET path, asked again while the node answers 503 (not yet in its published checkpoint); any other refusal fails."""
    answer: list[bytes] = []

    async def answered() -> bool:
        try:
            answer.append(await api.get(path))
        except RegistryError as e:
            assert e.status == 503, e
        return bool(answer)

    await wait_until(answered, f"{path} to be served")
    return answer[0]


async def _published(api: RegistryClient, path: str) -> bool:
    try:
        await api.get_json(path)
    except RegistryError:
        return False
    return True


async def test_a_node_started_later_replays_the_bucket_and_enforces_what_it_holds(nodes) -> None:  # type: ignore[no-untyped-def]
    first, _ = await nodes()
    alice = Ed25519Signer.generate("alice")
    for v in range(3):
        await first.publish(alice, PackageRef("acme", "lib", f"1.0.{v}"), with_custom_section(EMPTY_MODULE, v))
    late, registry = await nodes()  # replays the bucket at start
    versions = await late.get_json("/api/v1/packages/acme/lib")
    assert versions["versions"] == ["1.0.0", "1.0.1", "1.0.2"]
    assert await claim(late, Ed25519Signer.generate("mallory"), "acme") == 403  # claimed through the first node
    assert registry.state.namespaces["acme"].keys == {alice.vkey}


@pytest.mark.parametrize(("args", "says"), [
    (["--data", "d", "--store", "postgresql://x/y", "--objects", "s3://b/p"], "give --data DIR, or --store"),
    (["--store", "postgresql://x/y"], "give --data DIR, or --store"),
    (["--data", "d", "--worker-of", "1"], "--worker-of is for the processes of --workers with --store"),
])
def test_registry_serve_takes_one_storage(tmp_path, args: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    key = tmp_path / "reg.key"
    key.write_text(REGISTRY_KEY.private_key + "\n")
    done = subprocess.run([sys.executable, "-m", "wasmlog", "registry", "serve", "--key", str(key), *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1 and says in done.stderr, done.stderr
