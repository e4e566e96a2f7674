"""Hosts are untrusted, proofs are what count: a hostile mirror listed first, beside a good registry.

The mirror (a real HTTP server on loopback, in front of the real registry) omits a yank, hides
newer versions, serves garbage, or is down. A yank or revocation that any source proves counts; a
version any source lists is considered; a source's failure or garbage never stops a module that is
admitted (only final reasons do), is reported as that source's last error in /status, and never
moves an "ns:name" module back to an older release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from collections.abc import Callable

import aiohttp
import pytest
from agent_helpers import TRUST_POLICY, InProcessAgent, echo_module, in_process_agent, mirror_app, parse_echo, printing_module
from aiohttp import web
from registry_helpers import release_envelope, start_registry, with_custom_section

from registry.dsse import parse_envelope
from registry.record import Action, parse_package_ref, record_for
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof

ALICE = Ed25519Signer.generate("alice")
MALLORY = Ed25519Signer.generate("mallory")
HELLO = printing_module(b"Content-Type: text/plain\n\nhello from acme\n")
EVIL = printing_module(b"Content-Type: text/plain\n\nEVIL bytes\n")
ECHO_1 = echo_module()
ECHO_11 = with_custom_section(echo_module(), 8)
ECHO_12 = with_custom_section(echo_module(), 16)
ACTIONS = "/api/v1/namespaces/acme/actions"
Answer = Callable[[web.Request], web.Response | None]


def free_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago, and is not reused before the test ends)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def omitting(request: web.Request) -> web.Response | None:
    """Omits every yank and revocation, and every version of echo but the oldest."""
    if request.path == ACTIONS:
        return web.json_response({"proofs": [], "next": None})
    if request.path == "/api/v1/packages/acme/echo":
        return web.json_response({"package": "acme:echo", "versions": ["1.0.0"]})
    return None


def garbage(request: web.Request) -> web.Response | None:
    """Garbage for everything: proofs, module bytes, action records, a checkpoint, a version that does not exist."""
    if request.path.endswith("/tlog-proof"):
        return web.Response(body=b"c2sp.org/tlog-proof@v1\nnot a proof\n")
    if request.path.endswith("/module.wasm"):
        return web.Response(body=EVIL)
    if request.path == ACTIONS:
        return web.json_response({"proofs": ["c2sp.org/tlog-proof@v1\nindex 0\n"], "next": None})
    if request.path == "/api/v1/packages/acme/echo":
        return web.json_response({"package": "acme:echo", "versions": ["9.9.9", "1.0.0"]})
    if request.path == "/log/checkpoint":
        return web.Response(body=b"registry.example/log\n1\nAAAA\n")
    return None


async def hostile_source(kind: str, target: str, session: aiohttp.ClientSession, aiohttp_server) -> str:  # type: ignore[no-untyped-def]
    if kind == "down":
        return free_url()
    server = await aiohttp_server(mirror_app(target, session, {"omits": omitting, "garbage": garbage}[kind]))
    return str(server.make_url("")).rstrip("/")


async def status(a: InProcessAgent) -> dict:  # type: ignore[type-arg]
    return await (await a.admin.get("/status")).json()  # type: ignore[no-any-return]


async def sweep(a: InProcessAgent) -> dict:  # type: ignore[type-arg]
    r = await a.admin.post("/sweep")
    assert r.status == 200, await r.text()
    return await r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["omits", "garbage", "down"])
async def test_a_hostile_mirror_first_never_outvotes_the_registry_second(aiohttp_client, aiohttp_server, tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    for version, module in (("1.0.0", ECHO_1), ("1.1.0", ECHO_11)):
        await api.publish(ALICE, parse_package_ref(f"acme:echo@{version}"), module)
    async with aiohttp.ClientSession() as session:
        mirror = await hostile_source(kind, api.url, session, aiohttp_server)
        a = await in_process_agent(aiohttp_client, tmp_path, [mirror, api.url], {"acme:hello@1.0.0": "stdout", "acme:echo": "cgi"})
        try:
            mods = {m["ref"]: m for m in (await status(a))["modules"]}
            assert mods["acme:hello@1.0.0"]["state"] == "admitted" and mods["acme:hello@1.0.0"]["digest"] == hashlib.sha256(HELLO).hexdigest()
            assert mods["acme:echo"]["state"] == "admitted" and mods["acme:echo"]["version"] == "1.1.0"  # the newest any source lists
            r = await a.runs.get("/run/acme/hello")
            assert r.status == 200 and await r.read() == b"hello from acme\n"  # never the mirror's bytes

            await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=2, reason="CVE-1"))
            await api.publish(ALICE, parse_package_ref("acme:echo@1.2.0"), ECHO_12)  # the mirror does not list it
            moved = {m["ref"]: m for m in (await sweep(a))["modules"]}
            assert (moved["acme:hello@1.0.0"]["state"], moved["acme:hello@1.0.0"]["reason"]) == ("quarantined", "yanked")
            assert moved["acme:echo"]["state"] == "admitted" and moved["acme:echo"]["version"] == "1.2.0"
            r = await a.runs.get("/run/acme/hello")
            assert r.status == 403 and b"yanked" in await r.read()
            assert (await a.runs.get("/run/acme/echo")).status == 200

            sources = {s["url"]: s for s in (await status(a))["sources"]}
            assert list(sources) == [mirror, api.url]
            assert sources[api.url]["last_ok"] is not None
            if kind != "omits":  # an omission cannot be seen; garbage and silence can
                error = sources[mirror]["last_error"]
                assert error is not None and error["reason"] != "yanked", error
                if kind == "down":
                    assert error["reason"] == "registry-unreachable"
        finally:
            await a.close()


def snapshot(answers: dict[str, bytes], forward: Answer | None = None) -> Answer:
    """Serve answers (captured from the registry earlier) for their paths; anything else from forward, or 502."""

    def answer(request: web.Request) -> web.Response | None:
        if request.path in answers:
            return web.Response(body=answers[request.path])
        return forward(request) if forward is not None else web.Response(status=502, text="upstream down")

    return answer


async def test_a_mirror_hiding_newer_versions_never_moves_the_node_back(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, registry_client, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    for version, module in (("1.0.0", ECHO_1), ("1.1.0", ECHO_11)):
        await api.publish(ALICE, parse_package_ref(f"acme:echo@{version}"), module)
    answers: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        mode: list[Answer] = [lambda request: None]  # forwards everything at first
        server = await aiohttp_server(mirror_app(api.url, session, lambda request: mode[0](request)))
        mirror = str(server.make_url("")).rstrip("/")
        a = await in_process_agent(aiohttp_client, tmp_path, [mirror, api.url], {"acme:echo": "cgi"})
        try:
            (m,) = (await status(a))["modules"]
            assert (m["state"], m["version"]) == ("admitted", "1.1.0")
            # The mirror keeps a copy in which only 1.0.0 exists, every piece of it verifiable on its own
            # (proof, module, the namespace's actions, the checkpoint): then the registry goes away.
            base = "/api/v1/packages/acme/echo"
            for path in (base + "/1.0.0/tlog-proof", base + "/1.0.0/module.wasm", ACTIONS, "/log/checkpoint"):
                answers[path] = await api.get(path)
            answers[base] = json.dumps({"package": "acme:echo", "versions": ["1.0.0"]}).encode()
            mode[0] = snapshot(answers)
            await registry_client.close()
            result = await sweep(a)
            (m,) = result["modules"]
            assert (m["state"], m["version"], m["changed"]) == ("admitted", "1.1.0", False)  # not back to 1.0.0
            assert any(f["kind"] == "unavailable" and f["ref"] == "acme:echo" for f in result["findings"])
            r = await a.runs.get("/run/acme/echo")
            assert r.status == 200 and r.headers["X-Module"] == "echo"
            assert a.agent.store.get(hashlib.sha256(ECHO_11).hexdigest()) is not None  # 1.1.0 is what runs
            assert parse_echo(await r.read())[0]["SCRIPT_NAME"] == "/run/acme/echo"
            sources = {s["url"]: s for s in (await status(a))["sources"]}
            assert sources[mirror]["last_error"] is not None and sources[api.url]["last_error"]["reason"] == "registry-unreachable"
        finally:
            await a.close()


@pytest.mark.parametrize(("kind", "reason"), [
    ("malformed-proof", "proof-malformed"),
    ("another-release", "entry-invalid"),  # the proof of acme:other, served for acme:hello
    ("an-action", "not-a-release"),  # the proof of a yank record, served for a release
    ("forged-publisher", "inclusion"),  # mallory's release for acme:hello: refused by the pin only if it were logged
    ("forged-imports", "inclusion"),  # a release importing what the policy refuses: refused only if it were logged
])
async def test_garbage_from_the_only_reachable_source_never_stops_an_admitted_module(  # type: ignore[no-untyped-def]
        aiohttp_client, aiohttp_server, tmp_path, kind: str, reason: str) -> None:
    api, registry_client, registry, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    await api.publish(ALICE, parse_package_ref("acme:other@1.0.0"), EVIL)
    await api.act(ALICE, Action("yank", "acme", name="other", version="1.0.0", issued=1))
    answers: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        mode: list[Answer] = [lambda request: None]
        server = await aiohttp_server(mirror_app(api.url, session, lambda request: mode[0](request)))
        mirror = str(server.make_url("")).rstrip("/")
        policy = TRUST_POLICY + f'[namespaces.acme]\nkeys = ["{ALICE.vkey}"]\n[imports]\nallow = ["wasi_snapshot_preview1.fd_write"]\n'
        (tmp_path / "edge").mkdir()
        a = await in_process_agent(aiohttp_client, tmp_path, [mirror, api.url], {"acme:hello@1.0.0": "stdout"})
        (tmp_path / "edge" / "trust-policy.toml").write_text(policy)  # pinned, imports restricted: the next sweep reads it
        try:
            assert (await sweep(a))["modules"][0]["state"] == "admitted"
            hello = "/api/v1/packages/acme/hello/1.0.0"
            genuine = parse_tlog_proof(await api.get(hello + "/tlog-proof"))
            for path in (ACTIONS, "/log/checkpoint", hello + "/module.wasm"):
                answers[path] = await api.get(path)
            if kind == "malformed-proof":
                answers[hello + "/tlog-proof"] = b"c2sp.org/tlog-proof@v1\nindex x\n"
            elif kind == "another-release":
                answers[hello + "/tlog-proof"] = await api.get("/api/v1/packages/acme/other/1.0.0/tlog-proof")
            elif kind == "an-action":
                answers[hello + "/tlog-proof"] = json.loads(answers[ACTIONS])["proofs"][0].encode()
            else:  # a release that was never logged, put in the genuine proof's place
                signer, module = (MALLORY, HELLO) if kind == "forged-publisher" else (ALICE, echo_module())
                env = release_envelope(signer, parse_package_ref("acme:hello@1.0.0"), module, None)
                entry = record_for("release", signer.vkey, parse_envelope(env)).encode()
                answers[hello + "/tlog-proof"] = dataclasses.replace(genuine, extra=entry).encode()
                answers[hello + "/module.wasm"] = module
            mode[0] = snapshot(answers)
            await registry_client.close()
            result = await sweep(a)
            (m,) = result["modules"]
            assert (m["state"], m["changed"]) == ("admitted", False), m
            (unavailable,) = [f for f in result["findings"] if f["kind"] == "unavailable"]
            assert unavailable["reason"] == reason, unavailable
            r = await a.runs.get("/run/acme/hello")
            assert r.status == 200 and await r.read() == b"hello from acme\n"
            sources = {s["url"]: s for s in (await status(a))["sources"]}
            assert sources[mirror]["last_error"]["reason"] == reason
        finally:
            await a.close()


async def test_a_yank_that_is_not_proven_never_quarantines(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The mirror adds two yanks of acme:hello the registry never logged: one from a fork of the log
    (a checkpoint its key signed, but not consistent with the one the node trusts) and one whose
    inclusion proof does not check. Neither counts; the fork's evidence is kept."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    fork, _, _, _ = await start_registry(aiohttp_client, tmp_path / "fork")  # the same log key: another history
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    await api.publish(ALICE, parse_package_ref("acme:other@1.0.0"), EVIL)
    await fork.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    forked = parse_tlog_proof(await fork.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=7)))
    assert forked.parsed is not None and forked.parsed.size == int((await api.get("/log/checkpoint")).split(b"\n")[1])
    genuine = parse_tlog_proof(await api.get("/api/v1/packages/acme/hello/1.0.0/tlog-proof"))
    broken = dataclasses.replace(genuine, extra=forked.extra)  # the yank's entry, the proof of another entry
    claims = {"proofs": [forked.encode().decode(), broken.encode().decode()], "next": None}
    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, lambda request: web.json_response(claims) if request.path == ACTIONS else None))
        mirror = str(server.make_url("")).rstrip("/")
        a = await in_process_agent(aiohttp_client, tmp_path, [mirror, api.url], {"acme:hello@1.0.0": "stdout"})
        try:
            result = await sweep(a)
            (m,) = result["modules"]
            assert m["state"] == "admitted", m
            assert (await a.runs.get("/run/acme/hello")).status == 200
            error = {s["url"]: s for s in (await status(a))["sources"]}[mirror]["last_error"]
            assert "2 of the 2 action records" in error["message"] and "fork" in error["message"], error
            assert list((a.agent.checkpoints / "evidence").glob("*-fork-*.json"))
            await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=8))  # now proven, by the registry
            (m,) = (await sweep(a))["modules"]
            assert (m["state"], m["reason"]) == ("quarantined", "yanked")
        finally:
            await a.close()


async def test_a_revocation_only_the_second_source_proves_counts(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Bob's key is revoked; a release signed by it is logged after the revocation anyway (a compromised
    front-end). The mirror, first, serves that release and omits the revocation; the registry, second,
    proves the revocation: the release is refused, and the mirror's omission is outvoted."""
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    bob = Ed25519Signer.generate("bob")
    await api.act(ALICE, Action("key-grant", "acme", key=bob.vkey, issued=1))
    await api.act(ALICE, Action("key-revocation", "acme", key=bob.vkey, issued=2))
    bobs = printing_module(b"bob's\n")
    env = release_envelope(bob, parse_package_ref("acme:bobs@1.0.0"), bobs, None)
    index = parse_tlog_proof(await registry.sequencer.add(record_for("release", bob.vkey, parse_envelope(env)).encode())).index
    base = "/api/v1/packages/acme/bobs/1.0.0"
    extra = {base + "/tlog-proof": registry.tlog_proof(index)[0], base + "/module.wasm": bobs}

    def answer(request: web.Request) -> web.Response | None:
        return web.Response(body=extra[request.path]) if request.path in extra else omitting(request)

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, answer))
        mirror = str(server.make_url("")).rstrip("/")
        a = await in_process_agent(aiohttp_client, tmp_path, [mirror, api.url], {"acme:hello@1.0.0": "stdout", "acme:bobs@1.0.0": "stdout"})
        try:
            mods = {m["ref"]: m for m in (await status(a))["modules"]}
            assert mods["acme:hello@1.0.0"]["state"] == "admitted"
            assert (mods["acme:bobs@1.0.0"]["state"], mods["acme:bobs@1.0.0"]["reason"]) == ("refused", "key-revoked")
            r = await a.runs.get("/run/acme/bobs")
            assert r.status == 403 and b"key-revoked" in await r.read()
        finally:
            await a.close()


async def test_a_source_listing_no_versions_refuses_nothing_it_cannot_prove(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:echo@1.0.0"), ECHO_1)
    empty = [True]

    def answer(request: web.Request) -> web.Response | None:
        if request.path == "/api/v1/packages/acme/echo" and empty[0]:
            return web.json_response({"package": "acme:echo", "versions": []})
        return None

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, answer))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(server.make_url("")).rstrip("/")], {"acme:echo": "cgi"})
        try:
            (m,) = (await status(a))["modules"]
            assert (m["state"], m["reason"]) == ("refused", "not-found")  # nothing listed: nothing to admit, and no crash
            empty[0] = False
            (m,) = (await sweep(a))["modules"]
            assert (m["state"], m["version"]) == ("admitted", "1.0.0")
            empty[0] = True  # listed no more: the admitted release stays
            (m,) = (await sweep(a))["modules"]
            assert (m["state"], m["version"], m["changed"]) == ("admitted", "1.0.0", False)
        finally:
            await a.close()
