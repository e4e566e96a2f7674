"""Hostile modules against the agent, and what their neighbours see: real registry, real Wasmtime workers,
real HTTP on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import wasmtime
from agent_helpers import FD_WRITE, LOOP, WASI, echo_module, in_process_agent, parse_echo, printing_module
from helpers import wait_until
from registry_helpers import start_registry
from test_agent import publish
from test_up import free_ports


async def test_two_modules_with_identical_bytes_do_not_share_their_in_flight_cap(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """max_in_flight and the worker cap are per configured module: a flood of one never refuses another that
    happens to have the same bytes."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:spin@1.0.0", LOOP)
    await publish(api, "beta:spin@1.0.0", LOOP)  # the same bytes, another module
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:spin@1.0.0": "one_at_a_time", "beta:spin@1.0.0": "one_at_a_time"},
                               workers=3)
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        first = asyncio.ensure_future(a.runs.get("/run/acme/spin"))
        await wait_until(lambda: a.sandbox.status()["busy"] == 1, "acme:spin to run")
        r = await a.runs.get("/run/acme/spin")  # its own cap of 1
        assert r.status == 503 and (await r.json())["error"] == "SandboxBusy"
        r = await a.runs.get("/run/beta/spin")  # not acme's cap: it runs (and loops to its deadline)
        assert r.status == 504 and (await r.json())["error"] == "DeadlineExceeded"
        assert (await first).status == 504
    finally:
        await a.close()


def writing_module(writes: int) -> bytes:
    """A WASI command that writes 64 KiB of zeros to stdout writes times (no header block: all body)."""
    return bytes(wasmtime.wat2wasm(f'''(module
  {FD_WRITE}
  (memory (export "memory") 2)
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $more
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const {writes}))))))'''))


def exiting_module(code: int) -> bytes:
    """A WASI command that writes a CGI answer, then exits with code."""
    return bytes(wasmtime.wat2wasm(f'''(module
  {FD_WRITE}
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\\n\\nhalf an answer\\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 40))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const {code}))))'''))


HUGE_HEADER = b"X-A: " + b"a" * 70_000 + b"\n\nbody"
MANY_HEADERS = b"".join(b"X-%d: v\n" % i for i in range(101)) + b"\nbody"
HOSTILE = {
    "acme:big@1.0.0": writing_module(64),  # 4 MiB: within the bound, served
    "acme:flood@1.0.0": writing_module(1 << 30),  # writes until the bound stops it
    "acme:s999@1.0.0": printing_module(b"Status: 999 Whatever\n\nbody"),
    "acme:s103@1.0.0": printing_module(b"Status: 103 Early Hints\n\nbody"),
    "acme:crlf@1.0.0": printing_module(b"Status: 200\r\nX-Evil: a\rSet-Cookie: x=1\r\n\r\nbody"),
    "acme:cookie@1.0.0": printing_module(b"Set-Cookie: sid=planted; Domain=127.0.0.1; Path=/\nLocation: http://elsewhere.example/\n\n"),
    "acme:hugehdr@1.0.0": printing_module(HUGE_HEADER, pages=2),
    "acme:manyhdr@1.0.0": printing_module(MANY_HEADERS),
    "acme:exit3@1.0.0": exiting_module(3),
    "acme:hello@1.0.0": printing_module(b"Content-Type: text/plain\n\nhello\n"),
}


async def test_hostile_output_is_bounded_never_a_500_and_never_costs_a_worker(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    for ref, module in HOSTILE.items():
        await publish(api, ref, module)
    profiles = {ref: "exiting" if "exit" in ref else "stdout" for ref in HOSTILE}
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], profiles)
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}

        async def run(name: str) -> tuple[int, bytes, Any]:
            r = await a.runs.get(f"/run/acme/{name}", allow_redirects=False)
            return r.status, await r.read(), r.headers

        status, body, _ = await run("big")
        assert status == 200 and body == bytes(64 << 16)
        status, body, _ = await run("flood")
        assert status == 502 and b"output too large" in body
        for name in ("s999", "s103"):
            status, body, _ = await run(name)
            assert status == 502 and json.loads(body)["error"] == "CgiError", (name, body)
        status, body, headers = await run("crlf")  # a CR inside a header: no header block at all, all body
        assert (status, body) == (200, b"Status: 200\r\nX-Evil: a\rSet-Cookie: x=1\r\n\r\nbody")
        assert "X-Evil" not in headers and "Set-Cookie" not in headers and headers["Content-Type"] == "text/plain; charset=utf-8"
        status, body, headers = await run("cookie")
        assert status == 302 and headers["Location"] == "http://elsewhere.example/"
        assert "Set-Cookie" not in headers  # cookies ignore ports: it would land on every service of this host
        for name, text in (("hugehdr", HUGE_HEADER), ("manyhdr", MANY_HEADERS)):  # over the header block's bounds: all body
            status, body, headers = await run(name)
            assert (status, body) == (200, text) and "X-A" not in headers and "X-1" not in headers, name
        status, body, _ = await run("exit3")
        assert status == 502 and json.loads(body)["error"] == "Trapped" and b"exited with status 3" in body
        assert (await run("hello"))[:2] == (200, b"hello\n")
        sandbox = a.sandbox.status()
        assert sandbox.get("worker_restarts", 0) == 0 and sandbox["alive"] == sandbox["workers"]
    finally:
        await a.close()


