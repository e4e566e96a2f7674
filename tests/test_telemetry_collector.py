"""The telemetry collector over real HTTP: a redelivered batch is stored once (also after a restart,
and when a real shipper retries a batch whose answer was lost), and retention keeps the stored
lines under their bound in numbered segments that `wasmlog telemetry verify DIR` reads across."""

from __future__ import annotations

import asyncio
import json
import pathlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from helpers import wait_until
from test_telemetry import make_chain

from edge.telemetry_collector import make_collector_app
from edge.telemetry_events import ADMITTED, Draft, Event, chain
from edge.telemetry_otlp import encode_request, export_items
from edge.telemetry_ship import Shipper
from edge.telemetry_spool import Spool
from edge.telemetry_store import MIN_RETAIN_BYTES, segment_bytes
from edge.telemetry_verify import verify_events
from wasmlog.cli import main

JSON = {"Content-Type": "application/json"}


async def post(client: Any, events: list[Event]) -> None:
    r = await client.post("/v1/logs", data=json.dumps(encode_request(events)).encode(), headers=JSON)
    assert r.status == 200 and await r.json() == {}


async def export(client: Any) -> bytes:
    r = await client.get("/v1/logs/export")
    assert r.status == 200
    return bytes(await r.read())


def stored_events(data: bytes) -> list[Event]:
    return [e for _, e in export_items(data) if isinstance(e, Event)]


async def test_a_redelivered_batch_is_stored_once(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    events = make_chain(6)
    client = await aiohttp_client(make_collector_app(tmp_path / "c"))
    await post(client, events[:3])
    await post(client, events[:3])  # its answer was lost: the same batch again
    await post(client, events[1:5])  # a retry that grew meanwhile: two stored, two new
    lines = (await export(client)).splitlines()
    assert len(lines) == 2 and stored_events(lines[1]) == events[3:5]  # only the new records of the second
    reused = chain(Draft.of(ADMITTED, "another event under seq 6's id"), node=events[0].node, seq=6, event_id=events[5].id,
                   time_ns=events[5].time_ns, prev=events[4].hash)
    await post(client, [events[5]])
    await post(client, [reused])  # not a redelivery: same id and seq, other content: stored for the verifier
    report = verify_events(export_items(await export(client)))
    assert report.nodes[events[0].node].duplicates == 0 and report.nodes[events[0].node].events == 6
    assert [f.kind for f in report.findings] == ["id-reused"]
    health = await (await client.get("/healthz")).text()
    assert "4 requests, 7 log records stored since start, 5 redelivered" in health

    restarted = await aiohttp_client(make_collector_app(tmp_path / "c"))  # the window is refilled from the file
    await post(restarted, events[3:6])
    assert len((await export(restarted)).splitlines()) == 4


async def test_a_retry_after_a_lost_answer_is_stored_once(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """The agent's shipper retries a batch the collector stored but whose answer never arrived."""
    stored_first = asyncio.Event()

    @web.middleware
    async def lose_the_first_answer(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.method == "POST" and not stored_first.is_set():
            stored_first.set()
            assert request.transport is not None
            request.transport.close()  # stored and fsynced, never answered: the client sees a disconnect
        return response  # type: ignore[no-any-return]

    app = make_collector_app(tmp_path / "c")
    app.middlewares.insert(0, lose_the_first_answer)
    client = await aiohttp_client(app)
    url = str(client.make_url("/v1/logs"))
    spool = Spool(tmp_path / "spool", 1 << 20, [url])
    try:
        spooled = spool.append([Draft.of(ADMITTED, f"e{i}") for i in range(4)], 0)

        async def report(d: Draft) -> None:
            raise AssertionError(f"nothing is refused here: {d}")

        shipper = Shipper(spool, url, report)
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(shipper.run(session))
            try:
                await wait_until(lambda: shipper.status.delivered_through == 4, "the batch delivered after the retry", 20)
            finally:
                task.cancel()
        assert stored_first.is_set() and shipper.status.failures == 0
        data = await export(client)
        assert len(data.splitlines()) == 1 and stored_events(data) == spooled  # the retry was not stored again
        assert "4 redelivered" in await (await client.get("/healthz")).text()
    finally:
        spool.close()


async def test_retention_keeps_the_newest_segments_and_verify_reads_across_them(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "c"
    client = await aiohttp_client(make_collector_app(data_dir, MIN_RETAIN_BYTES))
    events = make_chain(600)
    for i in range(0, len(events), 10):
        await post(client, events[i:i + 10])
        files = sorted(data_dir.glob("logs*.jsonl"))
        assert sum(p.stat().st_size for p in files) <= MIN_RETAIN_BYTES  # the bound holds after every request
        assert all(p.stat().st_size <= segment_bytes(MIN_RETAIN_BYTES) for p in files)
    names = {p.name for p in data_dir.glob("logs*.jsonl")}
    assert "logs.1.jsonl" not in names and "logs.jsonl" in names and len(names) >= 3
    kept = stored_events(await export(client))
    dropped = events[:len(events) - len(kept)]
    assert kept == events[len(dropped):] and dropped  # the newest, in order; the oldest went
    retention = await (await client.get("/v1/logs/retention")).json()
    assert retention["nodes"] == {events[0].node: {"seq": dropped[-1].seq, "hash": dropped[-1].hash}}
    assert retention["requests"] == len(dropped) // 10 and retention["segments"] == min(int(n.split(".")[1]) for n in names - {"logs.jsonl"}) - 1

    def verify(*args: str) -> tuple[int, dict[str, Any]]:
        result = CliRunner().invoke(main, ["telemetry", "verify", str(data_dir), "--json", *args])
        return result.exit_code, json.loads(result.output)

    code, report = verify()
    node = report["nodes"][events[0].node]
    assert code == 0 and report["ok"] and node["retention_dropped"] == len(dropped) and node["events"] == len(kept)
    assert node["first_seq"] == len(dropped) + 1 and node["last_seq"] == 600

    (data_dir / "retention.json").write_text(json.dumps({**retention, "nodes": {events[0].node: {"seq": dropped[-1].seq, "hash": "00" * 32}}}))
    code, report = verify()  # the first kept event does not link to the last one retention says it dropped
    assert code == 1 and [(f["kind"], f["seq"]) for f in report["findings"]] == [("broken-link", len(dropped) + 1)]
    (data_dir / "retention.json").unlink()
    code, report = verify()  # without the record, retention's drop is a gap like any other
    assert code == 1 and [(f["kind"], f["seq"]) for f in report["findings"]] == [("gap", 1)]
    (data_dir / "retention.json").write_text('{"nodes": []}')
    assert CliRunner().invoke(main, ["telemetry", "verify", str(data_dir)]).exit_code == 2  # unusable input, named
    with pytest.raises(ValueError, match="not a retention record"):
        make_collector_app(data_dir, MIN_RETAIN_BYTES)  # nor does the collector start on it
