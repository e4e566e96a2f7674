"""The auditor's and operator's side on a network started by `wasmlog up` (witnesses and all)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from registry_helpers import wat_module
from test_up import free_ports

from edge.verify import parse_trust_policy, verify_module
from registry.audit import AuditState, Event, make_auditor
from registry.client import RegistryClient
from registry.mirror import open_mirror
from registry.record import Action, parse_package_ref
from registry.server import make_app
from tlog.note import Ed25519Signer
from wasmlog.network import NetworkConfig, run_network


async def test_audit_monitor_and_mirror_on_an_up_network(aiohttp_client, tmp_path) -> None:
    port = free_ports(5)
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_network(NetworkConfig(data=tmp_path / "net", port=port), ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 20)
    policy = parse_trust_policy((tmp_path / "net" / "trust-policy.toml").read_text())
    url = f"http://127.0.0.1:{port}"
    alice, mallory = Ed25519Signer.generate("alice"), Ed25519Signer.generate("mallory")
    base = wat_module("no_imports", tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            api = RegistryClient(url, session)
            await api.claim_if_unclaimed(alice, "acme")
            await asyncio.gather(*(
                api.publish(alice, parse_package_ref(f"acme:m{i % 5}@1.0.{i}"), base + b"\x00\x07\x04note" + bytes([i % 256, i // 256]))
                for i in range(250)
            ))
            # an owner key that leaked: someone grants mallory, who publishes
            await api.act(alice, Action("key-grant", "acme", key=mallory.vkey, issued=1))
            await api.publish(mallory, parse_package_ref("acme:m0@9.9.9"), wat_module("imports_all_kinds", tmp_path))

            events: list[Event] = []
            auditor = make_auditor(log_url=url + "/log", session=session, verifiers=[policy.tlog.logs[0].verifier],
                                   state=AuditState(), registry_url=url, namespaces=frozenset({"acme"}),
                                   expected_keys=frozenset({alice.vkey}), on_event=events.append)
            await auditor.run()
            report = auditor.report(url)
            assert report["findings"] == [] and report["releases"] == 251 and report["blobs_checked"] == 251
            unexpected = [e for e in events if e.kind == "unexpected-key"]
            assert {e.detail["signer"] for e in unexpected} == {mallory.vkey}
            assert any(e.kind == "capability-escalation" and e.detail["package"] == "acme:m0@9.9.9" for e in events)

            mirror, store = open_mirror(source=url, policy=policy, data=tmp_path / "mirror")
            assert await mirror.round(session, int(time.time())) == report["tree_size"]
            assert mirror.stopped is None
            served = await aiohttp_client(make_app(mirror.registry, mirror.sequencer, read_only=True))
            m = RegistryClient(str(served.make_url("")), served.session)
            ref = parse_package_ref("acme:m3@1.0.3")
            module = await m.get(m.package_path(ref) + "/module.wasm")
            proof = await m.get(m.package_path(ref) + "/tlog-proof")
            v = verify_module(module=module, proof=proof, policy=policy, now=int(time.time()))
            assert v.ref == ref and len(v.witnesses) >= 2  # the mirror serves the cosigned checkpoint as it is
            store.close()
    finally:
        stop.set()
        await task
