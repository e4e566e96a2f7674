"""Hostile modules against the agent, and what their neighbours see: real registry, real Wasmtime workers,
real HTTP on loopback."""

from __future__ import annotations

import asyncio
import pathlib

from agent_helpers import LOOP, in_process_agent
from helpers import wait_until
from registry_helpers import start_registry
from test_agent import publish


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
