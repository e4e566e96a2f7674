"""`log serve --store ... --workers 2` and `registry serve --store ... --workers 2`: two full nodes on one port.

On shared storage every process is a full node, so --workers N runs N of them sharing the listening
port (SO_REUSEPORT): the one started by hand and N - 1 it supervises. Real processes, PostgreSQL and
SeaweedFS; requests go through the one port on fresh connections, which the kernel spreads.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import signal
import subprocess
import sys

import aiohttp
from helpers import free_port, wait_until
from registry_helpers import REGISTRY_KEY, with_custom_section
from test_shared_log import KEY, VERIFIER, audit_bucket

from registry.client import RegistryClient
from registry.follow import Follower
from registry.record import PackageRef, is_index_root
from tlog.client import TileClient
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

EMPTY_MODULE = b"\x00asm\x01\x00\x00\x00"


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def children(pid: int) -> list[int]:
    """The live processes whose parent is pid (Linux /proc)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(name))
    return found


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Workers:
    """`wasmlog <group> serve --store ... --workers 2` on a free port."""

    def __init__(self, group: str, key: str, dsn: str, objects: str, env: dict[str, str], logfile: str, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.health = self.url + ("/log/healthz" if group == "registry" else "/healthz")
        self.logfile = logfile
        with open(logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wasmlog", group, "serve", "--key", key, "--store", dsn, "--objects", objects,
                 "--listen", f"127.0.0.1:{self.port}", "--interval-ms", "10", "--workers", "2"],
                env={**os.environ, **env}, stdout=log, stderr=log)

    async def roles(self) -> set[str]:
        """Ask /healthz on fresh connections until both processes answered: 'integrating' and 'following'."""
        seen: set[str] = set()

        async def both() -> bool:
            assert self.proc.poll() is None, pathlib.Path(self.logfile).read_text()[-3000:]
            try:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, s.get(self.health) as r:
                    if r.status == 200:
                        seen.add("integrating" if "integrating" in await r.text() else "following")
            except aiohttp.ClientError:
                pass
            return len(seen) == 2

        await wait_until(both, "both processes answering on the port", 60)
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def test_log_workers_on_shared_storage_are_one_log_and_stop_together(tmp_path, pg_dsn, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "log.key").write_text(KEY.private_key + "\n")
    workers = Workers("log", str(tmp_path / "log.key"), pg_dsn, f"s3://{s3_path}/log", seaweed.env, str(tmp_path / "workers.log"))
    proofs: dict[bytes, bytes] = {}

    async def append(session: aiohttp.ClientSession, entries: list[bytes]) -> None:
        async def one(entry: bytes) -> None:
            async with session.post(workers.url + "/add", data=entry) as r:
                assert r.status == 200, await r.text()
                proofs[entry] = await r.read()

        await asyncio.gather(*(one(e) for e in entries))

    try:
        assert await workers.roles() == {"integrating", "following"}
        [worker] = children(workers.proc.pid)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=32)) as session:
            await append(session, [b"entry %d" % i for i in range(200)])
            os.kill(worker, signal.SIGKILL)  # the supervisor starts another
            await wait_until(lambda: len(children(workers.proc.pid)) == 1 and worker not in children(workers.proc.pid),
                             "another worker process", 30)
            await workers.roles()
            await append(session, [b"entry %d" % i for i in range(200, 300)])
        [worker] = children(workers.proc.pid)
        workers.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers.proc.wait, 30) == 0
        await wait_until(lambda: not running(worker), "the worker process to stop with the first", 15)
    finally:
        workers.stop()
    indexes = {}
    for entry, proof in proofs.items():
        tp = parse_tlog_proof(proof)
        verify_tlog_proof(tp, leaf(entry), VERIFIER)
        indexes[tp.index] = entry
    assert sorted(indexes) == list(range(300))  # one log: every index once
    assert await audit_bucket(seaweed, s3_path) == (300, [])


async def test_registry_workers_on_shared_storage_take_publishes_and_none_outlives_a_killed_first(  # type: ignore[no-untyped-def]
        tmp_path, pg_dsn, seaweed, s3_path) -> None:
    (tmp_path / "registry.key").write_text(REGISTRY_KEY.private_key + "\n")
    workers = Workers("registry", str(tmp_path / "registry.key"), pg_dsn, f"s3://{s3_path}/reg", seaweed.env, str(tmp_path / "workers.log"))
    publishers = [Ed25519Signer.generate(f"publisher{i}") for i in range(4)]
    try:
        assert await workers.roles() == {"integrating", "following"}
        [worker] = children(workers.proc.pid)
        # Another group started on the port by mistake refuses it instead of sharing it (claimed_port).
        second = Workers("registry", str(tmp_path / "registry.key"), pg_dsn, f"s3://{s3_path}/reg", seaweed.env,
                         str(tmp_path / "second.log"), port=workers.port)
        try:
            assert await asyncio.to_thread(second.proc.wait, 60) == 1
        finally:
            second.stop()
        last = pathlib.Path(second.logfile).read_text().strip().splitlines()[-1]
        assert f"127.0.0.1:{workers.port} is already in use by another process" in last, last
        assert children(workers.proc.pid) == [worker]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            api = RegistryClient(workers.url, session)

            async def publish(n: int) -> list[bytes]:
                signer = publishers[n]
                return [await api.publish(signer, PackageRef(f"ns{n}", "mod", f"1.0.{v}"), with_custom_section(EMPTY_MODULE, 10 * n + v))
                        for v in range(5)]

            answers = [p for ps in await asyncio.gather(*(publish(n) for n in range(len(publishers)))) for p in ps]
            for n in range(len(publishers)):  # whichever process answers: the other one within its poll interval
                async def listed(n: int = n) -> bool:
                    return bool((await api.get_json(f"/api/v1/packages/ns{n}/mod"))["versions"] == [f"1.0.{v}" for v in range(5)])
                await wait_until(listed, f"ns{n}/mod to list its five versions")
            bucket = TileClient(f"{seaweed.endpoint}/{s3_path}/reg/log", session)
            verifier = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
            highest = max(parse_tlog_proof(p).index for p in answers)

            async def covered() -> bool:
                latest = await Follower(bucket, [verifier]).latest()
                return latest is not None and latest[0].size > highest

            await wait_until(covered, "the bucket's checkpoint to cover every publish", 30)
            follower = Follower(bucket, [verifier])
            latest = await follower.latest()
            assert latest is not None
            logged = [entry async for _, entry in follower.entries(latest[0])]
        for proof in answers:
            tp = parse_tlog_proof(proof)
            assert tp.extra is not None and logged[tp.index] == tp.extra
            verify_tlog_proof(tp, leaf(tp.extra), verifier)
        assert sum(not is_index_root(e) for e in logged) == 4 * 6  # a claim and five releases each, nothing else
        workers.proc.send_signal(signal.SIGKILL)  # the first process dies without stopping its worker...
        workers.proc.wait()
        await wait_until(lambda: not running(worker), "the worker process to stop by itself", 15)  # ...which notices
    finally:
        workers.stop()
