"""`wasmlog up`: the whole network on embedded defaults, and the trust policy it writes."""

from __future__ import annotations

import asyncio
import time
import tomllib

import aiohttp
from registry_helpers import wat_module

from edge.verify import parse_trust_policy, verify_module
from registry.client import RegistryClient
from registry.record import parse_package_ref
from tlog.hashes import leaf_hash
from tlog.note import Ed25519Signer
from tlog.policy import parse_policy
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from wasmlog.drill_parts import free_port_range
from wasmlog.network import NetworkConfig, run_network

free_ports = free_port_range  # a port p with p..p+n-1 free (best effort): the drill's helper, one for both


async def test_up_publishes_with_quorum_and_restarts_with_the_same_keys(tmp_path) -> None:
    port = free_ports(5)
    alice = Ed25519Signer.generate("alice")
    module = wat_module("imports_all_kinds", tmp_path)
    for run in range(2):
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_network(NetworkConfig(data=tmp_path / "data", port=port), ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 20)
        trust = tomllib.loads((tmp_path / "data" / "trust-policy.toml").read_text())
        policy = parse_policy(trust["tlog_policy"].encode())
        assert policy.encode() == parse_policy((tmp_path / "data" / "tlog-policy.txt").read_bytes()).encode()
        async with aiohttp.ClientSession() as s:
            api = RegistryClient(f"http://127.0.0.1:{port}", s)
            proof = await api.publish(alice, parse_package_ref(f"acme:hello@1.0.{run}"), module)
            async with s.post(f"http://127.0.0.1:{port}/log/add", data=b"raw") as r:
                assert r.status in (404, 405)  # the registry's log takes records only through the API
            async with s.post(f"http://127.0.0.1:{port + 4}/v1/logs", data=b'{"resourceLogs": []}',
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200 and await r.json() == {}  # the telemetry collector, on port + 4
        tp = parse_tlog_proof(proof)
        assert tp.extra is not None
        cp, _, verified = verify_tlog_proof(
            tp, leaf_hash(tp.extra), policy.logs[0].verifier, extra_verifiers=[w.verifier for w in policy.witnesses.values()]
        )
        assert policy.satisfied(policy.witnessed_by(verified))
        # the edge trust policy that `up` wrote accepts the module it published
        trust_policy = parse_trust_policy((tmp_path / "data" / "trust-policy.toml").read_text())
        v = verify_module(module=module, proof=proof, policy=trust_policy, now=int(time.time()))
        assert v.ref == parse_package_ref(f"acme:hello@1.0.{run}") and len(v.witnesses) >= 2
        stop.set()
        await task
