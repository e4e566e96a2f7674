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
            before_kill = (await status(s, url))["telemetry"]
            assert before_kill["sinks"][0]["delivered_through"] == 0 and before_kill["sinks"][0]["failures"] >= 1
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
