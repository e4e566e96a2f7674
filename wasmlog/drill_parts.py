"""What `wasmlog drill` plays with: its network (`wasmlog up` on free loopback ports), the agent as a
real process, a namespace monitor following the log, and the releases of the scenario (WASI modules
written as WAT, CycloneDX SBOMs)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pathlib
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp

from registry.audit import Event, make_auditor
from registry.audit_state import AuditState
from registry.client import RegistryClient
from tlog.note import Verifier

from .network import COLLECTOR_PORT_OFFSET, NetworkConfig, run_network

WASI = "wasi_snapshot_preview1"
GRANTED_IMPORT = f"{WASI}.fd_write"  # what the agent's profile grants the module: writing its answer
ESCALATED_IMPORT = f"{WASI}.sock_accept"  # what the attacker's release adds: taking network connections
EVIL_COMPONENT = "pkg:npm/flatmap-stream"  # what the attacker's SBOM adds
START_TIMEOUT = 60.0  # seconds for the network or the agent to come up


class DrillError(Exception):
    """The drill could not set up its network or its agent (not a step that misbehaved)."""


def hello_module(version: str, *, escalate: bool = False) -> bytes:
    """A WASI command answering "hello from VERSION" (fd_write; with escalate, it also imports sock_accept)."""
    try:
        import wasmtime  # the sandbox extra: the agent needs it anyway
    except ImportError:
        raise DrillError("the drill needs the sandbox extra (Wasmtime): pip install 'wasmlog[sandbox]'") from None

    text = f"hello from {version}\n"
    extra = f'(import "{WASI}" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))' if escalate else ""
    return bytes(wasmtime.wat2wasm(f'''(module
  (import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  {extra}
  (memory (export "memory") 1)
  (data (i32.const 64) "{text.strip()}\\0a")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(text)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))'''))


def hello_sbom(version: str, *, evil: bool = False) -> bytes:
    """A CycloneDX SBOM of the hello module: one library (two with evil: EVIL_COMPONENT added)."""
    components = [{"type": "library", "name": "wasi-hello", "version": "1.0.0", "purl": "pkg:cargo/wasi-hello@1.0.0"}]
    if evil:
        components.append({"type": "library", "name": "flatmap-stream", "version": "0.1.1", "purl": f"{EVIL_COMPONENT}@0.1.1"})
    return json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
                       "metadata": {"component": {"type": "application", "name": "hello", "version": version}},
                       "components": components}).encode()


def free_port_range(n: int) -> int:
    """A port p with p..p+n-1 free just now (best effort: start_network retries when one is taken meanwhile)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise DrillError(f"no range of {n} free loopback ports")


@contextlib.asynccontextmanager
async def network(data: pathlib.Path) -> AsyncIterator[tuple[str, str]]:
    """`wasmlog up`'s network (registry and log, three witnesses, 2-of-3 quorum, the telemetry collector)
    in data, on free loopback ports; yields the registry's URL and the collector's (its /v1/logs) and
    stops the network on exit."""
    for _ in range(10):
        port = free_port_range(COLLECTOR_PORT_OFFSET + 1)
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run_network(NetworkConfig(data=data, port=port, announce=False), ready=ready, stop=stop))
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, waiter}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            try:
                yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + COLLECTOR_PORT_OFFSET}/v1/logs"
            finally:
                stop.set()
                await task
            return
        waiter.cancel()
        if task not in done:
            task.cancel()
            raise DrillError(f"the network did not come up within {START_TIMEOUT:.0f} s")
        e = task.exception()
        if not (isinstance(e, OSError) and e.errno == errno.EADDRINUSE):
            raise DrillError(f"the network did not start: {e!r}")
    raise DrillError("the network's ports were taken ten times in a row")


class AgentProcess:
    """`python -m wasmlog agent serve --config FILE` as a real process (its sandbox workers are processes of its own)."""

    def __init__(self, config: pathlib.Path) -> None:
        self.config = config
        self.stderr = config.parent / "agent.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""  # its module listener (/run/...)
        self.admin = ""  # its admin listener (/status, POST /sweep)

    async def start(self) -> str:
        with open(self.stderr, "ab") as err:  # noqa: ASYNC230 -- once, before the child starts
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(self.config),
                stdout=asyncio.subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        for what in (b"", b" admin"):  # it prints its module listener, then its admin listener
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
            except TimeoutError:
                line = b""
            m = re.match(rb"wasmlog agent" + what + rb": (http://\S+)", line)
            if m is None:
                await self.stop()
                raise DrillError(f"the agent did not start: {self.stderr_tail()}")
            url = m[1].decode().rstrip("/")
            self.url, self.admin = (url, self.admin) if not what else (self.url, url)
        return self.url

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.stderr.read_text("utf-8", "replace").strip().splitlines()[-lines:]) or "(no output)"
        except OSError as e:
            return f"(its stderr cannot be read: {e})"

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Monitor:
    """A namespace monitor (the code of `wasmlog monitor --follow`), following the log every interval
    seconds; each event is kept with the monotonic time it was reported."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, verifiers: Sequence[Verifier], namespace: str,
                 expected_keys: frozenset[str], interval: float = 0.1) -> None:
        self.events: list[tuple[float, Event]] = []
        self.errors: list[str] = []
        self.interval = interval
        self._changed = asyncio.Event()
        self.auditor = make_auditor(log_url=registry + "/log", session=session, verifiers=verifiers, state=AuditState(),
                                    namespaces=frozenset({namespace}), expected_keys=expected_keys,
                                    sbom_source=RegistryClient(registry, session), on_event=self._seen)

    def _seen(self, event: Event) -> None:
        self.events.append((time.monotonic(), event))
        self._changed.set()

    async def follow(self) -> None:
        while True:
            try:
                await self.auditor.run()
            except Exception as e:  # noqa: BLE001 -- kept for the detect step to name; the monitor goes on following
                self.errors.append(repr(e))
            await asyncio.sleep(self.interval)

    async def until(self, found: Callable[[], bool], timeout: float) -> bool:
        """Whether found() holds within timeout seconds (asked again after each new event)."""
        deadline = time.monotonic() + timeout
        while not found():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True
