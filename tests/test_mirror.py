"""A verifying mirror: copies a registry, serves modules that verify, and refuses what does not verify."""

from __future__ import annotations

import hashlib
import time

from registry_helpers import REGISTRY_KEY, start_registry, wat_module

from edge.verify import parse_trust_policy, verify_module
from registry.client import RegistryClient
from registry.mirror import open_mirror
from registry.record import parse_package_ref
from registry.server import make_app
from registry.status_proof import parse_status_proof
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
POLICY = parse_trust_policy(f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nquorum none\n"""\n')


async def test_mirror_copies_verifies_and_serves(aiohttp_client, tmp_path) -> None:
    api, source, _, _ = await start_registry(aiohttp_client, tmp_path / "source")
    module = wat_module("imports_all_kinds", tmp_path)
    for v in range(3):
        await api.publish(ALICE, parse_package_ref(f"acme:hello@1.0.{v}"), module)
    mirror, store = open_mirror(source=str(source.make_url("")), policy=POLICY, data=tmp_path / "mirror")
    size = await mirror.round(source.session, int(time.time()))
    assert mirror.stopped is None and size == 8  # four records, each closed by an index root
    assert not mirror.registry.indexer.mismatches and len(mirror.registry.indexer.index.histories) == 2  # acme, acme:hello
    served = await aiohttp_client(make_app(mirror.registry, mirror.sequencer, read_only=True))
    m = RegistryClient(str(served.make_url("")), served.session)
    ref = parse_package_ref("acme:hello@1.0.1")
    got = await m.get(m.package_path(ref) + "/module.wasm")
    proof = await m.get(m.package_path(ref) + "/tlog-proof")
    v = verify_module(module=got, proof=proof, policy=POLICY, now=int(time.time()))
    assert v.ref == ref
    assert (await served.get("/log/checkpoint")).status == 200
    # the mirror serves status proofs from the source's index roots, which it checked against its own index
    status = parse_status_proof(await m.get(m.package_path(ref) + "/status-proof"))
    assert status.root.index == 7 and status.checkpoint == await (await source.get("/log/checkpoint")).read()
    assert [k.key for k in (status.namespace, status.package)] == ["acme", "acme:hello"] and status.records == ()  # no revocation, no yank
    assert (await served.post("/api/v1/publish", data=b"")).status in (404, 405)  # read-only
    # the source keeps growing; the mirror follows
    await api.publish(ALICE, parse_package_ref("acme:hello@2.0.0"), module)
    assert await mirror.round(source.session, int(time.time())) == 10
    # a source that serves a module other than the logged one stops the mirror where it is
    other = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:bad@1.0.0"), other)
    blob = tmp_path / "source" / "blobs" / "sha256" / hashlib.sha256(other).hexdigest()
    blob.write_bytes(other + b"\x00\x01\x00")  # corrupt the stored module under its digest
    assert await mirror.round(source.session, int(time.time())) == 10
    assert mirror.stopped and "not the logged one" in mirror.stopped
    store.close()


async def test_mirror_refuses_a_checkpoint_without_its_quorum(aiohttp_client, tmp_path) -> None:
    api, source, _, _ = await start_registry(aiohttp_client, tmp_path / "source")
    await api.publish(ALICE, parse_package_ref("acme:a@1.0.0"), wat_module("no_imports", tmp_path))
    w = Ed25519Signer.generate("w.example", 0x04)
    strict = parse_trust_policy(f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nwitness W {w.vkey}\nquorum W\n"""\n')
    mirror, store = open_mirror(source=str(source.make_url("")), policy=strict, data=tmp_path / "mirror")
    assert await mirror.round(source.session, int(time.time())) == 0
    assert mirror.stopped and "witness-quorum" in mirror.stopped
    store.close()
