"""state.json you can trust, and sweeps that do not pile up.

A state.json with another node's MAC, or missing after modules were admitted, is not used: the
start-up sweep decides everything anew, and while the sources are down nothing is served. POST
/sweep while a sweep runs waits for the next one, shared by every caller that asked meanwhile.
(The SIGKILL restart and an edited state.json, with the agent as a real process: test_agent.py.)
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil

import aiohttp
from agent_helpers import InProcessAgent, in_process_agent, mirror_app, printing_module
from aiohttp import web
from helpers import wait_until
from registry_helpers import start_registry

from edge.artifacts import load_or_create_key
from registry.record import parse_package_ref
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
HELLO = printing_module(b"hello\n")


async def status(a: InProcessAgent) -> dict:  # type: ignore[type-arg]
    return await (await a.admin.get("/status")).json()  # type: ignore[no-any-return]


async def test_a_state_json_under_another_nodes_key_is_not_used(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, registry_client, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path / "a", [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        assert (await status(a))["modules"][0]["state"] == "admitted"
    finally:
        await a.close()
    node_a, node_b = tmp_path / "a" / "edge" / "agent-data", tmp_path / "b" / "edge" / "agent-data"
    node_b.mkdir(parents=True, mode=0o700)
    load_or_create_key(node_b / "artifact.key")  # node b's own key
    shutil.copy(node_a / "state.json", node_b / "state.json")  # a good MAC, under node a's key
    shutil.copytree(node_a / "modules", node_b / "modules")  # and the module it names
    await registry_client.close()  # nothing can be verified again now
    b = await in_process_agent(aiohttp_client, tmp_path / "b", [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        s = await status(b)
        assert s["started"]["state_file"].startswith("tampered") and "another node" in s["started"]["state_file"]
        (m,) = s["modules"]
        assert (m["state"], m["reason"]) == ("refused", "registry-unreachable")
        assert (await b.runs.get("/run/acme/hello")).status == 403
    finally:
        await b.close()


async def test_a_missing_state_json_after_admission_is_tampering(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, registry_client, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        s = await status(a)
        assert s["started"]["state_file"] == "new" and s["modules"][0]["state"] == "admitted"
    finally:
        await a.close()
    (a.agent.config.data / "state.json").unlink()
    await registry_client.close()
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout"})
    try:
        s = await status(a)
        assert s["started"]["state_file"].startswith("tampered") and "missing" in s["started"]["state_file"]
        assert s["modules"][0]["state"] == "refused" and (await a.runs.get("/run/acme/hello")).status == 403
    finally:
        await a.close()


async def test_sweeps_asked_for_while_one_runs_share_the_next_one(aiohttp_client, aiohttp_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), HELLO)
    held, release = [False], asyncio.Event()
    asked = asyncio.Event()

    async def slow_checkpoint(request: web.Request) -> None:
        """Forwarded (None), but while held, only once released."""
        if held[0] and request.path == "/log/checkpoint":
            asked.set()
            await release.wait()

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, slow_checkpoint))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(server.make_url("")).rstrip("/")], {"acme:hello@1.0.0": "stdout"})
        try:
            assert a.agent.sweeps == 1  # the start-up sweep
            held[0] = True
            first = asyncio.ensure_future(a.admin.post("/sweep"))
            await asyncio.wait_for(asked.wait(), 30)  # sweep 2 runs, and waits for the checkpoint
            more = [asyncio.ensure_future(a.admin.post("/sweep")) for _ in range(5)]
            await wait_until(lambda: a.agent.sweep_waiting == 6, "the five callers to wait")
            assert (await status(a))["sweep_running"]
            release.set()
            numbers = [(await (await r).json())["number"] for r in [first, *more]]
            assert numbers == [2, 3, 3, 3, 3, 3]  # the running one, then one more for everyone who asked meanwhile
            assert a.agent.sweeps == 3 and a.agent.sweep_waiting == 0
            metrics = await (await a.admin.get("/metrics")).text()
            assert "wasmlog_agent_sweeps_total 3.0" in metrics  # each sweep counted once, the start-up sweep too
        finally:
            await a.close()

