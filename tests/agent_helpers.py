"""Builders for the edge agent's tests: WASI command modules written as WAT, configs, the agent as a process."""

from __future__ import annotations

import asyncio
import inspect
import os
import pathlib
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import wasmtime
from aiohttp import web
from aiohttp.test_utils import TestClient
from registry_helpers import REGISTRY_KEY

from edge.agent import Agent
from edge.agent_config import parse_config
from edge.agent_server import make_apps, new_sandbox
from edge.sandbox import Sandbox

ROOT = pathlib.Path(__file__).resolve().parent.parent
WASI = "wasi_snapshot_preview1"
FD_WRITE = f'(import "{WASI}" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))'


def _wat_string(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\{b:02x}" for b in data)


def printing_module(text: bytes, extra_imports: str = "", pages: int = 1) -> bytes:
    """A WASI command whose _start writes text to stdout (fd_write only, plus extra_imports), with pages of memory."""
    return bytes(wasmtime.wat2wasm(f'''(module
  {FD_WRITE}
  {extra_imports}
  (memory (export "memory") {pages})
  (data (i32.const 64) "{_wat_string(text)}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(text)}))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))'''))


HEADER = b"Content-Type: text/x-echo\nX-Module: echo\n\n"


def echo_module() -> bytes:
    """A WASI command that answers a CGI header block, then its environment (NUL-separated), "\\n--\\n", then its stdin."""
    return bytes(wasmtime.wat2wasm(f'''(module
  {FD_WRITE}
  (import "{WASI}" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "{WASI}" "environ_get" (func $environ (param i32 i32) (result i32)))
  (memory (export "memory") 3)
  (data (i32.const 1024) "{_wat_string(HEADER)}")
  (data (i32.const 1536) "\\n--\\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (call $write (i32.const 1024) (i32.const {len(HEADER)}))
    (drop (call $sizes (i32.const 16) (i32.const 20)))
    (drop (call $environ (i32.const 2048) (i32.const 8192)))
    (call $write (i32.const 8192) (i32.load (i32.const 20)))
    (call $write (i32.const 1536) (i32.const 4))
    (block $done
      (loop $more
        (i32.store (i32.const 0) (i32.const 65536))
        (i32.store (i32.const 4) (i32.const 65536))
        (i32.store (i32.const 8) (i32.const 0))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (i32.eqz (i32.load (i32.const 8))))
        (call $write (i32.const 65536) (i32.load (i32.const 8)))
        (br $more)))))'''))


def parse_echo(body: bytes) -> tuple[dict[str, str], bytes]:
    env_part, _, stdin = body.partition(b"\n--\n")
    env = dict(item.decode().split("=", 1) for item in env_part.split(b"\x00") if item)
    return env, stdin


NET_MODULE_IMPORT = f'(import "{WASI}" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))'
TRUST_POLICY = f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nquorum none\n"""\n'
PROFILES = f'''
[profiles.stdout]
imports = ["{WASI}.fd_write"]
memory_mb = 16
timeout_ms = 2000

[profiles.cgi]
imports = ["{WASI}.fd_*", "{WASI}.environ_*"]
memory_mb = 16
timeout_ms = 2000
env = {{ GREETING = "from the profile" }}

[profiles.small]
imports = []
memory_mb = 4
timeout_ms = 300

[profiles.exiting]
imports = ["{WASI}.fd_write", "{WASI}.proc_exit"]
memory_mb = 16
timeout_ms = 2000

[profiles.one_at_a_time]
imports = []
memory_mb = 4
timeout_ms = 3000
max_in_flight = 1
'''


def write_config(d: pathlib.Path, registries: list[str], modules: dict[str, str], sweep_interval: int = 3600) -> pathlib.Path:
    """agent.toml (and trust-policy.toml) in d: modules maps ref -> profile. Listens on free loopback ports."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "trust-policy.toml").write_text(TRUST_POLICY)
    mods = "".join(f'\n[[modules]]\nref = "{ref}"\nprofile = "{profile}"\n' for ref, profile in modules.items())
    urls = ", ".join(f'"{u}"' for u in registries)
    text = (f'trust_policy = "trust-policy.toml"\nregistries = [{urls}]\ndata = "agent-data"\nlisten = "127.0.0.1:0"\n'
            f'admin_listen = "127.0.0.1:0"\nsweep_interval = {sweep_interval}\n{PROFILES}{mods}')
    (d / "agent.toml").write_text(text)
    return d / "agent.toml"


class AgentProcess:
    """`python -m wasmlog agent serve --config FILE` as a real process: url is its module listener, admin its admin listener."""

    def __init__(self, config: pathlib.Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.admin = ""

    async def start(self, deadline: float = 120.0) -> str:
        stderr = open(self.config.parent / "agent.stderr", "ab")  # noqa: SIM115 -- the child writes it
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )
        stderr.close()
        assert self.proc.stdout is not None
        for what in (b"", b" admin"):
            line = await asyncio.wait_for(self.proc.stdout.readline(), deadline)
            m = re.match(rb"wasmlog agent" + what + rb": (http://\S+)", line)
            assert m, (line, (self.config.parent / "agent.stderr").read_text())
            if what:
                self.admin = m[1].decode().rstrip("/")
            else:
                self.url = m[1].decode().rstrip("/")
        return self.url

    async def kill(self) -> None:
        """SIGKILL: no cleanup runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 60)
        return self.proc.returncode or 0


def mirror_app(target: str, session: aiohttp.ClientSession,
               answer: Callable[[web.Request], web.Response | Awaitable[web.Response | None] | None]) -> web.Application:
    """A mirror in front of the registry: answer(request) (a function or coroutine function) where it returns
    a response, the registry's answer otherwise."""

    async def forward(request: web.Request) -> web.Response:
        own = answer(request)
        if inspect.isawaitable(own):
            own = await own
        if own is not None:
            return own
        async with session.get(target + request.path_qs) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    return app


@dataclass
class InProcessAgent:
    """An agent in this process with its real sandbox: runs is a client of its module listener, admin of its admin one."""

    agent: Agent
    runs: TestClient[web.Request, web.Application]
    admin: TestClient[web.Request, web.Application]
    sandbox: Sandbox

    async def close(self) -> None:
        """Stop both listeners (the admin app's cleanup flushes and closes the telemetry spool), then the agent."""
        await self.runs.close()
        await self.admin.close()
        await self.agent.close()
        await self.sandbox.close()


async def in_process_agent(aiohttp_client, tmp_path: pathlib.Path, registries: list[str], modules: dict[str, str], *,  # type: ignore[no-untyped-def]
                           periodic_sweeps: bool = False, workers: int = 2, sweep_interval: int = 3600,
                           trust_policy: str | None = None, clock: Callable[[], float] | None = None) -> InProcessAgent:
    """trust_policy: the trust-policy.toml text (default TRUST_POLICY); clock: the agent's (default the real one)."""
    cfg = write_config(tmp_path / "edge", registries, modules, sweep_interval)
    if trust_policy is not None:
        (cfg.parent / "trust-policy.toml").write_text(trust_policy)
    config = parse_config(cfg.read_text(), cfg.parent)
    sandbox = new_sandbox(config, workers=workers)
    agent = Agent(config, sandbox) if clock is None else Agent(config, sandbox, clock=clock)
    await agent.start()
    runs_app, admin_app = make_apps(agent, periodic_sweeps=periodic_sweeps)
    return InProcessAgent(agent, await aiohttp_client(runs_app), await aiohttp_client(admin_app), sandbox)


LOOP = bytes(wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'))
