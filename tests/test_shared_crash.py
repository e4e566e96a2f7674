"""Three `wasmlog log serve --store ... --objects ...` processes under load, one SIGKILLed each round.

Each round waits for fresh acknowledgements, SIGKILLs a random process and restarts it; one round
also crashes PostgreSQL (pg_ctl stop -m immediate) and starts it again. At the end, from the bucket
alone (read over plain HTTP from SeaweedFS): the auditor finds nothing, every acknowledged entry is
at its index, and every checkpoint a submitter was given is a prefix of the final tree (its root is
the naive RFC 6962 hash of that many entries read back), so no checkpoint forked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys

import aiohttp
import reference
from helpers import free_port, wait_until

from registry.follow import Follower
from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.client import TileClient
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

ROUNDS = 4
DATABASE_CRASH_ROUND = 2
CLIENTS = 12
PROCESSES = 3


def checkpoint_of(note: bytes, verifier: Ed25519Verifier) -> Checkpoint:
    return parse_checkpoint(open_note(note, [verifier])[0].text)


class Node:
    """One `log serve` process on the shared store, restartable on its port."""

    health_path = "/healthz"

    def __init__(self, key: str, dsn: str, objects: str, env: dict[str, str], logfile: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "wasmlog", "log", "serve", "--key", key, "--store", dsn, "--objects", objects,
                     "--listen", f"127.0.0.1:{self.port}", "--interval-ms", "10"]
        self.env = {**os.environ, **env}
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    async def health(self, session: aiohttp.ClientSession) -> str | None:
        """The /healthz text, or None while the process does not answer (it must be running)."""
        if self.proc is None or self.proc.poll() is not None:
            with open(self.logfile) as log:
                raise AssertionError(f"node on {self.port} exited: {log.read()[-3000:]}")
        try:
            async with session.get(self.url + self.health_path) as r:
                return await r.text() if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        return await self.health(session) is not None


async def load(session: aiohttp.ClientSession, nodes: list[Node], tag: str, acked: dict[bytes, tuple[int, bytes]], stop: asyncio.Event,
               verifier: Ed25519Verifier) -> None:
    """Submit entries round robin over the nodes until stop; record each acknowledged one (its tlog-proof verified)."""
    n = 0
    while not stop.is_set():
        entry = f"{tag}-{n}".encode()
        node = nodes[n % len(nodes)]
        n += 1
        try:
            async with session.post(node.url + "/add", data=entry) as r:
                if r.status != 200:
                    await asyncio.sleep(0.05)  # pacing a refused client (503 while storage is away), not ordering
                    continue
                body = await r.read()
        except (TimeoutError, aiohttp.ClientError):
            await asyncio.sleep(0.05)  # the node is down: pace the retry, it is being restarted
            continue
        tp = parse_tlog_proof(body)
        verify_tlog_proof(tp, hashlib.sha256(b"\x00" + entry).digest(), verifier)
        acked[entry] = (tp.index, tp.checkpoint)


async def test_sigkill_one_of_three_and_the_database_loses_nothing_and_never_forks(tmp_path, postgres, pg_dsn, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    signer = Ed25519Signer.generate("example.com/sharedcrash")
    verifier = Ed25519Verifier(signer.name, signer.public_key)
    key = tmp_path / "log.key"
    key.write_text(signer.private_key + "\n")
    nodes = [Node(str(key), pg_dsn, f"s3://{s3_path}/log", seaweed.env, str(tmp_path / f"node{i}.log")) for i in range(PROCESSES)]
    acked: dict[bytes, tuple[int, bytes]] = {}
    rng = random.Random(17)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                await wait_until(lambda node=node: node.ready(session), f"node on {node.port} to serve", 60)
            clients = [asyncio.create_task(load(session, nodes, f"c{c}", acked, stop, verifier)) for c in range(CLIENTS)]
            for round_ in range(ROUNDS):
                target = len(acked) + 100
                await wait_until(lambda target=target: len(acked) >= target, f"100 more acknowledgements in round {round_}", 60)
                # Alternate: the integrator itself (killed in the middle of its work), then a random process.
                if round_ % 2 == 0:
                    healths = [await node.health(session) for node in nodes]
                    victim = next(node for node, h in zip(nodes, healths, strict=True) if h and "integrating" in h)
                else:
                    victim = rng.choice(nodes)
                victim.kill()
                if round_ == DATABASE_CRASH_ROUND:
                    await asyncio.to_thread(postgres.stop, "immediate")
                    await asyncio.to_thread(postgres.start)
                victim.start()
                await wait_until(lambda victim=victim: victim.ready(session), f"the restarted node on {victim.port}", 60)
            target = len(acked) + 100
            await wait_until(lambda: len(acked) >= target, "acknowledgements after the last round", 60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            # The bucket converges to a tree covering every acknowledged entry.
            bucket = TileClient(f"{seaweed.endpoint}/{s3_path}/log", session)
            highest = max(index for index, _ in acked.values())

            async def covered() -> bool:
                return checkpoint_of(await bucket.checkpoint(), verifier).size > highest

            await wait_until(covered, "the bucket's checkpoint to cover every acknowledged entry", 60)
        finally:
            stop.set()
            for node in nodes:
                node.kill()
        follower = Follower(bucket, [verifier])
        latest = await follower.latest()
        assert latest is not None, follower.findings
        cp, _ = latest
        logged = [entry async for _, entry in follower.entries(cp)]
    assert follower.findings == [] and len(logged) == cp.size
    for entry, (index, _) in acked.items():
        assert logged[index] == entry, f"acknowledged {entry!r} at {index}, the bucket has {logged[index]!r}"
    tree = tuple(logged)
    for size, note in {checkpoint_of(n, verifier).size: n for _, n in acked.values()}.items():
        assert checkpoint_of(note, verifier).root_hash == reference.mth(tree, 0, size), f"the checkpoint of size {size} is not a prefix of the bucket's tree"
    assert len(set(logged)) == len(logged), "an entry was logged twice"
    print(f"{len(acked)} acknowledged, {cp.size} logged, {ROUNDS} kills")
