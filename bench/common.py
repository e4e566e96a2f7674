"""Helpers shared by the benchmark scripts (run as `python bench/NAME.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A minimal module importing env.log; benchmarks vary it with a custom section.
BASE_MODULE = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of n consecutive loopback ports that were all free a moment ago."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for p in range(first, first + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return first
    raise RuntimeError(f"found no {n} consecutive free ports")


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def with_custom_section(name: bytes, payload: bytes) -> bytes:
    """BASE_MODULE plus one custom section `name` holding payload."""
    body = leb128(len(name)) + name + payload
    return BASE_MODULE + b"\x00" + leb128(len(body)) + body


def module_variant(n: int) -> bytes:
    """A small valid module, distinct for each n."""
    return with_custom_section(b"bench", n.to_bytes(8, "big"))


def proc_status(pid: int, field: str) -> int:
    """A size field of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def local_shared_storage(stack: contextlib.ExitStack, database: str, pids: dict[str, Callable[[], list[int]]] | None = None,
                         ) -> tuple[str, str, dict[str, str]]:
    """A throwaway PostgreSQL and SeaweedFS on this machine (tests/services.py), stopped with stack:
    (a new database's DSN, an s3:// URL with a prefix of its own, the AWS_* variables that reach it).
    pids, if given, gets "postgres" and "s3": each lists that server's processes now (for CpuMeter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from services import BUCKET, PostgresServer, SeaweedServer, running

    pg = stack.enter_context(running(PostgresServer))
    s3 = stack.enter_context(running(SeaweedServer))
    assert isinstance(pg, PostgresServer) and isinstance(s3, SeaweedServer)
    if pids is not None:
        with open(os.path.join(pg.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        pids["postgres"] = lambda: [postmaster, *child_pids(postmaster)]
        assert s3.proc is not None
        weed = s3.proc.pid
        pids["s3"] = lambda: [weed, *child_pids(weed)]
    return pg.new_database(database), f"s3://{BUCKET}/{database}", s3.env


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process pid has used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is pid."""
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8]), sum(ticks[:8])


class CpuMeter:
    """CPU seconds used by groups of processes (name -> a function listing their pids, called at both ends:
    a process gone by the end counts 0 there, so measure processes that outlive the meter) and by this
    process and the children it waited for meanwhile ("client"), and how busy the whole machine was (other users' processes included)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def _now(self) -> dict[str, float]:
        used = {name: sum(cpu_seconds(pid) for pid in pids()) for name, pids in self.groups.items()}
        used["client"] = sum(os.times()[:4])  # this process, and its children waited for (wrk, client processes)
        return used

    def __enter__(self) -> CpuMeter:
        self._start, self._ticks = self._now(), _machine_ticks()
        return self

    def __exit__(self, *_: object) -> None:
        end, (busy, total) = self._now(), _machine_ticks()
        self.used = {name: end[name] - self._start[name] for name in end}
        self.machine_busy = (busy - self._ticks[0]) / max(1, total - self._ticks[1])

    def per_item_ms(self, items: int) -> dict[str, float]:
        """Each group's CPU milliseconds per item (publish, append) and the sum, as measured by __exit__."""
        out = {name: round(1000 * used / max(1, items), 3) for name, used in self.used.items()}
        out["total"] = round(sum(out.values()), 3)
        return out


@contextlib.asynccontextmanager
async def agent_process(config: pathlib.Path) -> AsyncIterator[tuple[str, str]]:
    """`python -m wasmlog agent serve --config config` with this tree's code: (its module listener's URL, its admin
    listener's URL) while it runs; SIGTERM and wait at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(config),
                                                stdout=asyncio.subprocess.PIPE, cwd=ROOT, env=env)
    try:
        assert proc.stdout is not None
        m = re.match(rb"wasmlog agent: (http://\S+)", await asyncio.wait_for(proc.stdout.readline(), 120))
        admin = re.match(rb"wasmlog agent admin: (http://\S+)", await asyncio.wait_for(proc.stdout.readline(), 120))
        assert m and admin, "the agent did not start"
        yield m[1].decode().rstrip("/"), admin[1].decode().rstrip("/")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