CGI_VARIABLES = {"GATEWAY_INTERFACE", "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
                 "SERVER_NAME", "SERVER_PORT", "SERVER_SOFTWARE", "CONTENT_TYPE", "CONTENT_LENGTH"}


async def test_the_module_sees_exactly_the_cgi_variables_and_its_profile_env_and_a_bounded_stdin(  # type: ignore[no-untyped-def]
        aiohttp_client, tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setenv("WASMLOG_CANARY", "host-secret")  # in the agent's environment: never in a module's
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:echo@1.0.0", echo_module())
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:echo@1.0.0": "cgi"})
    try:
        r = await a.runs.get("/run/acme/echo/p?q=1", headers={"X-One": "1"}, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        assert r.status == 200
        env, stdin = parse_echo(await r.read())
        assert set(env) == CGI_VARIABLES | {"HTTP_HOST", "HTTP_X_ONE", "GREETING"}, sorted(env)
        assert (env["PATH_INFO"], env["QUERY_STRING"], env["GREETING"], stdin) == ("/p", "q=1", "from the profile", b"")
        for host, name, port in (("[::1]:7400", "[::1]", "7400"), ("[::1]", "[::1]", ""), ("edge.example:8080", "edge.example", "8080"),
                                 ("edge.example", "edge.example", "")):
            r = await a.runs.get("/run/acme/echo", headers={"Host": host})
            env, _ = parse_echo(await r.read())
            assert (env["SERVER_NAME"], env["SERVER_PORT"], env["HTTP_HOST"]) == (name, port, host)

        body = bytes(range(256)) * 4096  # 1 MiB: the most a request may carry
        r = await a.runs.post("/run/acme/echo", data=body)
        assert r.status == 200 and parse_echo(await r.read())[1] == body

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(32):
                yield bytes(64 << 10)  # 2 MiB with no Content-Length

        r = await a.runs.post("/run/acme/echo", data=chunks())
        assert r.status == 413
        r = await a.runs.post("/run/acme/echo", data=b"x" * ((1 << 20) + 1))
        assert r.status == 413
    finally:
        await a.close()


async def test_the_module_listener_names_the_reason_never_the_agents_sources_or_paths(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """A 403 on the public listener says which module and why (state, reason code); the sources it was fetched from
    and the data directory stay on the admin listener."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    hello = printing_module(b"hello\n")
    await publish(api, "acme:hello@1.0.0", hello)
    await publish(api, "acme:other@1.0.0", printing_module(b"other\n"))
    down = f"http://127.0.0.1:{free_ports(1)}"  # nothing listens there
    a = await in_process_agent(aiohttp_client, tmp_path, [down, api.url], {"acme:hello@1.0.0": "stdout", "acme:other@1.0.0": "stdout",
                                                                          "acme:absent@1.0.0": "stdout"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        status = {m["ref"]: m for m in (await (await a.admin.get("/status")).json())["modules"]}
        assert status["acme:absent@1.0.0"]["state"] == "refused" and down in str(status["acme:absent@1.0.0"]["message"])
        r = await a.runs.get("/run/acme/absent")
        body = await r.json()
        assert r.status == 403 and body["error"] == "ModuleNotServed" and status["acme:absent@1.0.0"]["reason"] in body["message"]
        assert down not in body["message"] and api.url not in body["message"], body
        for artifact in (a.agent.config.data / "artifacts").glob("*"):
            artifact.unlink()
        digest = hashlib.sha256(printing_module(b"other\n")).hexdigest()
        a.agent.store.path(digest).write_bytes(hello)  # tampered: the request that must compile it finds out
        r = await a.runs.get("/run/acme/other")
        body = await r.json()
        assert r.status == 403 and body["error"] == "IntegrityError" and "acme:other@1.0.0" in body["message"]
        assert str(tmp_path) not in body["message"], body
        (m,) = [m for m in (await (await a.admin.get("/status")).json())["modules"] if m["ref"] == "acme:other@1.0.0"]
        assert (m["state"], m["reason"]) == ("quarantined", "integrity") and str(a.agent.store.path(digest)) in m["message"]
    finally:
        await a.close()


async def test_a_crashed_worker_is_a_502_that_names_the_module_never_the_workers_pid(aiohttp_client, tmp_path: pathlib.Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A run worker killed mid-request answers 502 WorkerCrashed on the public listener; its pid and how it died
    are in the agent's log (and telemetry), not in the caller's answer."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:spin@1.0.0", LOOP)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:spin@1.0.0": "one_at_a_time"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        run = asyncio.ensure_future(a.runs.get("/run/acme/spin"))
        await wait_until(lambda: a.sandbox.status()["busy"] == 1, "acme:spin to run")
        pids = a.sandbox.status()["pids"]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        r = await run
        body = await r.json()
        assert r.status == 502 and body["error"] == "WorkerCrashed" and "acme:spin@1.0.0" in body["message"], body
        assert not any(str(pid) in body["message"] for pid in pids), body
        assert any("died" in record.getMessage() and any(str(pid) in record.getMessage() for pid in pids) for record in caplog.records)
    finally:
        await a.close()
