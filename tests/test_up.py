"""`wasmlog up`: the whole network on embedded defaults, and the trust policy it writes."""

from __future__ import annotations

import asyncio
import socket

import aiohttp

from tlog.hashes import leaf_hash
from registry.network import NetworkConfig, run_network
from tlog.policy import parse_policy
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof


def free_ports(n: int) -> int:
    """A port p with p..p+n-1 free (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            socks = []
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


async def test_up_publishes_quorum_checkpoints_and_restarts_with_the_same_keys(tmp_path) -> None:
    port = free_ports(4)
    for run in range(2):
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_network(NetworkConfig(data=tmp_path, port=port), ready=ready, stop=stop))
        await asyncio.wait_for(ready.wait(), 10)
        policy = parse_policy((tmp_path / "tlog-policy.txt").read_bytes())
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/add", data=b"entry %d" % run) as r:
                assert r.status == 200, await r.text()
                tp = parse_tlog_proof(await r.read())
        log = policy.logs[0]
        cp, _, verified = verify_tlog_proof(
            tp, leaf_hash(b"entry %d" % run), log.verifier, extra_verifiers=[w.verifier for w in policy.witnesses.values()]
        )
        assert policy.satisfied(policy.witnessed_by(verified)) and cp.size == run + 1
        stop.set()
        await task
