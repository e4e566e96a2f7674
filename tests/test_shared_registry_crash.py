"""Three `wasmlog registry serve --store ... --objects ...` processes under publish load, one SIGKILLed each round.

Each round two fresh keys race to claim one namespace through two different processes (exactly
one wins, the other gets 403), then a random process is SIGKILLed and restarted; one round also
crashes PostgreSQL (pg_ctl stop -m immediate) and starts it again. At the end, from
the bucket alone (read over plain HTTP from SeaweedFS): every acknowledged publish is at its index
with its module in the bucket under its digest, the log replays without a void record, and the
audit finds every index root correct.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import aiohttp
from helpers import wait_until
from registry_helpers import REGISTRY_KEY, with_custom_section
from test_shared_crash import Node

from registry.audit import make_auditor
from registry.audit_state import AuditState
from registry.client import RegistryClient, RegistryError
from registry.follow import Follower
from registry.record import Action, PackageRef, decode_entry, is_index_root
from registry.state import replay
from tlog.client import TileClient
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

ROUNDS = 3
DATABASE_CRASH_ROUND = 1
PUBLISHERS = 6
PROCESSES = 3
EMPTY_MODULE = b"\x00asm\x01\x00\x00\x00"
VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)


class RegistryNode(Node):
    """One `registry serve` process on the shared store."""

    health_path = "/log/healthz"

    def __init__(self, key: str, dsn: str, objects: str, env: dict[str, str], logfile: str) -> None:
        super().__init__(key, dsn, objects, env, logfile)
        self.args[self.args.index("log") : self.args.index("log") + 1] = ["registry"]


def self_grant(signer: Ed25519Signer, ns: str) -> Action:
    return Action("key-grant", ns, key=signer.vkey, issued=1)  # fixed: a retry is the same entry


async def publisher(session: aiohttp.ClientSession, nodes: list[RegistryNode], n: int, acked: dict[int, tuple[bytes, bytes]],
                    stop: asyncio.Event) -> None:
    """Claim ns<n>, then publish versions until stop, each retried on any node until it is answered; keep
    each acknowledged (index -> (entry, module)), its tlog-proof verified."""
    signer, ns = Ed25519Signer.generate(f"publisher{n}"), f"ns{n}"
    attempt = 0

    async def until_answered(call) -> bytes | None:  # type: ignore[no-untyped-def]
        nonlocal attempt
        while not stop.is_set():
            api = RegistryClient(nodes[attempt % len(nodes)].url, session)
            attempt += 1
            try:
                return bytes(await call(api))
            except RegistryError as e:
                if e.status == 409:
                    return None  # an earlier attempt was logged but not yet visible here: not acknowledged
                if e.status != 503:
                    raise
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)  # pacing a retry while the node restarts, not ordering
        return None

    await until_answered(lambda api: api.act(signer, self_grant(signer, ns)))
    version = 0
    while not stop.is_set():
        module = with_custom_section(EMPTY_MODULE, 1000 + version)
        ref = PackageRef(ns, "mod", f"1.0.{version}")
        version += 1
        proof = await until_answered(lambda api, ref=ref, module=module: api.publish(signer, ref, module))
        if proof is not None:
            tp = parse_tlog_proof(proof)
            assert tp.extra is not None
            verify_tlog_proof(tp, hashlib.sha256(b"\x00" + tp.extra).digest(), VERIFIER)
            acked[tp.index] = (tp.extra, module)


async def race(session: aiohttp.ClientSession, nodes: list[RegistryNode], ns: str) -> str:
    """Two keys claim ns at once through two processes; return the winner's vkey (exactly one wins, the other gets 403)."""
    keys = [Ed25519Signer.generate(f"{ns}-{k}") for k in range(2)]

    async def claim(k: int) -> int:
        try:
            await RegistryClient(nodes[k].url, session).act(keys[k], self_grant(keys[k], ns))
        except RegistryError as e:
            return e.status
        return 200

    statuses = await asyncio.gather(claim(0), claim(1))
    assert sorted(statuses) == [200, 403], statuses
    return keys[statuses.index(200)].vkey


async def test_registry_processes_sigkilled_under_publish_load_lose_nothing(tmp_path, postgres, pg_dsn, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "registry.key"
    key.write_text(REGISTRY_KEY.private_key + "\n")
    nodes = [RegistryNode(str(key), pg_dsn, f"s3://{s3_path}/reg", seaweed.env, str(tmp_path / f"node{i}.log")) for i in range(PROCESSES)]
    acked: dict[int, tuple[bytes, bytes]] = {}
    winners: dict[str, str] = {}
    rng = random.Random(17)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                await wait_until(lambda node=node: node.ready(session), f"node on {node.port} to serve", 60)
            clients = [asyncio.create_task(publisher(session, nodes, n, acked, stop)) for n in range(PUBLISHERS)]
            for round_ in range(ROUNDS):
                target = len(acked) + 40
                await wait_until(lambda target=target: len(acked) >= target, f"40 more publishes in round {round_}", 60)
                pair = rng.sample(nodes, 2)
                winners[f"race{round_}"] = await race(session, pair, f"race{round_}")
                victim = rng.choice(nodes)
                victim.kill()
                if round_ == DATABASE_CRASH_ROUND:
                    await asyncio.to_thread(postgres.stop, "immediate")
                    await asyncio.to_thread(postgres.start)
                victim.start()
                await wait_until(lambda victim=victim: victim.ready(session), f"the restarted node on {victim.port}", 60)
            target = len(acked) + 40
            await wait_until(lambda: len(acked) >= target, "publishes after the last round", 60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            bucket = TileClient(f"{seaweed.endpoint}/{s3_path}/reg/log", session)
            highest = max(acked)

            async def covered() -> bool:
                latest = await Follower(bucket, [VERIFIER]).latest()
                return latest is not None and latest[0].size > highest

            await wait_until(covered, "the bucket's checkpoint to cover every acknowledged publish", 60)
        finally:
            stop.set()
            for node in nodes:
                node.kill()
        follower = Follower(bucket, [VERIFIER])
        latest = await follower.latest()
        assert latest is not None, follower.findings
        logged = [entry async for _, entry in follower.entries(latest[0])]
        assert follower.findings == [] and len(logged) == latest[0].size
        assert is_index_root(logged[-1])  # the checkpoint ends with an index root...
        auditor = make_auditor(log_url=f"{seaweed.endpoint}/{s3_path}/reg/log", session=session,
                               verifiers=[VERIFIER], state=AuditState())
        assert await auditor.run() == len(logged) and auditor.findings == []  # ...and every root matches the log
        for index, (entry, module) in acked.items():
            assert logged[index] == entry, f"acknowledged publish at {index} is not in the bucket's log"
            async with session.get(f"{seaweed.endpoint}/{s3_path}/reg/blobs/sha256/{hashlib.sha256(module).hexdigest()}") as r:
                assert r.status == 200 and await r.read() == module, f"the module of the publish at {index}"
    state, rejected = replay((i, decode_entry(e)) for i, e in enumerate(logged) if not is_index_root(e))
    assert rejected == []  # nothing refused was ever logged
    for ns, vkey in winners.items():
        assert state.namespaces[ns].keys == {vkey}
    print(f"{len(acked)} publishes acknowledged, {len(logged)} records logged, {ROUNDS} kills and a database crash")
