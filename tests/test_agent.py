"""The edge agent with real parts: a real registry and its log on loopback, real keys, real WASI
modules written as WAT and published, the agent as a real process (or in-process with its real
sandbox where a process is not needed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import re
import sys
import time
from typing import Any

import aiohttp
import pytest
import wasmtime
from agent_helpers import (
    NET_MODULE_IMPORT,
    ROOT,
    AgentProcess,
    echo_module,
    in_process_agent,
    mirror_app,
    parse_echo,
    printing_module,
    write_config,
)
from aiohttp import web
from helpers import wait_until
from registry_helpers import release_envelope, start_registry, with_custom_section
from test_up import free_ports

from edge.agent_state import StateFile, state_key
from edge.artifacts import load_or_create_key
from registry.client import RegistryClient
from registry.dsse import parse_envelope
from registry.record import Action, parse_package_ref, record_for
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof
from wasmlog.network import NetworkConfig, run_network

ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
HELLO = printing_module(b"Content-Type: text/plain\n\nhello from acme\n")
OTHER = printing_module(b"Content-Type: text/plain\n\nthe other one\n")
EVIL = printing_module(b"Content-Type: text/plain\n\nEVIL tampered bytes\n")  # same imports as HELLO
NETTY = printing_module(b"never run\n", NET_MODULE_IMPORT)


async def publish(api: RegistryClient, ref: str, module: bytes | bytearray, signer: Ed25519Signer = ALICE) -> None:
    await api.publish(signer, parse_package_ref(ref), bytes(module))


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, Any]:
    async with session.get(url) as r:
        return r.status, await r.read(), r.headers


async def status_of(session: aiohttp.ClientSession, url: str) -> dict[str, dict[str, Any]]:
    async with session.get(url + "/status") as r:
        assert r.status == 200
        return {m["ref"]: m for m in (await r.json())["modules"]}


async def sweep(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.post(url + "/sweep") as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def test_admission_refusal_by_capability_and_wagi(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:echo@1.0.0", echo_module())
    await publish(api, "acme:netty@1.0.0", NETTY)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:hello@1.0.0": "stdout", "acme:echo": "cgi", "acme:netty@1.0.0": "stdout"})
    agent = AgentProcess(cfg)
    url = await agent.start()
    try:
        async with aiohttp.ClientSession() as s:
            mods = await status_of(s, agent.admin)
            hello, echo, netty = mods["acme:hello@1.0.0"], mods["acme:echo"], mods["acme:netty@1.0.0"]
            assert hello["state"] == "admitted" and hello["digest"] == hashlib.sha256(HELLO).hexdigest() and hello["log_index"] >= 0
            assert echo["state"] == "admitted" and echo["version"] == "1.0.0" and echo["profile"] == "cgi"
            assert netty["state"] == "refused" and netty["reason"] == "capability" and "sock_accept" in netty["message"]
            stored = cfg.parent / "agent-data" / "modules" / "sha256"
            assert (stored / hello["digest"]).read_bytes() == HELLO
            assert not (stored / hashlib.sha256(NETTY).hexdigest()).exists()  # refused before it is stored, let alone run

            code, body, headers = await get(s, url + "/run/acme/hello")
            assert (code, body, headers["Content-Type"]) == (200, b"hello from acme\n", "text/plain")
            code, body, _ = await get(s, url + "/run/acme/netty")
            assert code == 403 and b"capability" in body
            assert (await get(s, url + "/run/acme/nothing"))[0] == 404
            assert (await get(s, url + "/run/other/hello"))[0] == 404

            async with s.post(url + "/run/acme/echo/a/b%20c?x=1&y=t%20o", data=b"ping\x00pong", headers={
                    "Content-Type": "application/x-thing", "X-Request-Id": "r-1", "GREETING": "from the client",
                    "Cookie": "session=secret", "Authorization": "Bearer secret", "Proxy-Authorization": "Basic c2VjcmV0",
                    "Proxy": "http://evil.example", "Connection": "keep-alive, X-Hop", "X-Hop": "hop"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/x-echo" and r.headers["X-Module"] == "echo"
                env, stdin = parse_echo(await r.read())
            assert stdin == b"ping\x00pong"
            assert env["REQUEST_METHOD"] == "POST" and env["PATH_INFO"] == "/a/b c" and env["QUERY_STRING"] == "x=1&y=t%20o"
            assert env["CONTENT_TYPE"] == "application/x-thing" and env["CONTENT_LENGTH"] == "9"
            assert env["GATEWAY_INTERFACE"] == "CGI/1.1" and env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["SCRIPT_NAME"] == "/run/acme/echo"
            assert env["HTTP_X_REQUEST_ID"] == "r-1" and env["GREETING"] == "from the profile"
            assert not any(k in env for k in ("PATH", "HOME", "PYTHONPATH"))  # nothing else from the host
            assert not [v for v in env.values() if "secret" in v or "c2VjcmV0" in v or "evil" in v]  # no credentials, no proxy
            assert not any(k in env for k in ("HTTP_COOKIE", "HTTP_AUTHORIZATION", "HTTP_PROXY", "HTTP_CONNECTION", "HTTP_X_HOP"))

            async with s.get(agent.admin + "/metrics") as r:
                text = await r.text()
            assert 'wasmlog_agent_modules{state="refused"} 1.0' in text and 'wasmlog_agent_modules{state="admitted"} 2.0' in text
            assert (await get(s, agent.admin + "/healthz"))[0] == 200
            assert (await get(s, url + "/run/acme/echo/a%00b"))[0] == 400  # no environment carries a NUL
            async with s.post(url + "/run/acme/hello", data=b"x" * (2 << 20)) as r:
                assert r.status == 413
            # the module listener serves modules only; the admin listener no module
            assert agent.admin != url
            for path in ("/status", "/metrics", "/healthz"):
                assert (await get(s, url + path))[0] == 404, path
            async with s.post(url + "/sweep") as r:
                assert r.status in (404, 405)
            assert (await get(s, agent.admin + "/run/acme/hello"))[0] == 404
    finally:
        assert await agent.stop() == 0


def agent_state(data: pathlib.Path) -> StateFile:
    return StateFile(data, state_key(load_or_create_key(data / "artifact.key")))


async def test_a_yank_stops_a_module_at_the_next_sweep_and_sigkill_keeps_it_stopped(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, registry_client, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:echo@1.0.0", echo_module())
    await publish(api, "acme:netty@1.0.0", NETTY)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:hello@1.0.0": "stdout", "acme:echo": "cgi", "acme:netty@1.0.0": "stdout"})
    agent = AgentProcess(cfg)
    url = await agent.start()
    async with aiohttp.ClientSession() as s:
        assert [m["state"] for m in (await status_of(s, agent.admin)).values()] == ["admitted", "admitted", "refused"]
        result = await sweep(s, agent.admin)  # nothing changed: nothing moves
        assert not any(m["changed"] for m in result["modules"]) and result["checkpoint"]["accepted"]

        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=2, reason="CVE-1"))
        assert (await get(s, url + "/run/acme/hello"))[0] == 200  # until the next sweep
        await publish(api, "acme:echo@1.1.0", with_custom_section(echo_module(), 8))  # a newer release
        result = await sweep(s, agent.admin)
        moved = {m["ref"]: m for m in result["modules"]}
        assert moved["acme:hello@1.0.0"]["state"] == "quarantined" and moved["acme:hello@1.0.0"]["reason"] == "yanked"
        assert moved["acme:hello@1.0.0"]["digest"] == hashlib.sha256(HELLO).hexdigest()  # the release that stopped
        assert moved["acme:echo"]["state"] == "admitted" and moved["acme:echo"]["version"] == "1.1.0" and moved["acme:echo"]["changed"]
        code, body, _ = await get(s, url + "/run/acme/hello")
        assert code == 403 and b"yanked" in body

        await api.act(ALICE, Action("yank", "acme", name="echo", version="1.1.0", issued=4))
        moved = {m["ref"]: m for m in (await sweep(s, agent.admin))["modules"]}
        assert moved["acme:echo"]["state"] == "admitted" and moved["acme:echo"]["version"] == "1.0.0"  # back to the newest good one

        await agent.kill()
        data = cfg.parent / "agent-data"
        state = agent_state(data).load()
        assert state is not None and state["acme:hello@1.0.0"].state == "quarantined" and state["acme:netty@1.0.0"].state == "refused"
        await registry_client.close()  # the start-up sweep can check nothing: the state on disk decides
        agent = AgentProcess(cfg)
        url = await agent.start()
        try:
            status = await (await s.get(agent.admin + "/status")).json()
            assert status["started"]["state_file"] == "verified"
            assert status["last_sweep"]["trigger"] == "start" and status["sweeps"] == 1  # swept before serving
            assert {f["ref"] for f in status["last_sweep"]["findings"] if f["kind"] == "unavailable"} == set(state)
            mods = {m["ref"]: m for m in status["modules"]}
            assert mods["acme:hello@1.0.0"]["state"] == "quarantined" and mods["acme:hello@1.0.0"]["reason"] == "yanked"
            assert mods["acme:netty@1.0.0"]["state"] == "refused" and mods["acme:echo"]["state"] == "admitted"
            for name in ("hello", "netty"):
                assert (await get(s, url + f"/run/acme/{name}"))[0] == 403, name
            code, body, _ = await get(s, url + "/run/acme/echo")
            assert code == 200 and parse_echo(body)[0]["REQUEST_METHOD"] == "GET"
        finally:
            assert await agent.stop() == 0

        # state.json edited on disk (quarantined -> admitted): its MAC does not check, nothing is served from it
        text = (data / "state.json").read_text()
        edited = re.sub(r'"state": "quarantined",\s*"reason": "yanked"', '"state": "admitted", "reason": null', text)
        assert edited != text
        (data / "state.json").write_text(edited)
        agent = AgentProcess(cfg)
        url = await agent.start()
        try:
            status = await (await s.get(agent.admin + "/status")).json()
            assert status["started"]["state_file"].startswith("tampered") and "MAC" in status["started"]["state_file"]
            assert all(m["state"] == "refused" and m["reason"] == "registry-unreachable" for m in status["modules"]), status["modules"]
            for name in ("hello", "netty", "echo"):  # not even echo, admitted before: a sweep must verify it again first
                assert (await get(s, url + f"/run/acme/{name}"))[0] == 403, name
        finally:
            assert await agent.stop() == 0


async def test_a_tampered_module_is_never_run_and_is_quarantined_and_repaired(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:other@1.0.0", OTHER)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout", "acme:other@1.0.0": "stdout"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}  # both compiled from verified bytes at admission
        digest = hashlib.sha256(HELLO).hexdigest()
        stored = a.agent.store.path(digest)
        stored.write_bytes(EVIL)  # someone with disk access swaps the bytes
        # Its attested artifact is cached: the run is the verified module's, the swapped file is not even read.
        r = await a.runs.get("/run/acme/hello")
        assert (r.status, await r.read()) == (200, b"hello from acme\n")
        r = await a.admin.post("/sweep")
        result = await r.json()
        assert any(f["kind"] == "integrity" and f["digest"] == digest for f in result["findings"]), result
        assert stored.read_bytes() == HELLO  # fetched again, re-verified, stored
        (m, _) = result["modules"]
        assert m["state"] == "admitted" and m["digest"] == digest
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        stored.unlink()  # a missing file is an integrity finding too
        result = await (await a.admin.post("/sweep")).json()
        assert any(f["kind"] == "integrity" and f.get("message") == "missing" for f in result["findings"])
        assert stored.read_bytes() == HELLO

        # A module that must be compiled (no worker holds it, its artifact is gone): the swapped bytes are refused,
        # never compiled, and the module is quarantined at once; the next sweep repairs it.
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        other = hashlib.sha256(OTHER).hexdigest()
        compiled = a.sandbox.status()["compiled"]
        for artifact in (a.agent.config.data / "artifacts").glob(f"{other}.*"):
            artifact.unlink()
        a.agent.store.path(other).write_bytes(EVIL)
        r = await a.runs.get("/run/acme/other")
        assert r.status == 403 and (await r.json())["error"] == "IntegrityError"
        (m,) = [m for m in (await (await a.admin.get("/status")).json())["modules"] if m["ref"] == "acme:other@1.0.0"]
        assert (m["state"], m["reason"]) == ("quarantined", "integrity")
        r = await a.runs.get("/run/acme/other")
        assert r.status == 403 and (await r.json())["error"] == "ModuleNotServed"
        assert a.sandbox.status()["compiled"] == compiled and a.sandbox.status()["integrity_errors"] >= 1  # EVIL never compiled
        result = await (await a.admin.post("/sweep")).json()
        assert a.agent.store.path(other).read_bytes() == OTHER
        r = await a.runs.get("/run/acme/other")
        assert (r.status, await r.read()) == (200, b"the other one\n")
    finally:
        await a.close()


def proxy_app(target: str, session: aiohttp.ClientSession, old_checkpoint: list[bytes]) -> web.Application:
    """A mirror that, once old_checkpoint holds a note, serves it as its checkpoint."""
    return mirror_app(target, session, lambda request: web.Response(body=old_checkpoint[0], content_type="text/plain")
                      if request.path == "/log/checkpoint" and old_checkpoint else None)


async def test_a_registry_serving_an_older_checkpoint_is_refused(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    old = await api.get("/log/checkpoint")
    await publish(api, "acme:other@1.0.0", HELLO)
    await api.act(ALICE, Action("yank", "acme", name="other", version="1.0.0", issued=1))
    served_old: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        mirror = await aiohttp_server(proxy_app(api.url, session, served_old))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/")],
                                                        {"acme:hello@1.0.0": "stdout"})
        try:
            result = await (await a.admin.post("/sweep")).json()
            assert result["checkpoint"]["accepted"]
            (trusted,) = (await (await a.admin.get("/status")).json())["checkpoints"]
            assert trusted["size"] > int(old.split(b"\n")[1])
            served_old.append(old)  # the mirror rolls back
            result = await (await a.admin.post("/sweep")).json()
            assert not result["checkpoint"]["accepted"]
            (rollback,) = [f for f in result["findings"] if f["kind"] == "rollback"]
            assert rollback["size"] == int(old.split(b"\n")[1]) and rollback["known_size"] == trusted["size"]
            status = await (await a.admin.get("/status")).json()
            assert status["checkpoints"][0]["size"] == trusted["size"]  # the newer checkpoint is kept
            assert status["modules"][0]["state"] == "admitted"
        finally:
            await a.close()


async def test_an_unreachable_registry_leaves_admitted_modules_serving(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, client_r, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        await client_r.close()  # the registry goes away
        started = time.monotonic()
        result = await (await a.admin.post("/sweep")).json()
        assert time.monotonic() - started < 60
        assert any(f["kind"] == "unavailable" and f["reason"] == "registry-unreachable" for f in result["findings"]), result
        assert result["modules"][0]["state"] == "admitted"
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 200
    finally:
        await a.close()


@pytest.mark.parametrize("ref", ["acme:hello@2.0.0", "acme:missing"])
async def test_a_release_the_registry_does_not_have_is_refused(aiohttp_client, tmp_path, ref: str) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {ref: "stdout"})
    try:
        (m,) = (await (await a.admin.get("/status")).json())["modules"]
        assert m["state"] == "refused" and m["reason"] == "not-found"
        name = ref.split(":")[1].split("@", maxsplit=1)[0]
        assert (await a.runs.get(f"/run/acme/{name}")).status == 403
    finally:
        await a.close()


def mirror_withholding(api_url: str, session: aiohttp.ClientSession, extra: dict[str, bytes], withhold: list[bool]) -> web.Application:
    """A mirror of the registry that also serves the paths in extra (a release logged behind the
    registry's back) and, while withhold[0], answers no actions for acme (it hides a revocation)."""

    def answer(request: web.Request) -> web.Response | None:
        if request.path == "/api/v1/namespaces/acme/actions" and withhold[0]:
            return web.json_response({"proofs": [], "next": None})
        return web.Response(body=extra[request.path]) if request.path in extra else None

    return mirror_app(api_url, session, answer)


async def test_a_release_by_a_key_revoked_before_it_stops_at_the_next_sweep(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bob's key is revoked; a release signed by it is logged after the revocation anyway (a
    compromised front-end), and a mirror hides the revocation: the agent admits it, until a sweep
    sees the revocation."""
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=2))
    bobs = printing_module(b"bob's\n")
    env = release_envelope(BOB, parse_package_ref("acme:bobs@1.0.0"), bobs, None)
    index = parse_tlog_proof(await registry.sequencer.add(record_for("release", BOB.vkey, parse_envelope(env)).encode())).index
    base = "/api/v1/packages/acme/bobs/1.0.0"
    withhold = [True]
    async with aiohttp.ClientSession() as session:
        extra = {base + "/tlog-proof": registry.tlog_proof(index)[0], base + "/module.wasm": bobs}
        mirror = await aiohttp_server(mirror_withholding(api.url, session, extra, withhold))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/")],
                                                        {"acme:hello@1.0.0": "stdout", "acme:bobs@1.0.0": "stdout"})
        try:
            assert [m["state"] for m in (await (await a.admin.get("/status")).json())["modules"]] == ["admitted", "admitted"]
            r = await a.runs.get("/run/acme/bobs")
            assert r.status == 200 and await r.read() == b"bob's\n"
            withhold[0] = False
            extra[base + "/tlog-proof"] = registry.tlog_proof(index)[0]
            result = await (await a.admin.post("/sweep")).json()
            moved = {m["ref"]: m for m in result["modules"]}
            assert moved["acme:bobs@1.0.0"]["state"] == "quarantined" and moved["acme:bobs@1.0.0"]["reason"] == "key-revoked"
            assert moved["acme:hello@1.0.0"]["state"] == "admitted"  # signed by alice: unaffected
            r = await a.runs.get("/run/acme/bobs")
            assert r.status == 403 and b"key-revoked" in await r.read()
            assert (await a.runs.get("/run/acme/hello")).status == 200
        finally:
            await a.close()


SPIN = wasmtime.wat2wasm('(module (func (export "_start") (loop $l (br $l))))')
BOMB = wasmtime.wat2wasm('''(module (memory 1)
  (func (export "_start") (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))''')


async def test_a_runaway_loop_and_a_memory_bomb_are_stopped_while_others_keep_serving(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    for ref, module in (("acme:hello@1.0.0", HELLO), ("acme:spin@1.0.0", SPIN), ("acme:bomb@1.0.0", BOMB)):
        await publish(api, ref, module)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url],
                                                    {"acme:hello@1.0.0": "stdout", "acme:spin@1.0.0": "small", "acme:bomb@1.0.0": "small"})
    try:
        assert all(m["state"] == "admitted" for m in (await (await a.admin.get("/status")).json())["modules"])
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}  # no run below waits for a compile
        spin = asyncio.ensure_future(a.runs.get("/run/acme/spin"))
        hello = asyncio.ensure_future(a.runs.get("/run/acme/hello"))
        done, _ = await asyncio.wait({spin, hello}, return_when=asyncio.FIRST_COMPLETED)
        assert hello in done and (await hello).status == 200  # served while the loop still runs
        r = await spin
        assert r.status == 504 and (await r.json())["error"] == "DeadlineExceeded"
        # The bomb (its memory not exported) is stopped by its 4 MiB cap, reported as such, not as a plain trap;
        # another module is served beside it.
        bomb = asyncio.ensure_future(a.runs.get("/run/acme/bomb"))
        hello = asyncio.ensure_future(a.runs.get("/run/acme/hello"))
        r = await bomb
        body = await r.json()
        assert (r.status, body["error"]) == (502, "MemoryExceeded") and "memory cap of 4 MiB reached" in body["message"], body
        assert (await hello).status == 200
        assert a.sandbox.status()["failed_memory"] == 1 and "failed_trap" not in a.sandbox.status()
        async with a.admin.get("/metrics") as m:
            assert 'wasmlog_agent_runs_total{module="acme:bomb@1.0.0",status="502"} 1.0' in await m.text()
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        assert (await a.admin.get("/healthz")).status == 200
    finally:
        await a.close()


async def test_a_flooded_runaway_module_cannot_hold_every_worker(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """More requests to a looping module than there are workers: one runs (max_in_flight 1), the excess is 503 with
    Retry-After at once, and another module keeps answering 200 on the workers the loop may not take."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:spin@1.0.0", SPIN)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url],
                                                    {"acme:hello@1.0.0": "stdout", "acme:spin@1.0.0": "one_at_a_time"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        first = asyncio.ensure_future(a.runs.get("/run/acme/spin"))
        await wait_until(lambda: a.sandbox.status()["busy"] == 1, "the loop to run")
        flood = await asyncio.gather(*(a.runs.get("/run/acme/spin") for _ in range(5)))  # 6 requests, 2 workers
        for r in flood:
            assert r.status == 503 and r.headers["Retry-After"] == "1" and (await r.json())["error"] == "SandboxBusy"
        for _ in range(3):
            r = await a.runs.get("/run/acme/hello")
            assert (r.status, await r.read()) == (200, b"hello from acme\n")
        assert not first.done() and a.sandbox.status()["busy"] == 1  # all of that while the loop still ran
        r = await first
        assert r.status == 504 and (await r.json())["error"] == "DeadlineExceeded"
        assert (await a.runs.get("/run/acme/spin")).status == 504  # its one slot is free again
    finally:
        await a.close()


async def test_a_request_that_cannot_start_within_its_deadline_answers_503(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """timeout_ms is per request: with every worker held by other modules' 3 s runs, a request whose deadline is
    2 s never starts; it answers 503 with Retry-After (the module did not run), not a 504 after a run."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    spin2 = wasmtime.wat2wasm('(module (func (export "_start") (loop $l (br $l))) (func (export "second")))')
    for ref, module in (("acme:hello@1.0.0", HELLO), ("acme:spin@1.0.0", SPIN), ("acme:spin2@1.0.0", bytes(spin2))):
        await publish(api, ref, module)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {
        "acme:hello@1.0.0": "stdout", "acme:spin@1.0.0": "one_at_a_time", "acme:spin2@1.0.0": "one_at_a_time"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        spins = [asyncio.ensure_future(a.runs.get(f"/run/acme/{name}")) for name in ("spin", "spin2")]
        await wait_until(lambda: a.sandbox.status()["busy"] == 2, "both workers to run a loop")
        r = await a.runs.get("/run/acme/hello")  # the stdout profile's deadline: 2000 ms
        body = await r.json()
        assert (r.status, r.headers["Retry-After"], body["error"]) == (503, "1", "NoWorkerInTime"), body
        assert not any(s.done() for s in spins)  # the loops (3 s) still held both workers
        assert [(await s).status for s in spins] == [504, 504]
        r = await a.runs.get("/run/acme/hello")
        assert (r.status, await r.read()) == (200, b"hello from acme\n")
    finally:
        await a.close()


async def test_the_first_request_after_admission_or_a_restart_finds_its_artifact_cached(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    digest = hashlib.sha256(HELLO).hexdigest()
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        assert len(list((a.agent.config.data / "artifacts").glob(f"{digest}.*.cwasm"))) == 1
        assert a.sandbox.status()["compiled"] == 1
        r = await a.runs.get("/run/acme/hello")
        assert (r.status, await r.read()) == (200, b"hello from acme\n")
        status = a.sandbox.status()
        assert status["compiled"] == 1 and status["artifacts_loaded"] == 1  # the request loaded it; it compiled nothing
    finally:
        await a.close()
    for artifact in (a.agent.config.data / "artifacts").glob("*.cwasm"):
        artifact.unlink()  # e.g. a new Wasmtime: nothing cached is valid any more
    restarted = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})  # the same data directory
    try:
        assert restarted.agent.started is not None and restarted.agent.started["state_file"] == "verified"
        assert restarted.agent.prewarming is not None and await restarted.agent.prewarming == {}
        assert len(list((a.agent.config.data / "artifacts").glob(f"{digest}.*.cwasm"))) == 1
    finally:
        await restarted.close()


async def test_each_sweep_rechecks_admitted_modules_against_the_current_trust_policy(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        policy_file = a.agent.config.trust_policy
        good = policy_file.read_text()
        policy_file.write_text(good + 'imports = "everything"\n')  # malformed: the previous policy stays in force
        result = await (await a.admin.post("/sweep")).json()
        assert any(f["kind"] == "trust-policy" and f["reason"] == "policy-malformed" for f in result["findings"])
        assert result["modules"][0]["state"] == "admitted"
        policy_file.write_text(good + f'[namespaces.acme]\nkeys = ["{BOB.vkey}"]\n')  # acme is now pinned to bob's key
        result = await (await a.admin.post("/sweep")).json()
        (m,) = result["modules"]
        assert m["state"] == "quarantined" and m["reason"] == "publisher-not-allowed" and m["changed"]
        assert (await a.runs.get("/run/acme/hello")).status == 403
        policy_file.write_text(good)  # and back: a sweep says so
        (m,) = (await (await a.admin.post("/sweep")).json())["modules"]
        assert m["state"] == "admitted" and m["previous"] == "quarantined"
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 200
    finally:
        await a.close()


async def test_sweeps_run_every_sweep_interval(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"}, periodic_sweeps=True,
                               workers=1, sweep_interval=1)
    try:
        assert a.agent.sweeps == 1  # the start-up sweep
        metrics = await (await a.admin.get("/metrics")).text()
        assert "wasmlog_agent_sweeps_total 1.0" in metrics  # counted, though it ran before the metrics existed
        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1))
        # the yank lands before the second periodic sweep starts at the latest
        await wait_until(lambda: a.agent.sweeps >= 3, "two periodic sweeps", 30)
        status = await (await a.admin.get("/status")).json()
        assert status["sweeps"] >= 3 and status["modules"][0]["state"] == "quarantined"
        assert status["last_sweep"]["trigger"] == "interval"
        async with a.admin.get("/metrics") as r:
            count = re.search(r"^wasmlog_agent_sweeps_total (\S+)$", await r.text(), re.MULTILINE)
        assert count is not None and float(count[1]) >= status["sweeps"]  # never behind /status
    finally:
        await a.close()


async def test_a_tampered_compiled_artifact_is_never_loaded_and_is_rebuilt(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}  # compiled and cached at admission
        digest = hashlib.sha256(HELLO).hexdigest()
        (artifact,) = (a.agent.config.data / "artifacts").glob(f"{digest}.*")
        data = bytearray(artifact.read_bytes())
        data[-1] ^= 1  # one bit of compiled code
        artifact.write_bytes(bytes(data))
        result = await (await a.admin.post("/sweep")).json()
        assert any(f["kind"] == "integrity" and f["what"] == "artifact" and f["digest"] == digest for f in result["findings"]), result
        (m,) = result["modules"]
        assert m["state"] == "admitted" and m["previous"] == "quarantined"  # quarantined, re-verified, admitted again in one sweep
        # The re-admission compiles the verified bytes again (a compile worker, whichever run worker serves next).
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        (rebuilt,) = (a.agent.config.data / "artifacts").glob(f"{digest}.*")
        assert rebuilt.read_bytes() != bytes(data) and a.sandbox.verify_cache() == []
        status = a.sandbox.status()
        assert status["compiled"] == 2 and status["artifacts_rejected"] == 1 and "artifacts_refused_by_wasmtime" not in status
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        assert "artifacts_refused_by_wasmtime" not in a.sandbox.status()  # the tampered bytes never reached Wasmtime
    finally:
        await a.close()


def readme_heredoc(name: str) -> str:
    """The text README.md's "Edge agent" section writes with `cat > NAME <<'TAG'`."""
    section = (ROOT / "README.md").read_text().split("## Edge agent", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"cat > {re.escape(name)} <<'(\w+)'\n(.*?)\n\1\n", section, re.DOTALL)
    assert m, name
    return m[2] + "\n"


def readme_command(start: str, port: int) -> str:
    """The line of README.md's "Edge agent" walkthrough that starts with start, its comment left out, to run in a
    shell with this interpreter's wasmlog and python, against the registry on port."""
    section = (ROOT / "README.md").read_text().split("## Edge agent", 1)[1].split("\n## ", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith(start)]
    line = re.sub(r"\s+# .*$", "", line).replace("127.0.0.1:7380", f"127.0.0.1:{port}")
    return re.sub(r"^(wasmlog|python) ", lambda m: f"{sys.executable} -m wasmlog " if m[1] == "wasmlog" else f"{sys.executable} ", line)


async def readme_shell(start: str, port: int, cwd: pathlib.Path) -> None:
    """Run the README's line starting with start in cwd (exit status 0, or the test fails with its stderr)."""
    proc = await asyncio.create_subprocess_shell(readme_command(start, port), cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (start, out, err)


async def test_the_readme_path_on_a_wasmlog_up_network(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """README "Edge agent", as written there: `wasmlog up` (witness quorum), keygen, the module, publish, the config,
    serve, run, yank, sweep; the shell lines run as they are written (wasmlog and python this interpreter's)."""
    port = free_ports(5)
    ready, stop = asyncio.Event(), asyncio.Event()
    network = asyncio.create_task(run_network(NetworkConfig(data=tmp_path / "wasmlog-data", port=port), ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        (tmp_path / "hello.wat").write_text(readme_heredoc("hello.wat"))
        for start in ("wasmlog keygen ", "python -c ", "wasmlog publish "):
            await readme_shell(start, port, tmp_path)
        async with aiohttp.ClientSession() as s:
            config = readme_heredoc("agent.toml").replace("127.0.0.1:7380", f"127.0.0.1:{port}")
            for listener in ("127.0.0.1:7400", "127.0.0.1:7401"):  # both are in the README's config
                assert f'"{listener}"' in config
                config = config.replace(listener, "127.0.0.1:0")
            (tmp_path / "agent.toml").write_text(config)
            agent = AgentProcess(tmp_path / "agent.toml")
            url = await agent.start()
            try:
                code, body, _ = await get(s, url + "/run/acme/hello")
                assert (code, body) == (200, b"hello\n")
                await readme_shell("wasmlog yank ", port, tmp_path)
                (m,) = (await sweep(s, agent.admin))["modules"]
                assert (m["state"], m["reason"]) == ("quarantined", "yanked")
                assert (await get(s, url + "/run/acme/hello"))[0] == 403
                async with s.get(agent.admin + "/status") as r:
                    status = await r.json()
                assert status["checkpoints"][0]["newest_cosignature"] is not None  # a witnessed checkpoint
            finally:
                assert await agent.stop() == 0
    finally:
        stop.set()
        await network


async def test_an_ns_name_whose_newest_release_escalates_is_quarantined_not_rolled_back(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """spec/agent.md "A newest release the profile refuses": the node fails closed. It does not keep
    serving (or fall back to) an older release the profile allows: only a proven withdrawal (a yank)
    takes it back, and a newer release the profile allows moves it on."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    escalated = printing_module(b"Content-Type: text/plain\n\nlistening\n", NET_MODULE_IMPORT)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello": "stdout"})
    try:
        assert (await a.runs.get("/run/acme/hello")).status == 200
        await publish(api, "acme:hello@1.1.0", escalated)
        for _ in range(2):  # and it stays so: nothing proved 1.1.0 withdrawn
            (m,) = (await (await a.admin.post("/sweep")).json())["modules"]
            assert (m["state"], m["reason"], m["version"]) == ("quarantined", "capability", "1.1.0")
            (m,) = (await (await a.admin.get("/status")).json())["modules"]
            assert m["digest"] == hashlib.sha256(escalated).hexdigest() and "sock_accept" in m["message"]
            r = await a.runs.get("/run/acme/hello")
            assert r.status == 403 and "capability" in await r.text()
        assert not (tmp_path / "edge" / "agent-data" / "modules" / "sha256" / hashlib.sha256(escalated).hexdigest()).exists()

        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.1.0", issued=2, reason="escalation"))
        (m,) = (await (await a.admin.post("/sweep")).json())["modules"]
        assert (m["state"], m["version"]) == ("admitted", "1.0.0")  # withdrawn: the newest good one again
        assert (await a.runs.get("/run/acme/hello")).status == 200
        await publish(api, "acme:hello@1.2.0", with_custom_section(HELLO, 8))
        (m,) = (await (await a.admin.post("/sweep")).json())["modules"]
        assert (m["state"], m["version"]) == ("admitted", "1.2.0")
    finally:
        await a.close()
