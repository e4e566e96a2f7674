"""Audit, monitor and diff against a real registry on loopback."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys

from aiohttp import web
from registry_helpers import CYCLONEDX, REGISTRY_KEY, build_registry, start_registry, wat_module

from registry.audit import AuditState, Event, make_auditor
from registry.diff import diff_releases, format_diff
from registry.record import Action, parse_package_ref
from registry.server import make_app
from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof
from tlog.sequencer import Sequencer
from tlog.server import make_app as make_log_app
from tlog.storage.memory import MemoryLogStore

VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")


def module_variant(base: bytes, n: int) -> bytes:
    payload = b"\x04note" + n.to_bytes(4, "big")
    return base + b"\x00" + bytes([len(payload)]) + payload


async def audit(client, state: AuditState | None = None, **kw):  # type: ignore[no-untyped-def]
    log_url = str(client.make_url("/log"))
    auditor = make_auditor(log_url=log_url, session=client.session, verifiers=[VERIFIER], state=state or AuditState(),
                           registry_url=str(client.make_url("")), **kw)
    await auditor.run()
    return auditor


async def test_audit_of_hundreds_of_releases_then_a_flipped_tile_byte(aiohttp_client, aiohttp_server, tmp_path) -> None:
    api, client, source, store = await start_registry(aiohttp_client, tmp_path)
    base = wat_module("no_imports", tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    await asyncio.gather(*(api.publish(ALICE, parse_package_ref(f"acme:m{i % 7}@1.0.{i}"), module_variant(base, i)) for i in range(299)))
    auditor = await audit(client)
    report = auditor.report("x")
    assert report["findings"] == [] and report["tree_size"] == source.log.published.checkpoint.size and report["releases"] == 299
    assert report["index_keys"] == 1 + 7  # the namespace and its seven packages
    assert report["blobs_checked"] == 299
    tile = store.read_tile(0, 0)
    await client.close()
    store.close()
    # Flip one byte of the stored level-0 tile 0, in the LMDB file itself.
    db = pathlib.Path(tmp_path / "log" / "data.mdb")
    raw = bytearray(db.read_bytes())
    at = raw.find(tile)
    assert at >= 0 and raw.find(tile, at + 1) < 0
    raw[at + 100] ^= 0x01
    db.write_bytes(bytes(raw))
    registry, seq, store2 = build_registry(tmp_path)
    client2 = await aiohttp_client(make_app(registry, seq))
    auditor = await audit(client2)
    assert [(f.kind, f.where) for f in auditor.findings] == [("tile-mismatch", "tile/0/000")]
    store2.close()


async def test_audit_resumes_from_its_state(aiohttp_client, tmp_path) -> None:
    api, client, registry, _ = await start_registry(aiohttp_client, tmp_path)
    base = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:a@1.0.0"), base)
    state = AuditState()
    first = await audit(client, state)
    assert first.report("x")["tree_size"] == registry.log.published.checkpoint.size == 4  # grant, root, release, root
    state.save(tmp_path / "st")
    await asyncio.gather(*(api.publish(ALICE, parse_package_ref(f"acme:a@1.1.{i}"), module_variant(base, i)) for i in range(300)))
    resumed = AuditState.load(tmp_path / "st")
    second = await audit(client, resumed)
    report = second.report("x")
    assert report["findings"] == [] and report["tree_size"] == registry.log.published.checkpoint.size and report["blobs_checked"] == 300  # only the new ones


async def test_monitor_reports_unexpected_keys_and_capability_escalation(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await api.publish(BOB, parse_package_ref("acme:hello@1.1.0"), wat_module("imports_all_kinds", tmp_path))
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.1.0", issued=2, reason="escalation"))
    await api.publish(ALICE, parse_package_ref("other:x@1.0.0"), wat_module("no_imports", tmp_path))
    events: list[Event] = []
    await audit(client, namespaces=frozenset({"acme"}), expected_keys=frozenset({ALICE.vkey}), on_event=events.append)
    kinds = [(e.kind, e.index) for e in events]
    # every record is one batch, closed by an index root: index-root events follow each change to acme
    assert kinds == [
        ("key-grant", 0), ("index-root", 1), ("release", 2), ("index-root", 3), ("key-grant", 4), ("index-root", 5),
        ("release", 6), ("unexpected-key", 6), ("capability-escalation", 6), ("index-root", 7), ("yank", 8), ("index-root", 9),
    ]  # and none after other:x (indexes 10 to 13)
    assert all(e.detail["matches"] for e in events if e.kind == "index-root")
    escalation = next(e for e in events if e.kind == "capability-escalation")
    assert "fastly_http_req.send" in escalation.detail["added_imports"]


async def test_monitor_reports_the_components_an_sbom_change_adds_removes_and_changes(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    cdx = "application/vnd.cyclonedx+json"
    sbom2 = CYCLONEDX.replace(b'"1.0.200"', b'"1.0.201"').replace(b"}]}", b'},{"type":"library","name":"evil","version":"6.6.6"}]}')
    sbom3 = CYCLONEDX.replace(b'"1.0.200"', b'"1.0.201"')
    module = wat_module("no_imports", tmp_path)
    at = [parse_tlog_proof(await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), module, CYCLONEDX, cdx)).index]
    at.append(parse_tlog_proof(await api.publish(ALICE, parse_package_ref("acme:hello@1.1.0"), module_variant(module, 1), sbom2, cdx)).index)
    at.append(parse_tlog_proof(await api.publish(ALICE, parse_package_ref("acme:hello@1.2.0"), module_variant(module, 2), sbom3, cdx)).index)
    # the same SBOM: no event; then no SBOM at all
    at.append(parse_tlog_proof(await api.publish(ALICE, parse_package_ref("acme:hello@1.3.0"), module_variant(module, 3), sbom3, cdx)).index)
    at.append(parse_tlog_proof(await api.publish(ALICE, parse_package_ref("acme:hello@1.4.0"), module_variant(module, 4))).index)
    events: list[Event] = []
    await audit(client, namespaces=frozenset({"acme"}), on_event=events.append, sbom_source=api)
    changes = [(e.index, e.detail["previous"], e.detail["components"]) for e in events if e.kind == "sbom-change"]
    assert changes == [
        (at[1], "acme:hello@1.0.0", {"added": {"evil": "6.6.6"}, "removed": {}, "changed": {"pkg:cargo/serde": {"from": "1.0.200", "to": "1.0.201"}}}),
        (at[2], "acme:hello@1.1.0", {"added": {}, "removed": {"evil": "6.6.6"}, "changed": {}}),
        (at[4], "acme:hello@1.3.0", {"added": {}, "removed": {"pkg:cargo/serde": "1.0.201"}, "changed": {}}),
    ]
    without: list[Event] = []  # a monitor without an SBOM source reports the rest as before
    await audit(client, namespaces=frozenset({"acme"}), on_event=without.append)
    assert [e for e in events if e.kind != "sbom-change"] == without


async def test_diff_of_two_releases(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    sbom2 = CYCLONEDX.replace(b'"1.0.200"', b'"1.0.201"').replace(b"}]}", b'},{"type":"library","name":"tokio","version":"1.0.0"}]}')
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path), CYCLONEDX, "application/vnd.cyclonedx+json")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.1.0"), wat_module("many_funcs", tmp_path), sbom2, "application/vnd.cyclonedx+json")
    metas = [await api.get_json(api.package_path(parse_package_ref(f"acme:hello@{v}"))) for v in ("1.0.0", "1.1.0")]
    d = diff_releases(metas[0], metas[1], CYCLONEDX, sbom2)
    assert d["components"]["added"] == {"tokio": "1.0.0"}
    assert d["components"]["changed"] == {"pkg:cargo/serde": {"from": "1.0.200", "to": "1.0.201"}}
    assert d["imports"]["added"] == ["a.f0", "a.f1", "a.f2", "a.f3", "b.f4", "b.f5"] and d["imports"]["removed"] == []
    assert "+ tokio 1.0.0" in format_diff(d)


async def test_audit_of_a_plain_tlog_tiles_log(aiohttp_client, tmp_path) -> None:
    """Any C2SP tlog-tiles log: only the tree is audited, and a clean one has no findings."""
    key = Ed25519Signer.generate("example.com/plain")
    log = Log(MemoryLogStore(), key)
    log.integrate([b"plain entry %d" % i for i in range(700)])
    client = await aiohttp_client(make_log_app(Sequencer(log)))
    auditor = make_auditor(log_url=str(client.make_url("")), session=client.session,
                           verifiers=[Ed25519Verifier(key.name, key.public_key)], state=AuditState())
    await auditor.run()
    report = auditor.report("x")
    assert report["findings"] == [] and report["tree_size"] == 700 and report["registry_log"] is False


async def test_monitor_cli_posts_events_to_a_webhook(aiohttp_client, aiohttp_server, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    received: list[dict] = []  # type: ignore[type-arg]

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wasmlog", "monitor", str(client.make_url("")), "--vkey", REGISTRY_KEY.vkey,
        "--namespace", "acme", "--expect-key", BOB.vkey, "--webhook", str(receiver.make_url("/hook")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [e["event"] for e in lines] == ["key-grant", "unexpected-key", "index-root", "release", "unexpected-key", "index-root"]
    assert received == lines


async def test_monitor_cli_reports_sbom_changes_read_from_the_registry(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    cdx = "application/vnd.cyclonedx+json"
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), module, CYCLONEDX, cdx)
    proof = await api.publish(ALICE, parse_package_ref("acme:hello@1.1.0"), module_variant(module, 1),
                              CYCLONEDX.replace(b"}]}", b'},{"type":"library","name":"evil","version":"6.6.6"}]}'), cdx)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wasmlog", "monitor", str(client.make_url("")), "--vkey", REGISTRY_KEY.vkey, "--namespace", "acme",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    changes = [e for e in map(json.loads, out.decode().splitlines()) if e["event"] == "sbom-change"]
    assert changes == [{"event": "sbom-change", "index": parse_tlog_proof(proof).index, "namespace": "acme", "package": "acme:hello@1.1.0", "previous": "acme:hello@1.0.0",
                        "components": {"added": {"evil": "6.6.6"}, "removed": {}, "changed": {}}}]
