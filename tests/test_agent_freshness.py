"""Freshness belongs to status, in the edge agent: with require_status, an admitted module is served only while
the newest status proof that verified for it is younger than max_status_age by its cosigned time.

A real witnessed registry (its witnesses and the agent read the test's clock), a real mirror in front of it
that replays an old status proof, the agent in this process with its real sandbox. The module stops at the
first request or sweep past the age and comes back at the sweep that verifies a fresh status proof."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import aiohttp
from agent_helpers import InProcessAgent, in_process_agent, mirror_app, printing_module
from aiohttp import web
from registry_helpers import REGISTRY_KEY
from witnessed_helpers import WITNESS_KEYS, Clock, start_witnessed_registry, trust_policy

from edge import telemetry_events as ev
from registry.client import RegistryClient
from registry.record import Action, PackageRef
from registry.status_proof import parse_status_proof
from tlog.cosignature import cosign
from tlog.note import Ed25519Signer, parse_note

ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
CAROL = Ed25519Signer.generate("carol")
HELLO = printing_module(b"Content-Type: text/plain\n\nhello from acme\n")
REF = PackageRef("acme", "hello", "1.0.0")
MAX_AGE = 600


async def module_status(a: InProcessAgent) -> dict[str, Any]:
    body = await (await a.admin.get("/status")).json()
    (m,) = body["modules"]
    return m  # type: ignore[no-any-return]


async def runs(a: InProcessAgent) -> int:
    return (await a.runs.get("/run/acme/hello")).status


async def release(a: InProcessAgent, api: RegistryClient, replayed: list[bytes], record: Action, now: int) -> None:
    """The mirror serves the registry's status proofs again, a new batch is cosigned now: the next sweep releases the module."""
    replayed.clear()
    await api.act(ALICE, record)
    released = len(events(a, ev.RELEASED))
    await a.agent.sweep()
    m = await module_status(a)
    assert (m["state"], m["reason"], m["status_as_of"]) == ("admitted", None, now) and await runs(a) == 200
    assert [e.attr("wasmlog.status.as_of") for e in events(a, ev.RELEASED)][released:] == [now]


def events(a: InProcessAgent, name: str) -> list[ev.Event]:
    return [e for e in a.agent.telemetry.spool.scan() if e.name == name]


