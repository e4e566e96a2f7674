"""Status proofs end to end: a real registry over loopback HTTP serves them, the edge verifier decides
from them, and every tamper of spec/status-proof.md gets its own reason."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from registry_helpers import REGISTRY_KEY, release_envelope, start_registry, wat_module
from test_up import free_ports

from edge.verify import TrustPolicy, VerifyError, parse_trust_policy, verify_module
from edge.verify_cli import status_proof_of
from registry.audit import make_auditor
from registry.audit_state import AuditState
from registry.blobs import BlobStore
from registry.client import RegistryClient
from registry.dsse import ACTION_PAYLOAD_TYPE, parse_envelope, sign_envelope
from registry.index import IndexState
from registry.record import Action, IndexRoot, PackageRef, decode_entry, decode_index_root, is_index_root, record_for
from registry.server import make_app
from registry.service import Registry
from registry.status_proof import Included, StatusProof, build_status_proof, parse_status_proof
from tlog.cosignature import cosign
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, parse_note, verifier_from_vkey
from tlog.proof_file import TlogProof, parse_tlog_proof
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.memory import MemoryLogStore
from wasmlog.network import NetworkConfig, run_network

WITNESSES = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]
OTHER_LOG = Ed25519Signer.generate("other.example/log")
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
CAROL = Ed25519Signer.generate("carol")
REF = PackageRef("acme", "hello", "1.0.0")
NOW = 1_900_000_000


def policy_toml(extra: str = "") -> str:
    witnesses = "\n".join(f"witness W{i} {w.vkey}" for i, w in enumerate(WITNESSES))
    return f'''require_status = true
{extra}
tlog_policy = """
log {REGISTRY_KEY.vkey}
log {OTHER_LOG.vkey}
{witnesses}
group g 2 W0 W1 W2
quorum g
"""
'''


POLICY = parse_trust_policy(policy_toml())


def cosigned(note: bytes, at: int = NOW - 60, witnesses: int = 3) -> bytes:
    """note with cosignatures by the first `witnesses` witnesses, timestamped at."""
    text = parse_note(note).text
    return note + b"".join(cosign(w, text, at).line().encode() for w in WITNESSES[:witnesses])


def cosigned_proof(proof: bytes, at: int = NOW - 60) -> bytes:
    tp = parse_tlog_proof(proof)
    return TlogProof(tp.index, tp.proof, cosigned(tp.checkpoint, at), tp.extra).encode()


def cosigned_status(data: bytes, at: int = NOW - 60, witnesses: int = 3) -> StatusProof:
    sp = parse_status_proof(data)
    return dataclasses.replace(sp, checkpoint=cosigned(sp.checkpoint, at, witnesses))


async def fetch(api: RegistryClient, ref: PackageRef = REF) -> tuple[bytes, StatusProof]:
    path = api.package_path(ref)
    return cosigned_proof(await api.get(path + "/tlog-proof")), cosigned_status(await api.get(path + "/status-proof"))


def check(module: bytes, proof: bytes, status: bytes | StatusProof | None, policy: TrustPolicy = POLICY, now: int = NOW):  # type: ignore[no-untyped-def]
    return verify_module(module=module, proof=proof, policy=policy, now=now, status_proof=status)


def reason(module: bytes, proof: bytes, status: bytes | StatusProof | None, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(VerifyError) as e:
        check(module, proof, status, **kw)
    return e.value.reason


async def published(aiohttp_client: Any, tmp_path: pathlib.Path) -> tuple[RegistryClient, Registry, bytes]:
    """A registry where alice claimed acme, granted bob, and bob published acme:hello@1.0.0."""
    api, client, registry, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await api.publish(BOB, REF, module)
    return api, registry, module


async def test_every_checkpoint_ends_with_an_index_root_that_matches_the_log(aiohttp_client, tmp_path) -> None:
    api, registry, module = await published(aiohttp_client, tmp_path)
    size = registry.log.published.checkpoint.size
    entries = registry.log.store.read_entries(0, size)
    roots = [i for i, e in enumerate(entries) if is_index_root(e)]
    assert roots and roots[-1] == size - 1  # one per batch, the last entry of every checkpoint
    for i in roots:
        root = decode_index_root(entries[i])
        assert root.size == i and root.origin == REGISTRY_KEY.name
    assert not registry.rejected and not registry.indexer.mismatches  # index roots are not void records
    proof, status = await fetch(api)
    verified = check(module, proof, status)
    assert verified.status is not None and verified.status.as_of == size - 1 and verified.status.time == NOW - 60


async def test_yank_and_revocation_decided_from_the_status_proof(aiohttp_client, tmp_path) -> None:
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof, before = await fetch(api)
    await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=2))  # after the release: still valid
    _, revoked_after = await fetch(api)
    check(module, proof, revoked_after)
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    _, yanked = await fetch(api)
    with pytest.raises(VerifyError) as e:
        check(module, proof, yanked)
    assert e.value.reason == "yanked" and f"at index {registry.release(REF).yanked_at}" in str(e.value)
    # The status proof from before the yank is accepted only while younger than max_status_age.
    check(module, proof, before, now=NOW - 60 + POLICY.max_status_age)
    assert reason(module, proof, before, now=NOW - 60 + POLICY.max_status_age + 1) == "status-stale"


async def test_a_release_signed_by_a_revoked_key_is_refused(aiohttp_client, tmp_path) -> None:
    api, registry, module = await published(aiohttp_client, tmp_path)
    await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=2))
    # A compromised registry logs bob's release after his revocation (its rules make it void; it is
    # appended straight to the sequencer here, as such a registry would): the status proof shows it.
    other = PackageRef("acme", "hello", "2.0.0")
    entry = record_for("release", BOB.vkey, parse_envelope(release_envelope(BOB, other, module, None))).encode()
    registry.sequencer.submit(entry)
    await registry.sequencer.flush()
    index = registry.log.store.lookup([leaf_hash(entry)])[leaf_hash(entry)]
    assert [i for i, _ in registry.rejected] == [index]
    size = registry.log.published.checkpoint.size
    proof = TlogProof(index, tuple(registry.log.inclusion_proof(index, size)), cosigned(registry.log.published.note), entry).encode()
    status = cosigned_status(registry.indexer.status_proof("acme", "hello", index))
    with pytest.raises(VerifyError) as e:
        check(module, proof, status)
    assert e.value.reason == "key-revoked" and "revoked at index" in str(e.value)


async def other_log_registry(aiohttp_client: Any, tmp_path: pathlib.Path) -> RegistryClient:
    """A second registry, with its own log key and origin."""
    store = LMDBLogStore(str(tmp_path / "other-log"))
    seq = Sequencer(Log(store, OTHER_LOG), interval=0.005)
    registry = Registry(sequencer=seq, blobs=BlobStore(str(tmp_path / "other-blobs")))
    client = await aiohttp_client(make_app(registry, seq))
    return RegistryClient(str(client.make_url("")), client.session)


async def test_every_tamper_gets_its_own_reason(aiohttp_client, tmp_path) -> None:
    api, registry, module = await published(aiohttp_client, tmp_path)
    await api.act(BOB, Action("key-grant", "other", key=BOB.vkey, issued=1))  # another namespace
    await api.act(BOB, Action("key-grant", "other", key=CAROL.vkey, issued=1))
    await api.act(BOB, Action("key-revocation", "other", key=CAROL.vkey, issued=2))
    await api.publish(ALICE, PackageRef("acme", "tool", "1.0.0"), module)  # another package
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=1))
    await api.act(ALICE, Action("key-revocation", "acme", key=CAROL.vkey, issued=2))  # carol never signed hello
    await api.publish(ALICE, PackageRef("acme", "hello", "0.9.0"), module)
    await api.act(ALICE, Action("yank", "acme", name="hello", version="0.9.0", issued=3, reason="old"))  # another version
    proof, good = await fetch(api)
    old_root_index = good.root.index
    check(module, proof, good)
    assert [decode_entry(r.entry).type for r in good.records] == ["key-revocation", "yank"]
    assert reason(module, proof, None) == "status-missing"
    # a record removed from the list
    assert reason(module, proof, dataclasses.replace(good, records=good.records[1:])) == "status-incomplete"
    # a record from another namespace, with its own valid inclusion proof
    _, other_ns = await fetch_other(api, PackageRef("other", "x", "1.0.0"), module)
    assert [decode_entry(r.entry).namespace for r in other_ns.records] == ["other"]
    foreign = sorted([*good.records, *other_ns.records], key=lambda r: r.index)
    assert reason(module, proof, dataclasses.replace(good, records=tuple(foreign))) == "status-foreign-record"
    # a record whose inclusion proof is broken
    broken = dataclasses.replace(good.records[0], proof=(bytes(32), *good.records[0].proof[1:]))
    assert reason(module, proof, dataclasses.replace(good, records=(broken, *good.records[1:]))) == "status-inclusion"
    # a map proof for another key: under its own name, then relabelled as this package's
    _, tool = await fetch(api, PackageRef("acme", "tool", "1.0.0"))
    assert reason(module, proof, dataclasses.replace(good, package=tool.package)) == "status-wrong-key"
    relabelled = dataclasses.replace(tool.package, key="acme:hello")
    assert reason(module, proof, dataclasses.replace(good, package=relabelled)) == "status-map-proof"
    # a history with an item left out (its record too): the map proof no longer leads to the root
    shorter = dataclasses.replace(good.namespace, history=good.namespace.history[1:])
    assert reason(module, proof, dataclasses.replace(good, namespace=shorter)) == "status-map-proof"
    # a checkpoint cosigned by too few witnesses
    bare = parse_status_proof(await api.get(api.package_path(REF) + "/status-proof"))
    assert reason(module, proof, dataclasses.replace(bare, checkpoint=cosigned(bare.checkpoint, witnesses=1))) == "status-quorum"
    # an older index root shown against a newer checkpoint (a registry hiding what came after it)
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    _, newer = await fetch(api)
    size = registry.log.published.checkpoint.size
    stale_root = dataclasses.replace(good.root, proof=tuple(registry.log.inclusion_proof(old_root_index, size)))
    assert reason(module, proof, dataclasses.replace(good, checkpoint=newer.checkpoint, root=stale_root,
                                                     records=tuple(dataclasses.replace(r, proof=tuple(registry.log.inclusion_proof(r.index, size)))
                                                                   for r in good.records))) == "status-root-invalid"
    # an index root from another log
    other_api = await other_log_registry(aiohttp_client, tmp_path)
    await other_api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await other_api.publish(ALICE, REF, module)
    _, from_other_log = await fetch(other_api)
    assert reason(module, proof, from_other_log) == "status-other-log"
    # bytes that are not a status proof
    with pytest.raises(VerifyError) as e:
        verify_module(module=module, proof=proof, policy=POLICY, now=NOW, status_proof=good.encode() + b"\x00")
    assert e.value.reason == "status-malformed" and e.value.unusable_input


async def fetch_other(api: RegistryClient, ref: PackageRef, module: bytes) -> tuple[bytes, StatusProof]:
    """Publish ref (bob holds its namespace) and fetch its proofs."""
    await api.publish(BOB, ref, module)
    return await fetch(api, ref)


async def run_wasmlog(*args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "wasmlog", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    return p.returncode or 0, out.decode() + err.decode()


async def test_fetch_writes_the_status_proof_and_verify_reads_it_beside_the_module(aiohttp_client, tmp_path) -> None:
    api, _, module = await published(aiohttp_client, tmp_path)
    code, out = await run_wasmlog("fetch", "--registry", api.url, "--out", str(tmp_path / "got"), str(REF))
    assert code == 0, out
    wasm = tmp_path / "got" / "acme_hello_1.0.0.wasm"
    status_file = wasm.with_name(wasm.name + ".status-proof")
    assert wasm.read_bytes() == module and status_file.exists()
    # This test registry has no witnesses: its checkpoints are cosigned here, as witnesses would.
    proof_file = wasm.with_name(wasm.name + ".tlog-proof")
    proof_file.write_bytes(cosigned_proof(proof_file.read_bytes()))
    status_file.write_bytes(cosigned_status(status_file.read_bytes()).encode())
    (tmp_path / "policy.toml").write_text(policy_toml("max_status_age = 600"))
    verify = ("verify", "--policy", str(tmp_path / "policy.toml"), "--json")
    code, out = await run_wasmlog(*verify, "--now", str(NOW), str(wasm))
    assert code == 0 and json.loads(out)["status"]["cosigned"] == NOW - 60, out
    code, out = await run_wasmlog(*verify, "--now", str(NOW + 600), str(wasm))
    assert code == 1 and json.loads(out)["reason"] == "status-stale", out
    # --status names another file; without any, require_status refuses
    moved = tmp_path / "elsewhere.status-proof"
    status_file.rename(moved)
    code, out = await run_wasmlog(*verify, "--now", str(NOW), str(wasm))
    assert code == 1 and json.loads(out)["reason"] == "status-missing", out
    code, out = await run_wasmlog(*verify, "--now", str(NOW), "--status", str(moved), str(wasm))
    assert code == 0, out
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    moved.write_bytes(cosigned_status(await api.get(api.package_path(REF) + "/status-proof")).encode())
    code, out = await run_wasmlog(*verify, "--now", str(NOW), "--status", str(moved), str(wasm))
    assert code == 1 and json.loads(out)["reason"] == "yanked", out


async def test_a_registry_that_withholds_a_yank_from_its_index_is_named_by_the_audit(aiohttp_client, tmp_path) -> None:
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof, _ = await fetch(api)
    honest = registry.log.trailer
    assert honest is not None

    def withholding(plan):  # type: ignore[no-untyped-def]
        """This registry indexes its batches as if their yanks were not there."""
        hidden = [b"withheld" if decode_entry(e).type == "yank" else e for e in plan.new_entries]
        return honest(dataclasses.replace(plan, new_entries=tuple(hidden), new_leaf_hashes=tuple(map(leaf_hash, hidden))))

    registry.log.trailer = withholding
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    yank_index = registry.release(REF).yanked_at
    _, lying = await fetch(api)
    check(module, proof, lying)  # the edge cannot tell from the status proof alone...
    root_index = lying.root.index
    auditor = make_auditor(log_url=api.url + "/log", session=api.session, verifiers=[verifier_from_vkey(REGISTRY_KEY.vkey)], state=AuditState())
    await auditor.run()  # ...the audit names the index root that leaves the yank out
    assert [(f.kind, f.where) for f in auditor.findings] == [("index-root-mismatch", f"index {root_index} (index-root record)")]
    assert yank_index == root_index - 1


async def test_status_proofs_on_a_witnessed_network(tmp_path) -> None:
    """`wasmlog up` (three witnesses, a quorum of two): every checkpoint the witnesses cosign ends with an
    index root, so the registry serves status proofs that verify offline under the network's own trust
    policy with require_status, and show the yank once it lands."""
    port = free_ports(4)
    ready, stop = asyncio.Event(), asyncio.Event()
    network = asyncio.create_task(run_network(NetworkConfig(data=tmp_path / "net", port=port), ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        policy_text = (tmp_path / "net" / "trust-policy.toml").read_text()
        policy = parse_trust_policy("require_status = true\n" + policy_text)
        async with aiohttp.ClientSession() as s:
            api = RegistryClient(f"http://127.0.0.1:{port}", s)
            module = wat_module("no_imports", tmp_path)
            await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
            proof = await api.publish(ALICE, REF, module)
            path = api.package_path(REF)
            now = int(time.time())
            verified = verify_module(module=module, proof=proof, policy=policy, now=now, status_proof=await api.get(path + "/status-proof"))
            assert verified.status is not None and now - verified.status.time < 60
            await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=2, reason="CVE"))
            with pytest.raises(VerifyError) as e:
                verify_module(module=module, proof=proof, policy=policy, now=now, status_proof=await api.get(path + "/status-proof"))
            assert e.value.reason == "yanked"
    finally:
        stop.set()
        await network


def test_an_index_root_naming_another_log_or_another_size_proves_nothing() -> None:
    """A log whose last entry is an index root of another origin, or as of another size than its own index."""
    module = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")
    grant = record_for("key-grant", ALICE.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, Action("key-grant", "acme", key=ALICE.vkey, issued=1).payload(), ALICE))
    release = record_for("release", ALICE.vkey, parse_envelope(release_envelope(ALICE, REF, module, None)))
    index = IndexState().with_records([(0, grant), (1, release)], 2)
    for root, why in ((IndexRoot("other.example/log", 2, index.root), "status-other-log"),
                      (IndexRoot(REGISTRY_KEY.name, 1, index.root), "status-root-invalid")):
        log = Log(MemoryLogStore(), REGISTRY_KEY)
        log.integrate([grant.entry, release.entry])
        (at,), published_cp = log.integrate([root.encode()])
        note = cosigned(published_cp.note)
        size = published_cp.checkpoint.size

        def included(indexes: Sequence[int], log: Log = log, size: int = size) -> list[Included]:
            return [Included(i, log.store.read_entries(i, i + 1)[0], tuple(log.inclusion_proof(i, size))) for i in indexes]

        sp = build_status_proof(index=index, checkpoint=note, root=included([at])[0], namespace="acme", name="hello", included=included)
        proof = TlogProof(1, tuple(log.inclusion_proof(1, size)), note, release.entry).encode()
        assert reason(module, proof, sp) == why


async def test_the_agent_fetches_status_proofs_and_names_a_registry_it_cannot_reach(aiohttp_client, tmp_path) -> None:
    api, _, _ = await published(aiohttp_client, tmp_path)
    fetched = await status_proof_of(api.url, REF)
    assert fetched is not None and parse_status_proof(fetched).package.key == "acme:hello"
    assert await status_proof_of(api.url, PackageRef("acme", "nothing", "1.0.0")) is None  # 404: none served
    with pytest.raises(VerifyError) as e:
        await status_proof_of(f"http://127.0.0.1:{free_ports(1)}", REF)
    assert e.value.reason == "registry-unreachable"
