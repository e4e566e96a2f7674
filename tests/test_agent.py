"""The edge agent with real parts: a real registry and its log on loopback, real keys, real WASI
modules written as WAT and published, the agent as a real process (or in-process with its real
sandbox where a process is not needed)."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import wasmtime
from agent_helpers import (
    NET_MODULE_IMPORT,
    ROOT,
    AgentProcess,
    echo_module,
    parse_echo,
    printing_module,
    write_config,
)
from aiohttp import web
from registry_helpers import release_envelope, start_registry, with_custom_section
from test_up import free_ports

from edge.agent import Agent
from edge.agent_config import parse_config
from edge.agent_server import make_app, new_sandbox
from edge.agent_state import StateFile
from registry.client import RegistryClient
from registry.dsse import parse_envelope
from registry.record import Action, parse_package_ref, record_for
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof
from wasmlog.network import NetworkConfig, run_network

ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
HELLO = printing_module(b"Content-Type: text/plain\n\nhello from acme\n")
EVIL = printing_module(b"Content-Type: text/plain\n\nEVIL tampered bytes\n")  # same imports as HELLO
NETTY = printing_module(b"never run\n", NET_MODULE_IMPORT)


async def publish(api: RegistryClient, ref: str, module: bytes, signer: Ed25519Signer = ALICE) -> None:
    await api.publish(signer, parse_package_ref(ref), module)


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
            mods = await status_of(s, url)
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
                    "Content-Type": "application/x-thing", "X-Request-Id": "r-1", "GREETING": "from the client"}) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/x-echo" and r.headers["X-Module"] == "echo"
                env, stdin = parse_echo(await r.read())
            assert stdin == b"ping\x00pong"
            assert env["REQUEST_METHOD"] == "POST" and env["PATH_INFO"] == "/a/b c" and env["QUERY_STRING"] == "x=1&y=t%20o"
            assert env["CONTENT_TYPE"] == "application/x-thing" and env["CONTENT_LENGTH"] == "9"
            assert env["GATEWAY_INTERFACE"] == "CGI/1.1" and env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["SCRIPT_NAME"] == "/run/acme/echo"
            assert env["HTTP_X_REQUEST_ID"] == "r-1" and env["GREETING"] == "from the profile"
            assert not any(k in env for k in ("PATH", "HOME", "PYTHONPATH"))  # nothing else from the host

            async with s.get(url + "/metrics") as r:
                text = await r.text()
            assert 'wasmlog_agent_modules{state="refused"} 1.0' in text and 'wasmlog_agent_modules{state="admitted"} 2.0' in text
            assert (await get(s, url + "/healthz"))[0] == 200
            assert (await get(s, url + "/run/acme/echo/a%00b"))[0] == 400  # no environment carries a NUL
            async with s.post(url + "/run/acme/hello", data=b"x" * (2 << 20)) as r:
                assert r.status == 413
    finally:
        assert await agent.stop() == 0


async def test_a_yank_stops_a_module_at_the_next_sweep_and_sigkill_keeps_it_stopped(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:echo@1.0.0", echo_module())
    await publish(api, "acme:netty@1.0.0", NETTY)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:hello@1.0.0": "stdout", "acme:echo": "cgi", "acme:netty@1.0.0": "stdout"})
    agent = AgentProcess(cfg)
    url = await agent.start()
    async with aiohttp.ClientSession() as s:
        assert [m["state"] for m in (await status_of(s, url)).values()] == ["admitted", "admitted", "refused"]
        result = await sweep(s, url)  # nothing changed: nothing moves
        assert not any(m["changed"] for m in result["modules"]) and result["checkpoint"]["accepted"]

        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=2, reason="CVE-1"))
        assert (await get(s, url + "/run/acme/hello"))[0] == 200  # until the next sweep
        await publish(api, "acme:echo@1.1.0", with_custom_section(echo_module(), 8))  # a newer release
        result = await sweep(s, url)
        moved = {m["ref"]: m for m in result["modules"]}
        assert moved["acme:hello@1.0.0"]["state"] == "quarantined" and moved["acme:hello@1.0.0"]["reason"] == "yanked"
        assert moved["acme:hello@1.0.0"]["digest"] == hashlib.sha256(HELLO).hexdigest()  # the release that stopped
        assert moved["acme:echo"]["state"] == "admitted" and moved["acme:echo"]["version"] == "1.1.0" and moved["acme:echo"]["changed"]
        code, body, _ = await get(s, url + "/run/acme/hello")
        assert code == 403 and b"yanked" in body

        await api.act(ALICE, Action("yank", "acme", name="echo", version="1.1.0", issued=4))
        moved = {m["ref"]: m for m in (await sweep(s, url))["modules"]}
        assert moved["acme:echo"]["state"] == "admitted" and moved["acme:echo"]["version"] == "1.0.0"  # back to the newest good one

        await agent.kill()
        state = StateFile(cfg.parent / "agent-data").load()
        assert state["acme:hello@1.0.0"].state == "quarantined" and state["acme:netty@1.0.0"].state == "refused"
        agent = AgentProcess(cfg)
        url = await agent.start()
        try:
            mods = await status_of(s, url)
            assert mods["acme:hello@1.0.0"]["state"] == "quarantined" and mods["acme:hello@1.0.0"]["reason"] == "yanked"
            assert mods["acme:netty@1.0.0"]["state"] == "refused" and mods["acme:echo"]["state"] == "admitted"
            for name in ("hello", "netty"):
                assert (await get(s, url + f"/run/acme/{name}"))[0] == 403, name
            code, body, _ = await get(s, url + "/run/acme/echo")
            assert code == 200 and parse_echo(body)[0]["REQUEST_METHOD"] == "GET"
            async with s.get(url + "/status") as r:
                assert (await r.json())["last_sweep"] is None  # nothing re-admitted without a sweep
        finally:
            assert await agent.stop() == 0


async def in_process_agent(aiohttp_client, tmp_path: pathlib.Path, registries: list[str], modules: dict[str, str]):  # type: ignore[no-untyped-def]
    cfg = write_config(tmp_path / "edge", registries, modules)
    config = parse_config(cfg.read_text(), cfg.parent)
    sandbox = new_sandbox(config, workers=2)
    agent = Agent(config, sandbox)
    await agent.start()
    client = await aiohttp_client(make_app(agent, periodic_sweeps=False))
    return agent, client, sandbox


async def test_a_tampered_module_is_never_run_and_is_quarantined_and_repaired(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    agent, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        digest = hashlib.sha256(HELLO).hexdigest()
        stored = agent.store.path(digest)
        stored.write_bytes(EVIL)  # someone with disk access swaps the bytes
        r = await client.get("/run/acme/hello")
        body = await r.read()
        assert b"EVIL" not in body and r.status in (200, 403)  # a run from the attested artifact, or refused: never the new bytes
        r = await client.post("/sweep")
        result = await r.json()
        assert any(f["kind"] == "integrity" and f["digest"] == digest for f in result["findings"]), result
        assert stored.read_bytes() == HELLO  # fetched again, re-verified, stored
        (m,) = result["modules"]
        assert m["state"] == "admitted" and m["digest"] == digest
        r = await client.get("/run/acme/hello")
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        stored.unlink()  # a missing file is an integrity finding too
        result = await (await client.post("/sweep")).json()
        assert any(f["kind"] == "integrity" and f.get("message") == "missing" for f in result["findings"])
        assert stored.read_bytes() == HELLO
    finally:
        await sandbox.close()


def mirror_app(target: str, session: aiohttp.ClientSession, answer: Callable[[web.Request], web.Response | None]) -> web.Application:
    """A mirror in front of the registry: answer(request) where it returns a response, the registry's answer otherwise."""

    async def forward(request: web.Request) -> web.Response:
        own = answer(request)
        if own is not None:
            return own
        async with session.get(target + request.path_qs) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    return app


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
        _, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/")],
                                                        {"acme:hello@1.0.0": "stdout"})
        try:
            result = await (await client.post("/sweep")).json()
            assert result["checkpoint"]["accepted"]
            (trusted,) = (await (await client.get("/status")).json())["checkpoints"]
            assert trusted["size"] > int(old.split(b"\n")[1])
            served_old.append(old)  # the mirror rolls back
            result = await (await client.post("/sweep")).json()
            assert not result["checkpoint"]["accepted"]
            (rollback,) = [f for f in result["findings"] if f["kind"] == "rollback"]
            assert rollback["size"] == int(old.split(b"\n")[1]) and rollback["known_size"] == trusted["size"]
            status = await (await client.get("/status")).json()
            assert status["checkpoints"][0]["size"] == trusted["size"]  # the newer checkpoint is kept
            assert status["modules"][0]["state"] == "admitted"
        finally:
            await sandbox.close()