async def test_a_module_stops_when_its_status_proofs_stop_getting_fresher(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(float(int(time.time())))
    t0 = int(clock.now)
    api, _ = await start_witnessed_registry(aiohttp_client, aiohttp_server, tmp_path, clock)
    await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await api.publish(ALICE, REF, HELLO)  # cosigned at t0
    replayed: list[bytes] = []  # when set, the mirror answers every status proof request with it

    def replaying(request: web.Request) -> web.Response | None:
        return web.Response(body=replayed[0]) if replayed and request.path.endswith("/status-proof") else None

    async with aiohttp.ClientSession() as session:
        mirror = await aiohttp_server(mirror_app(api.url, session, replaying))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/")], {str(REF): "stdout"},
                                   trust_policy=trust_policy(f"require_status = true\nmax_status_age = {MAX_AGE}"), clock=clock)
        try:
            m = await module_status(a)
            assert (m["state"], m["status_as_of"]) == ("admitted", t0) and await runs(a) == 200
            replayed.append(await api.get(api.package_path(REF) + "/status-proof"))  # the mirror now replays this one

            clock.now = t0 + MAX_AGE  # as old as allowed: still served
            await a.agent.sweep()
            m = await module_status(a)
            assert (m["state"], m["status_as_of"]) == ("admitted", t0) and await runs(a) == 200

            clock.now = t0 + MAX_AGE + 1  # past the age: not served any more, even before the next sweep
            assert await runs(a) == 403
            m = await module_status(a)
            assert (m["state"], m["reason"], m["status_as_of"]) == ("quarantined", "status-stale", t0), m
            assert f"cosigned {MAX_AGE + 1}s ago" in m["message"]
            (quarantined,) = events(a, ev.QUARANTINED)
            assert quarantined.attr("wasmlog.reason") == "status-stale" and quarantined.attr("wasmlog.status.as_of") == t0

            clock.now = t0 + MAX_AGE + 100  # a sweep whose source fails again changes nothing: still quarantined
            await a.agent.sweep()
            assert (await module_status(a))["state"] == "quarantined" and await runs(a) == 403

            t1 = int(clock.now)
            await release(a, api, replayed, Action("key-grant", "acme", key=BOB.vkey, issued=2), t1)

            replayed.append(await api.get(api.package_path(REF) + "/status-proof"))  # replayed again
            clock.now = t1 + MAX_AGE + 1  # the first sweep past the age stops it
            sweep = await a.agent.sweep()
            m = await module_status(a)
            assert (m["state"], m["reason"], m["status_as_of"]) == ("quarantined", "status-stale", t1), m
            assert f"cosigned {MAX_AGE + 1}s ago" in m["message"] and "this sweep: (status-stale)" in m["message"]
            assert [x["state"] for x in sweep["modules"]] == ["quarantined"] and await runs(a) == 403
            assert [e.attr("wasmlog.status.as_of") for e in events(a, ev.QUARANTINED)] == [t0, t1]

            t2 = int(clock.now)
            await release(a, api, replayed, Action("key-grant", "acme", key=CAROL.vkey, issued=2), t2)
            # Without require_status nothing of this applies: a source's stale status proof proves nothing either way.
            (tmp_path / "edge" / "trust-policy.toml").write_text(trust_policy(f"max_status_age = {MAX_AGE}"))  # re-read at each sweep
            replayed.append(await api.get(api.package_path(REF) + "/status-proof"))
            clock.now = t2 + 3 * MAX_AGE
            sweep = await a.agent.sweep()
            assert (await module_status(a))["state"] == "admitted" and await runs(a) == 200
            assert [f["reason"] for f in sweep["findings"] if f["kind"] == "unavailable"] == ["status-stale"]
        finally:
            await a.close()


def cosigned_at(note: bytes, at: int) -> bytes:
    """note with its witnesses' cosignatures made again at time at (as they cosigned the same tree then)."""
    n = parse_note(note)
    log_lines = "".join(s.line() for s in n.signatures if s.name == REGISTRY_KEY.name)
    return (n.text + "\n" + log_lines).encode() + b"".join(cosign(w, n.text, at).line().encode() for w in WITNESS_KEYS)


async def test_the_freshest_status_proof_any_source_serves_counts(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A mirror listed first serves the same status proof as cosigned 200 s earlier: it verifies, but the
    registry's fresher one is what the node keeps, so the mirror cannot age the module out early."""
    clock = Clock(float(int(time.time())))
    t0 = int(clock.now)
    api, _ = await start_witnessed_registry(aiohttp_client, aiohttp_server, tmp_path, clock)
    await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await api.publish(ALICE, REF, HELLO)

    async def older(request: web.Request) -> web.Response | None:
        if not request.path.endswith("/status-proof"):
            return None
        sp = parse_status_proof(await api.get(request.path))
        return web.Response(body=dataclasses.replace(sp, checkpoint=cosigned_at(sp.checkpoint, t0 - 200)).encode())

    async with aiohttp.ClientSession() as session:
        mirror = await aiohttp_server(mirror_app(api.url, session, older))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(mirror.make_url("")).rstrip("/"), api.url], {str(REF): "stdout"},
                                   trust_policy=trust_policy(f"require_status = true\nmax_status_age = {MAX_AGE}"), clock=clock)
        try:
            m = await module_status(a)
            assert (m["state"], m["status_as_of"]) == ("admitted", t0), m
            served = await a.admin.get("/status")
            assert [s["url"] for s in (await served.json())["sources"] if s["last_ok"] is not None][:1] == [str(mirror.make_url("")).rstrip("/")]
            clock.now = t0 - 200 + MAX_AGE + 1  # the mirror's has aged out, the registry's has not
            assert await runs(a) == 200 and (await module_status(a))["state"] == "admitted"
            clock.now = t0 + MAX_AGE + 1
            assert await runs(a) == 403 and (await module_status(a))["reason"] == "status-stale"
        finally:
            await a.close()
