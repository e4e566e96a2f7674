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
from collections.abc import AsyncIterator

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


def local_shared_storage(stack: contextlib.ExitStack, database: str) -> tuple[str, str, dict[str, str]]:
    """A throwaway PostgreSQL and SeaweedFS on this machine (tests/services.py), stopped with stack:
    (a new database's DSN, an s3:// URL with a prefix of its own, the AWS_* variables that reach it)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from services import BUCKET, PostgresServer, SeaweedServer, running

    pg = stack.enter_context(running(PostgresServer))
    s3 = stack.enter_context(running(SeaweedServer))
    assert isinstance(pg, PostgresServer) and isinstance(s3, SeaweedServer)
    return pg.new_database(database), f"s3://{BUCKET}/{database}", s3.env


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