async def test_an_unreachable_registry_leaves_admitted_modules_serving(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, client_r, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    _, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        await client_r.close()  # the registry goes away
        started = time.monotonic()
        result = await (await client.post("/sweep")).json()
        assert time.monotonic() - started < 60
        assert any(f["kind"] == "unavailable" and f["reason"] == "registry-unreachable" for f in result["findings"]), result
        assert result["modules"][0]["state"] == "admitted"
        r = await client.get("/run/acme/hello")
        assert r.status == 200
    finally:
        await sandbox.close()


@pytest.mark.parametrize("ref", ["acme:hello@2.0.0", "acme:missing"])
async def test_a_release_the_registry_does_not_have_is_refused(aiohttp_client, tmp_path, ref: str) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    _, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url], {ref: "stdout"})
    try:
        (m,) = (await (await client.get("/status")).json())["modules"]
        assert m["state"] == "refused" and m["reason"] == "not-found"
        name = ref.split(":")[1].split("@", maxsplit=1)[0]
        assert (await client.get(f"/run/acme/{name}")).status == 403
    finally:
        await sandbox.close()


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
        _, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/")],
                                                        {"acme:hello@1.0.0": "stdout", "acme:bobs@1.0.0": "stdout"})
        try:
            assert [m["state"] for m in (await (await client.get("/status")).json())["modules"]] == ["admitted", "admitted"]
            r = await client.get("/run/acme/bobs")
            assert r.status == 200 and await r.read() == b"bob's\n"
            withhold[0] = False
            extra[base + "/tlog-proof"] = registry.tlog_proof(index)[0]
            result = await (await client.post("/sweep")).json()
            moved = {m["ref"]: m for m in result["modules"]}
            assert moved["acme:bobs@1.0.0"]["state"] == "quarantined" and moved["acme:bobs@1.0.0"]["reason"] == "key-revoked"
            assert moved["acme:hello@1.0.0"]["state"] == "admitted"  # signed by alice: unaffected
            r = await client.get("/run/acme/bobs")
            assert r.status == 403 and b"key-revoked" in await r.read()
            assert (await client.get("/run/acme/hello")).status == 200
        finally:
            await sandbox.close()


