"""The edge agent's life around its requests: the background compile (prewarm) meeting tampered bytes,
and a clean SIGTERM (workers reaped, no process left behind). Real registry, real Wasmtime, real processes."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal

import aiohttp
from agent_helpers import AgentProcess, in_process_agent, printing_module, write_config
from registry_helpers import start_registry
from test_agent import ALICE, publish

from edge.telemetry_events import QUARANTINED
from edge.telemetry_spool import Spool
from registry.record import parse_package_ref

HELLO = printing_module(b"Content-Type: text/plain\n\nhello from acme\n")
EVIL = printing_module(b"Content-Type: text/plain\n\nEVIL tampered bytes\n")


async def test_a_tampered_module_met_by_a_prewarm_is_quarantined_at_once_and_shown(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    digest = hashlib.sha256(HELLO).hexdigest()
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        status = await (await a.admin.get("/status")).json()
        assert status["prewarm"] == {"running": False, "failures": []}
        for artifact in (a.agent.config.data / "artifacts").glob(f"{digest}.*"):
            artifact.unlink()  # e.g. a new Wasmtime: the next prewarm compiles from the stored bytes
        a.agent.store.path(digest).write_bytes(EVIL)
        a.agent.prewarm()  # what every sweep does at its end
        failures = await a.agent.prewarming
        assert list(failures) == [digest] and "IntegrityError" in failures[digest]
        # quarantined by the prewarm itself, before any request or sweep
        status = await (await a.admin.get("/status")).json()
        (m,) = status["modules"]
        assert (m["state"], m["reason"]) == ("quarantined", "integrity"), m
        assert status["prewarm"]["failures"] == [{"digest": digest, "refs": ["acme:hello@1.0.0"], "error": failures[digest]}]
        spool = a.agent.telemetry.spool
        assert [e.attr("wasmlog.reason") for e in spool.scan() if e.name == QUARANTINED] == ["integrity"]
        assert a.sandbox.status()["compiled"] == 1  # EVIL was never compiled
        r = await a.runs.get("/run/acme/hello")
        assert r.status == 403
        await a.admin.post("/sweep")  # repaired: fetched again, verified, compiled
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        r = await a.runs.get("/run/acme/hello")
        assert (r.status, await r.read()) == (200, b"hello from acme\n")
        assert (await (await a.admin.get("/status")).json())["prewarm"]["failures"] == []
    finally:
        await a.close()
