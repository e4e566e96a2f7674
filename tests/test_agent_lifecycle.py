"""The edge agent's life around its requests: the background compile (prewarm) meeting tampered bytes,
and a clean SIGTERM (workers reaped, no process left behind). Real registry, real Wasmtime, real processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import re
import signal
import sys

import aiohttp
from agent_helpers import LOOP, ROOT, AgentProcess, in_process_agent, mirror_app, printing_module, write_config
from aiohttp import web
from helpers import wait_until
from registry_helpers import start_registry
from test_agent import ALICE, NETTY, publish

from edge.telemetry_events import ADMITTED, DEADLINE, QUARANTINED, REFUSED, RELEASED, YANK
from edge.telemetry_spool import Spool
from registry.record import Action

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


def running(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (one whose new parent has not reaped it yet is done)."""
    try:
        return (pathlib.Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> set[int]:
    """The processes whose parent is pid, now (from /proc)."""
    found = set()
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


async def test_sigterm_stops_cleanly_mid_request_and_leaves_no_process_behind(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:spin@1.0.0", LOOP)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:hello@1.0.0": "stdout", "acme:spin@1.0.0": "one_at_a_time"})
    agent = AgentProcess(cfg)
    url = await agent.start()
    assert agent.proc is not None
    async with aiohttp.ClientSession() as s:
        status = await (await s.get(agent.admin + "/status")).json()
        assert status["sweeps"] == 1
        metrics = await (await s.get(agent.admin + "/metrics")).text()
        assert "wasmlog_agent_sweeps_total 1.0" in metrics  # the start-up sweep counts
        async with s.get(url + "/run/acme/hello") as r:
            assert r.status == 200
        spinning = asyncio.ensure_future(s.get(url + "/run/acme/spin"))
        await wait_until(lambda: busy(s, agent.admin), "the runaway module to run")
        workers = children_of(agent.proc.pid)
        status = await (await s.get(agent.admin + "/status")).json()
        assert set(status["sandbox"]["pids"]) <= workers and len(workers) >= 3  # the run workers and a compile worker
        agent.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.proc.wait(), 60) == 0
        assert (await spinning).status == 504  # the request in flight was answered, and its event spooled, before the stop
    spool = Spool(cfg.parent / "agent-data" / "telemetry", 1 << 20, readonly=True)
    try:
        assert [e.attr("wasmlog.module.ref") for e in spool.scan() if e.name == DEADLINE] == ["acme:spin@1.0.0"]
    finally:
        spool.close()
    left = [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()]  # reaped by the agent: not even zombies
    assert left == [], [pathlib.Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
    assert "Traceback" not in (cfg.parent / "agent.stderr").read_text()


async def busy(s: aiohttp.ClientSession, admin: str) -> bool:
    return bool((await (await s.get(admin + "/status")).json())["sandbox"]["busy"])


async def test_every_state_change_has_its_event_from_the_start_up_sweep_on(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Replaying the spool's module events gives each module's history: admitted and refused by the start-up sweep,
    quarantined on the request path, released by a sweep, quarantined by a yank."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "acme:netty@1.0.0", NETTY)
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout", "acme:netty@1.0.0": "stdout"})
    digest = hashlib.sha256(HELLO).hexdigest()
    try:
        assert a.agent.prewarming is not None and await a.agent.prewarming == {}
        for artifact in (a.agent.config.data / "artifacts").glob(f"{digest}.*"):
            artifact.unlink()
        a.agent.store.path(digest).write_bytes(EVIL)
        r = await a.runs.get("/run/acme/hello")  # no worker holds it and its artifact is gone: the file must be compiled
        assert r.status == 403 and (await r.json())["error"] == "IntegrityError"
        assert (await a.admin.post("/sweep")).status == 200  # repaired
        await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1))
        assert (await a.admin.post("/sweep")).status == 200
        history: dict[str, list[tuple[str, str | None]]] = {}
        for e in a.agent.telemetry.spool.scan():
            if e.name in (ADMITTED, REFUSED, QUARANTINED, RELEASED, YANK):
                history.setdefault(str(e.attr("wasmlog.module.ref")), []).append((e.name, e.attr("wasmlog.reason")))  # type: ignore[arg-type]
        assert history == {
            "acme:hello@1.0.0": [(ADMITTED, None), (QUARANTINED, "integrity"), (RELEASED, None), (YANK, "yanked"), (QUARANTINED, "yanked")],
            "acme:netty@1.0.0": [(REFUSED, "capability")],
        }
        status = {m["ref"]: (m["state"], m["reason"]) for m in (await (await a.admin.get("/status")).json())["modules"]}
        assert status == {"acme:hello@1.0.0": ("quarantined", "yanked"), "acme:netty@1.0.0": ("refused", "capability")}
    finally:
        await a.close()


async def test_sigterm_during_the_start_up_sweep_stops_before_anything_is_served(aiohttp_client, aiohttp_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    asked, never = asyncio.Event(), asyncio.Event()

    async def hanging(request: web.Request) -> None:
        """The checkpoint never comes (the fetch's own timeout is a minute)."""
        if request.path == "/log/checkpoint":
            asked.set()
            await never.wait()

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, hanging))
        cfg = write_config(tmp_path / "edge", [str(server.make_url("")).rstrip("/")], {"acme:hello@1.0.0": "stdout"})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(cfg), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            await asyncio.wait_for(asked.wait(), 60)  # the start-up sweep is under way
            workers = children_of(proc.pid)
            proc.send_signal(signal.SIGTERM)
            out, err = await asyncio.wait_for(proc.communicate(), 50)  # well before the fetch would give up
        finally:
            never.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err
    assert out == b"", out  # no listener was opened
    assert b"Traceback" not in err, err
    assert [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()] == []  # reaped by the agent