SPIN = wasmtime.wat2wasm('(module (func (export "_start") (loop $l (br $l))))')
BOMB = wasmtime.wat2wasm('''(module (memory 1)
  (func (export "_start") (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))''')


async def test_a_runaway_loop_and_a_memory_bomb_are_stopped_while_others_keep_serving(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    for ref, module in (("acme:hello@1.0.0", HELLO), ("acme:spin@1.0.0", SPIN), ("acme:bomb@1.0.0", BOMB)):
        await publish(api, ref, module)
    _, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url],
                                                    {"acme:hello@1.0.0": "stdout", "acme:spin@1.0.0": "small", "acme:bomb@1.0.0": "small"})
    try:
        assert all(m["state"] == "admitted" for m in (await (await client.get("/status")).json())["modules"])
        spin = asyncio.ensure_future(client.get("/run/acme/spin"))
        hello = asyncio.ensure_future(client.get("/run/acme/hello"))
        done, _ = await asyncio.wait({spin, hello}, return_when=asyncio.FIRST_COMPLETED)
        assert hello in done and (await hello).status == 200  # served while the loop still runs
        r = await spin
        assert r.status == 504 and (await r.json())["error"] == "DeadlineExceeded"
        r = await client.get("/run/acme/bomb")
        assert r.status == 502, await r.text()
        r = await client.get("/run/acme/hello")
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        assert (await client.get("/healthz")).status == 200
    finally:
        await sandbox.close()


