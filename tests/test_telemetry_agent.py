"""The agent's telemetry with real parts: a real registry on loopback, the agent as a real process
(SIGKILLed during a sink outage and restarted), a real collector over HTTP that comes up late."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import aiohttp
from agent_helpers import ROOT, AgentProcess, write_config
from helpers import wait_until
from registry_helpers import start_registry
from test_agent import ALICE, HELLO, NETTY, publish
from test_up import free_ports

from edge.telemetry_collector import make_collector_app
from edge.telemetry_events import ADMITTED, CHECKPOINT, HEAD_SIGNED, REFUSED, REQUEST_REFUSED, SWEEP
from edge.telemetry_otlp import export_items
from edge.telemetry_spool import Spool
from edge.telemetry_verify import verify_events
from tlog.httplimits import DEFAULT_LIMITS, start_server


def telemetry_config(d: pathlib.Path, registry: str, sink: str, extra: str = "") -> pathlib.Path:
    cfg = write_config(d, [registry], {"acme:hello@1.0.0": "stdout", "acme:netty@1.0.0": "stdout"})
    text = cfg.read_text().replace("sweep_interval = 3600\n", f'sweep_interval = 3600\ntelemetry = ["{sink}"]\ntelemetry_interval = 1\n{extra}')
    cfg.write_text(text)
    return cfg


async def status(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/status") as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


def refused_counted(data: pathlib.Path) -> int:
    """Refused requests the spool holds counts for (read beside the running agent)."""
    spool = Spool(data / "telemetry", 1 << 20, readonly=True)
    try:
        return sum(int(e.attr("wasmlog.count") or 0) for e in spool.scan() if e.name == REQUEST_REFUSED)
    finally:
        spool.close()


async def flood_refused(session: aiohttp.ClientSession, url: str, n: int) -> None:
    for _ in range(n):
        async with session.get(url + "/run/acme/netty") as r:
            assert r.status == 403


async def test_events_survive_an_outage_and_a_sigkill_and_arrive_in_order(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO, ALICE)
    await publish(api, "acme:netty@1.0.0", NETTY, ALICE)
    port = free_ports(1)
    sink = f"http://127.0.0.1:{port}/v1/logs"  # nothing listens there yet: the sink is down
    cfg = telemetry_config(tmp_path / "edge", api.url, sink)
    agent = AgentProcess(cfg)
    url = await agent.start()
    runner = None
    try:
        async with aiohttp.ClientSession() as s:
            await flood_refused(s, url, 25)  # refused requests: aggregated, not 25 events
            data = cfg.parent / "agent-data"
            await wait_until(lambda: refused_counted(data) == 25, "the interval's count spooled", 30)
            async with s.post(url + "/sweep") as r:
                assert r.status == 200
            async def failing() -> bool:
                return int((await status(s, url))["telemetry"]["sinks"][0]["failures"]) >= 1

            await wait_until(failing, "the shipper retrying the sink that is down", 30)
            before_kill = (await status(s, url))["telemetry"]
            assert before_kill["sinks"][0]["delivered_through"] == 0 and before_kill["sinks"][0]["last_error"]
            await agent.kill()  # during the outage: nothing spooled may be lost
            url = await agent.start()
            await flood_refused(s, url, 5)
            await wait_until(lambda: refused_counted(data) == 30, "the interval's count spooled", 30)
            async with s.post(url + "/sweep") as r:
                assert r.status == 200
            after = (await status(s, url))["telemetry"]
            assert after["node"] == before_kill["node"]  # the node id is kept in its data directory
            assert after["spool"]["node_events"] > before_kill["spool"]["node_events"]  # numbering went on, never reused
            runner, _ = await start_server(make_collector_app(tmp_path / "collector"), DEFAULT_LIMITS, "127.0.0.1", port)  # the sink is back

            async def delivered() -> bool:
                t = (await status(s, url))["telemetry"]
                return t["sinks"][0]["delivered_through"] == t["spool"]["node_events"] > 0

            await wait_until(delivered, "every spooled event delivered to the collector", 90)
            total = (await status(s, url))["telemetry"]["spool"]["node_events"]
            async with s.get(f"http://127.0.0.1:{port}/v1/logs/export") as r:
                assert r.status == 200
                export = await r.read()
        (tmp_path / "export.jsonl").write_bytes(export)
        items = list(export_items(export))
        events = [e for _, e in items if not isinstance(e, Exception)]
        assert len(events) == len(items)
        unique = {e.id: e for e in events}
        assert sorted(e.seq for e in unique.values()) == list(range(1, total + 1))  # every event, seq 1..N, no gap
        assert len({e.seq for e in unique.values()}) == len(unique)  # no id names two events
        report = verify_events(items, before_kill["vkey"])
        assert report.ok, report.as_json()
        (node,) = report.nodes.values()
        assert node.first_seq == 1 and node.last_seq == total and node.key_pinned and node.signed_through > 0
        names = [e.name for e in sorted(unique.values(), key=lambda e: e.seq)]
        assert ADMITTED in names and REFUSED in names and SWEEP in names and HEAD_SIGNED in names and CHECKPOINT in names
        refused = [e for e in unique.values() if e.name == REQUEST_REFUSED]
        assert sum(int(e.attr("wasmlog.count") or 0) for e in refused) == 30  # every refused request counted ...
        assert len(refused) <= 8  # ... in a few aggregated events
        assert all(e.attr("wasmlog.module.ref") == "acme:netty@1.0.0" for e in refused)
        capability = [e for e in unique.values() if e.name == REFUSED]
        assert capability and capability[0].attr("wasmlog.reason") == "capability"
        cli = subprocess.run([sys.executable, "-m", "wasmlog", "telemetry", "verify", str(tmp_path / "export.jsonl"), "--key",
                              before_kill["vkey"]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and cli.stdout.strip().endswith("OK"), cli.stdout + cli.stderr
        lines = export.splitlines()  # an edit in the collector's file: found and located
        edited = json.loads(lines[0])
        record = edited["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
        record["body"]["stringValue"] = "nothing happened here"
        (tmp_path / "edited.jsonl").write_bytes(b"\n".join([json.dumps(edited).encode(), *lines[1:]]) + b"\n")
        cli = subprocess.run([sys.executable, "-m", "wasmlog", "telemetry", "verify", str(tmp_path / "edited.jsonl")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 1 and "FAIL broken-link at line 1 record 2" in cli.stdout, cli.stdout + cli.stderr
        events_cli = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "events", "--config", str(cfg), "--json",
                                     "--module", "acme:netty"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert events_cli.returncode == 0, events_cli.stderr
        replayed = [json.loads(line) for line in events_cli.stdout.splitlines()]
        assert replayed and all(o["attributes"]["wasmlog.module.ref"] == "acme:netty@1.0.0" for o in replayed)
        assert {o["name"] for o in replayed} >= {REFUSED, REQUEST_REFUSED}
        later = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "events", "--config", str(cfg), "--since", "2100-01-01T00:00"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert later.returncode == 0 and later.stdout == "", later.stderr
        own = subprocess.run([sys.executable, "-m", "wasmlog", "telemetry", "verify", str(cfg.parent / "agent-data"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)  # the node's own spool, beside the running agent
        assert own.returncode == 0 and json.loads(own.stdout)["ok"], own.stdout + own.stderr
    finally:
        await agent.stop()
        if runner is not None:
            await runner.cleanup()


async def test_agent_config_refuses_bad_telemetry_keys(tmp_path: pathlib.Path) -> None:
    from edge.agent_config import ConfigError, parse_config

    for extra, key in [('telemetry = "http://x/v1/logs"\n', "telemetry"), ("telemetry_spool_bytes = 10\n", "telemetry_spool_bytes"),
                       ('telemetry = ["ftp://x/v1/logs"]\n', "telemetry[0]"), ("telemetry_interval = 0\n", "telemetry_interval")]:
        cfg = write_config(tmp_path, ["http://127.0.0.1:1"], {})
        cfg.write_text(cfg.read_text().replace("sweep_interval = 3600\n", "sweep_interval = 3600\n" + extra))
        try:
            parse_config(cfg.read_text(), tmp_path)
        except ConfigError as e:
            assert e.key == key, (extra, e)
        else:
            raise AssertionError(f"accepted {extra!r}")


async def test_a_full_spool_drops_the_oldest_counts_and_reports_it(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    await publish(api, "acme:hello@1.0.0", HELLO, ALICE)
    await publish(api, "acme:netty@1.0.0", NETTY, ALICE)
    port = free_ports(1)
    cfg = telemetry_config(tmp_path / "edge", api.url, f"http://127.0.0.1:{port}/v1/logs", "telemetry_spool_bytes = 65536\n")
    agent = AgentProcess(cfg)
    url = await agent.start()
    runner = None
    try:
        async with aiohttp.ClientSession() as s:
            async def sweep_until_dropped() -> bool:
                async with s.post(url + "/sweep") as r:  # each sweep: a sweep event and a signed head (~1 KiB)
                    assert r.status == 200
                return int((await status(s, url))["telemetry"]["spool"]["dropped"]) > 0

            await wait_until(sweep_until_dropped, "the spool full and its oldest events dropped", 120)
            spool = (await status(s, url))["telemetry"]["spool"]
            assert spool["bytes"] <= 65536 and spool["dropped"] == spool["dropped_undelivered"]  # the sink never had them
            runner, _ = await start_server(make_collector_app(tmp_path / "collector"), DEFAULT_LIMITS, "127.0.0.1", port)

            async def delivered() -> bool:
                t = (await status(s, url))["telemetry"]
                return t["sinks"][0]["delivered_through"] == t["spool"]["node_events"]

            await wait_until(delivered, "what the spool still holds delivered", 90)
            async with s.get(f"http://127.0.0.1:{port}/v1/logs/export") as r:
                export = await r.read()
            dropped = int((await status(s, url))["telemetry"]["spool"]["dropped"])
        report = verify_events(export_items(export))
        assert report.ok, report.as_json()  # the gap is declared by the drop events that arrived
        (node,) = report.nodes.values()
        assert node.first_seq == dropped + 1 and node.declared_dropped == dropped
    finally:
        await agent.stop()
        if runner is not None:
            await runner.cleanup()


def test_a_damaged_telemetry_key_stops_the_agent_with_one_line(tmp_path: pathlib.Path) -> None:
    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], {})
    (tmp_path / "agent-data" / "telemetry").mkdir(parents=True)
    (tmp_path / "agent-data" / "telemetry" / "node.key").write_text("not a key\n")
    r = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(cfg)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: the telemetry spool or key in"), r.stderr


async def test_traps_deadlines_and_memory_caps_are_aggregated_events(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    import wasmtime
    from test_agent import in_process_agent

    from edge.telemetry_events import DEADLINE, MEMORY_CAP, TRAP

    api, _, _, _ = await start_registry(aiohttp_client, tmp_path / "registry")
    wat = ROOT / "tests" / "wasm"
    for name in ("loop", "membomb", "trap"):
        await publish(api, f"acme:{name}@1.0.0", wasmtime.wat2wasm((wat / f"agent_{name}.wat").read_text()), ALICE)
    agent, client, sandbox = await in_process_agent(aiohttp_client, tmp_path, [api.url],
                                                    {f"acme:{n}@1.0.0": "small" for n in ("loop", "membomb", "trap")})
    try:
        for _ in range(3):
            for name, status_code in (("loop", 504), ("membomb", 502), ("trap", 502)):
                r = await client.get(f"/run/acme/{name}")
                assert r.status == status_code, (name, await r.text())
        await agent.telemetry.flush()  # the interval's end, now
        events = list(agent.telemetry.spool.scan())
    finally:
        await client.close()
        await sandbox.close()
    counts: dict[tuple[str, Any], int] = {}
    for e in events:
        if e.name in (DEADLINE, MEMORY_CAP, TRAP):
            key = (e.name, e.attr("wasmlog.module.ref"))
            counts[key] = counts.get(key, 0) + int(e.attr("wasmlog.count") or 0)
            assert e.attr("wasmlog.module.digest") is not None and e.attr("wasmlog.module.log_index") is not None
    assert counts == {(DEADLINE, "acme:loop@1.0.0"): 3, (MEMORY_CAP, "acme:membomb@1.0.0"): 3, (TRAP, "acme:trap@1.0.0"): 3}
    assert len([e for e in events if e.name in (DEADLINE, MEMORY_CAP, TRAP)]) == 6  # one at once, one with the rest, per module