async def test_a_sigkilled_agent_leaves_no_worker_behind(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:spin@1.0.0", LOOP)
    cfg = write_config(tmp_path / "edge", [api.url], {"acme:spin@1.0.0": "one_at_a_time"})
    agent = AgentProcess(cfg)
    url = await agent.start()
    assert agent.proc is not None
    async with aiohttp.ClientSession() as s:
        spinning = asyncio.ensure_future(s.get(url + "/run/acme/spin"))
        await wait_until(lambda: busy(s, agent.admin), "the runaway module to run")
        workers = children_of(agent.proc.pid)
        assert len(workers) >= 3
        await agent.kill()
        with contextlib.suppress(aiohttp.ClientError):
            await spinning

    def gone() -> bool:
        return not [pid for pid in workers if running(pid)]

    await wait_until(gone, "every worker of the killed agent to exit", 30)


async def test_sigterm_with_a_sweep_asked_for_and_hanging_stops_at_once(aiohttp_client, aiohttp_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    held, asked, never = [False], asyncio.Event(), asyncio.Event()

    async def hanging(request: web.Request) -> None:
        if held[0] and request.path == "/log/checkpoint":
            asked.set()
            await never.wait()

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, hanging))
        cfg = write_config(tmp_path / "edge", [str(server.make_url("")).rstrip("/")], {"acme:hello@1.0.0": "stdout"})
        agent = AgentProcess(cfg)
        await agent.start()
        assert agent.proc is not None
        try:
            held[0] = True
            sweeping = asyncio.ensure_future(session.post(agent.admin + "/sweep"))
            await asyncio.wait_for(asked.wait(), 60)
            agent.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.proc.wait(), 30) == 0  # not the minute a hung fetch or handler may take
            with contextlib.suppress(aiohttp.ClientError):
                await sweeping
        finally:
            never.set()
            if agent.proc.returncode is None:
                agent.proc.kill()
                await agent.proc.wait()
    assert "Traceback" not in (cfg.parent / "agent.stderr").read_text()


async def test_periodic_sweeps_and_post_sweep_share_sweeps_never_queue_them(aiohttp_client, aiohttp_server, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    held, asked, release = [False], asyncio.Event(), asyncio.Event()

    async def slow_checkpoint(request: web.Request) -> None:
        if held[0] and request.path == "/log/checkpoint":
            asked.set()
            await release.wait()

    async with aiohttp.ClientSession() as session:
        server = await aiohttp_server(mirror_app(api.url, session, slow_checkpoint))
        a = await in_process_agent(aiohttp_client, tmp_path, [str(server.make_url("")).rstrip("/")], {"acme:hello@1.0.0": "stdout"},
                                   periodic_sweeps=True, sweep_interval=1)
        try:
            held[0] = True
            await asyncio.wait_for(asked.wait(), 30)  # the first periodic sweep runs, and waits for the checkpoint
            assert a.agent.sweeps == 1 and a.agent.sweep_waiting == 1  # the periodic loop waits for it
            posts = [asyncio.ensure_future(a.admin.post("/sweep")) for _ in range(5)]
            await wait_until(lambda: a.agent.sweep_waiting == 6, "the five callers to wait beside the periodic loop")
            release.set()
            results = [await (await r).json() for r in posts]
            assert {r["number"] for r in results} == {3} and results[0]["trigger"] == "request"  # one more, shared
            await wait_until(lambda: a.agent.sweeps >= 4, "the next periodic sweep")
            status = await (await a.admin.get("/status")).json()
            metrics = await (await a.admin.get("/metrics")).text()
            count = re.search(r"^wasmlog_agent_sweeps_total (\S+)$", metrics, re.MULTILINE)
            assert count is not None and float(count[1]) >= status["sweeps"] >= 4
            assert not status["sweep_running"] or status["sweep_waiting"] <= 1  # never a queue of sweeps
        finally:
            release.set()
            await a.close()


async def test_an_integrity_finding_never_turns_a_refused_module_into_a_quarantined_one(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """Only an admitted module can be quarantined: one refused (never admitted) with the same bytes stays refused."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO)
    await publish(api, "beta:hello@1.0.0", HELLO)  # the same bytes, under a profile that grants nothing
    a = await in_process_agent(aiohttp_client, tmp_path, [api.url], {"acme:hello@1.0.0": "stdout", "beta:hello@1.0.0": "small"})
    try:
        before = {m["ref"]: (m["state"], m["reason"]) for m in (await (await a.admin.get("/status")).json())["modules"]}
        assert before == {"acme:hello@1.0.0": ("admitted", None), "beta:hello@1.0.0": ("refused", "capability")}
        a.agent.store.path(hashlib.sha256(HELLO).hexdigest()).write_bytes(EVIL)
        result = await (await a.admin.post("/sweep")).json()
        assert any(f["kind"] == "integrity" for f in result["findings"])
        after = {m["ref"]: (m["state"], m["reason"]) for m in (await (await a.admin.get("/status")).json())["modules"]}
        assert after == before  # acme repaired and admitted again; beta refused as it was
        assert [e.attr("wasmlog.module.ref") for e in a.agent.telemetry.spool.scan() if e.name == QUARANTINED] == ["acme:hello@1.0.0"]
    finally:
        await a.close()