async def test_each_sweep_rechecks_admitted_modules_against_the_current_trust_policy(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    agent, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        policy_file = agent.config.trust_policy
        good = policy_file.read_text()
        policy_file.write_text(good + 'imports = "everything"\n')  # malformed: the previous policy stays in force
        result = await (await client.post("/sweep")).json()
        assert any(f["kind"] == "trust-policy" and f["reason"] == "policy-malformed" for f in result["findings"])
        assert result["modules"][0]["state"] == "admitted"
        policy_file.write_text(good + f'[namespaces.acme]\nkeys = ["{BOB.vkey}"]\n')  # acme is now pinned to bob's key
        result = await (await client.post("/sweep")).json()
        (m,) = result["modules"]
        assert m["state"] == "quarantined" and m["reason"] == "publisher-not-allowed" and m["changed"]
        assert (await client.get("/run/acme/hello")).status == 403
        policy_file.write_text(good)  # and back: a sweep says so
        (m,) = (await (await client.post("/sweep")).json())["modules"]
        assert m["state"] == "admitted" and m["previous"] == "quarantined"
        r = await client.get("/run/acme/hello")
        assert r.status == 200
    finally:
        await sandbox.close()


async def test_sweeps_run_every_sweep_interval(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:hello@1.0.0": "stdout"}, sweep_interval=1)
    config = parse_config(cfg.read_text(), cfg.parent)
    sandbox = new_sandbox(config, workers=1)
    agent = Agent(config, sandbox)
    await agent.start()
    client = await aiohttp_client(make_app(agent))  # periodic sweeps on
    try:
        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1))
        deadline = time.monotonic() + 30
        while agent.sweeps < 2 and time.monotonic() < deadline:  # the yank lands before the second sweep starts at the latest
            await asyncio.sleep(0.05)  # polling with a deadline, not ordering
        status = await (await client.get("/status")).json()
        assert status["sweeps"] >= 2 and status["modules"][0]["state"] == "quarantined"
        async with client.get("/metrics") as r:
            count = re.search(r"^wasmlog_agent_sweeps_total (\S+)$", await r.text(), re.MULTILINE)
        assert count is not None and float(count[1]) >= 2
    finally:
        await client.close()
        await sandbox.close()


async def test_a_tampered_compiled_artifact_is_never_loaded_and_is_rebuilt(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    agent, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        r = await client.get("/run/acme/hello")  # compiles and caches the artifact
        assert r.status == 200
        digest = hashlib.sha256(HELLO).hexdigest()
        (artifact,) = (agent.config.data / "artifacts").glob(f"{digest}.*")
        data = bytearray(artifact.read_bytes())
        data[-1] ^= 1  # one bit of compiled code
        artifact.write_bytes(bytes(data))
        result = await (await client.post("/sweep")).json()
        assert any(f["kind"] == "integrity" and f["what"] == "artifact" and f["digest"] == digest for f in result["findings"]), result
        (m,) = result["modules"]
        assert m["state"] == "admitted" and m["previous"] == "quarantined"  # quarantined, re-verified, admitted again in one sweep
        assert not artifact.exists()
        r = await client.get("/run/acme/hello")  # compiled again from the verified bytes
        assert r.status == 200 and await r.read() == b"hello from acme\n"
        assert len(list((agent.config.data / "artifacts").glob(f"{digest}.*"))) == 1
    finally:
        await sandbox.close()


def readme_heredoc(name: str) -> str:
    """The text README.md's "Edge agent" section writes with `cat > NAME <<'TAG'`."""
    section = (ROOT / "README.md").read_text().split("## Edge agent", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"cat > {re.escape(name)} <<'(\w+)'\n(.*?)\n\1\n", section, re.DOTALL)
    assert m, name
    return m[2] + "\n"


async def test_the_readme_path_on_a_wasmlog_up_network(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """README "Edge agent", as written there: `wasmlog up` (witness quorum), publish, the config, serve, run, yank, sweep."""
    port = free_ports(5)
    ready, stop = asyncio.Event(), asyncio.Event()
    network = asyncio.create_task(run_network(NetworkConfig(data=tmp_path / "wasmlog-data", port=port), ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        hello = wasmtime.wat2wasm(readme_heredoc("hello.wat"))
        async with aiohttp.ClientSession() as s:
            api = RegistryClient(f"http://127.0.0.1:{port}", s)
            await publish(api, "acme:hello@1.0.0", hello)
            config = readme_heredoc("agent.toml").replace("127.0.0.1:7380", f"127.0.0.1:{port}").replace("127.0.0.1:7400", "127.0.0.1:0")
            (tmp_path / "agent.toml").write_text(config)
            agent = AgentProcess(tmp_path / "agent.toml")
            url = await agent.start()
            try:
                code, body, _ = await get(s, url + "/run/acme/hello")
                assert (code, body) == (200, b"hello\n")
                await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1, reason="CVE-XXXX"))
                (m,) = (await sweep(s, url))["modules"]
                assert (m["state"], m["reason"]) == ("quarantined", "yanked")
                assert (await get(s, url + "/run/acme/hello"))[0] == 403
                async with s.get(url + "/status") as r:
                    status = await r.json()
                assert status["checkpoints"][0]["newest_cosignature"] is not None  # a witnessed checkpoint
            finally:
                assert await agent.stop() == 0
    finally:
        stop.set()
        await network
