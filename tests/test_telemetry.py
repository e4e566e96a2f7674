"""Telemetry parts on their own, with real LMDB and real HTTP: the OTLP JSON against the spec's field
names (a reference written here), the chain verifier against edits, deletions and reordering
(hypothesis), the spool's durability under SIGKILL and its bound, and delivery's status handling."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pathlib
import signal
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.telemetry_events import ADMITTED, DROPPED, GENESIS, REFUSED, Draft, Event, EventError, chain, event_hash
from edge.telemetry_otlp import OtlpError, encode_request, events_of, export_items, parse_logs_request
from edge.telemetry_ship import BACKOFF_CAP, Shipper, backoff, parse_retry_after
from edge.telemetry_spool import Spool
from edge.telemetry_verify import verify_events

ROOT = pathlib.Path(__file__).resolve().parent.parent
NODE = "0123456789abcdef0123456789abcdef"

# The JSON field names of opentelemetry-proto's logs messages (logs/v1/logs.proto, common/v1/common.proto,
# resource/v1/resource.proto), lowerCamelCase as the OTLP/JSON mapping requires: written out here, not taken from our code.
FIELDS = {
    "request": {"resourceLogs"},
    "resourceLogs": {"resource", "scopeLogs", "schemaUrl"},
    "resource": {"attributes", "droppedAttributesCount", "entityRefs"},
    "scopeLogs": {"scope", "logRecords", "schemaUrl"},
    "scope": {"name", "version", "attributes", "droppedAttributesCount"},
    "logRecord": {"timeUnixNano", "observedTimeUnixNano", "severityNumber", "severityText", "body", "attributes",
                  "droppedAttributesCount", "flags", "traceId", "spanId", "eventName"},
    "keyValue": {"key", "value"},
    "anyValue": {"stringValue", "boolValue", "intValue", "doubleValue", "arrayValue", "kvlistValue", "bytesValue"},
}


def make_chain(n: int, node: str = NODE) -> list[Event]:
    out: list[Event] = []
    prev = GENESIS
    for i in range(1, n + 1):
        d = Draft.of(ADMITTED if i % 2 else REFUSED, f"event {i}", {"wasmlog.module.ref": f"acme:m{i % 3}@1.0.0", "wasmlog.count": i})
        e = chain(d, node=node, seq=i, event_id=f"{i:032x}", time_ns=1_700_000_000_000_000_000 + i, prev=prev)
        out.append(e)
        prev = e.hash
    return out


def check_shape(obj: Any, kind: str) -> None:
    """Every key of obj is a field of its OTLP message; nested messages checked in turn."""
    assert isinstance(obj, dict) and set(obj) <= FIELDS[kind], (kind, set(obj) - FIELDS.get(kind, set()))
    children = {"resourceLogs": "resourceLogs", "scopeLogs": "scopeLogs", "logRecords": "logRecord", "attributes": "keyValue"}
    for k, v in obj.items():
        if k in children:
            for item in v:
                check_shape(item, children[k])
        elif k in ("resource", "scope"):
            check_shape(v, k)
        elif k in ("value", "body"):
            check_shape(v, "anyValue")
            assert len(v) == 1


def test_otlp_json_follows_the_specification() -> None:
    (e,) = make_chain(1)
    req = encode_request([e])
    check_shape(req, "request")
    # the reference: one resourceLogs for the node, one scope, one record, written by hand from the spec
    expected_record = {
        "timeUnixNano": "1700000000000000001", "observedTimeUnixNano": "1700000000000000001",  # fixed64: a decimal string
        "severityNumber": 9, "severityText": "INFO",  # SEVERITY_NUMBER_INFO, an integer enum
        "body": {"stringValue": "event 1"}, "eventName": "wasmlog.module.admitted",
        "attributes": [
            {"key": "event.name", "value": {"stringValue": "wasmlog.module.admitted"}},
            {"key": "wasmlog.event.id", "value": {"stringValue": "0" * 31 + "1"}},
            {"key": "wasmlog.event.seq", "value": {"intValue": "1"}},  # int64: a decimal string
            {"key": "wasmlog.event.prev", "value": {"stringValue": "0" * 64}},
            {"key": "wasmlog.count", "value": {"intValue": "1"}},
            {"key": "wasmlog.module.ref", "value": {"stringValue": "acme:m1@1.0.0"}},
        ],
    }
    assert req == {"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "wasmlog-agent"}},
                                    {"key": "service.instance.id", "value": {"stringValue": NODE}}]},
        "scopeLogs": [{"scope": {"name": "wasmlog.agent", "version": "1"}, "logRecords": [expected_record]}],
    }]}


def test_otlp_decoding_takes_both_integer_forms_and_ignores_unknown_fields() -> None:
    req = encode_request(make_chain(2))
    rec = req["resourceLogs"][0]["scopeLogs"][0]["logRecords"][1]  # type: ignore[index]
    rec["timeUnixNano"] = int(rec["timeUnixNano"])  # a number is accepted too (proto3 JSON)
    rec["someFutureField"] = {"x": 1}  # OTLP/JSON receivers MUST ignore unknown fields
    got = [e for _, e in events_of(parse_logs_request(req))]
    assert got == make_chain(2)
    for bad, where in [({"resourceLogs": {}}, "resourceLogs"), ({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "-1"}]}]}]}, "timeUnixNano"),
                       ({"resourceLogs": [{"resource": {"attributes": [{"key": "a"}, {"key": "a"}]}}]}, "repeated"),
                       ({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"stringValue": "a", "intValue": "1"}}]}]}]}, "one value")]:
        with pytest.raises(OtlpError, match=where):
            parse_logs_request(bad)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
                               ["resourceLogs", "scopeLogs", "logRecords", "resource", "attributes", "key", "value", "stringValue",
                                "intValue", "arrayValue", "kvlistValue", "values", "timeUnixNano", "body", "severityNumber"]), inner, max_size=4),
                           max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_the_otlp_parser_refuses_garbage_only_with_its_own_error(obj: object) -> None:
    try:
        resources = parse_logs_request(obj)
    except OtlpError:
        return
    for _, item in events_of(resources):
        assert isinstance(item, Event | EventError)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30))
def test_events_round_trip_through_otlp_json(n: int) -> None:
    events = make_chain(n)
    data = json.dumps(encode_request(events)).encode()
    assert [e for _, e in export_items(data)] == events


@settings(max_examples=300, deadline=None)
@given(st.integers(3, 25), st.data())
def test_the_verifier_finds_every_edit_deletion_and_reordering(n: int, data: st.DataObject) -> None:
    events = make_chain(n)
    items: list[tuple[str, Event | EventError]] = [(f"#{e.seq}", e) for e in events]
    assert verify_events(items).ok
    change = data.draw(st.sampled_from(["edit", "delete", "swap", "reuse-id", "duplicate"]))
    k = data.draw(st.integers(0, n - 2))  # an event with a successor (the tail is covered by signed heads only)
    if change == "edit":
        e = events[k]
        field = data.draw(st.sampled_from(["body", "time_ns", "attrs", "name"]))
        edited = {"body": e.__class__(e.node, e.seq, e.id, e.time_ns, e.name, e.body + "!", e.attrs, e.prev),
                  "time_ns": e.__class__(e.node, e.seq, e.id, e.time_ns + 1, e.name, e.body, e.attrs, e.prev),
                  "attrs": e.__class__(e.node, e.seq, e.id, e.time_ns, e.name, e.body, (("wasmlog.count", 0),), e.prev),
                  "name": e.__class__(e.node, e.seq, e.id, e.time_ns, DROPPED if e.name != DROPPED else ADMITTED, e.body, e.attrs, e.prev)}[field]
        items[k] = (f"#{e.seq}", edited)
        want, at = "broken-link", k + 2
    elif change == "delete":
        k = data.draw(st.integers(1, n - 2))
        del items[k]
        want, at = "gap", k + 1
    elif change == "swap":
        j = data.draw(st.integers(k + 1, n - 1))
        items[k], items[j] = items[j], items[k]
        want, at = "reordered", None
    elif change == "reuse-id":
        e, o = events[k], events[k + 1]
        items[k + 1] = ("#x", o.__class__(o.node, o.seq, e.id, o.time_ns, o.name, o.body, o.attrs, o.prev))
        want, at = "id-reused", k + 2
    else:  # a redelivered batch is not a finding
        items += items[k:]
        assert verify_events(items).ok and verify_events(items).nodes[NODE].duplicates == n - k
        return
    report = verify_events(items)
    assert not report.ok
    assert any(f.kind == want and (at is None or f.seq == at) for f in report.findings), (change, [f.as_json() for f in report.findings])


def test_event_hash_covers_every_field() -> None:
    (e,) = make_chain(1)
    assert len({event_hash(e), event_hash(e.__class__(e.node, 1, e.id, e.time_ns, e.name, e.body, (), e.prev)),
                event_hash(e.__class__("f" * 32, 1, e.id, e.time_ns, e.name, e.body, e.attrs, e.prev))}) == 3


APPENDER = """
import pathlib, sys
from edge.telemetry_spool import Spool
from edge.telemetry_events import Draft
spool = Spool(pathlib.Path(sys.argv[1]), 1 << 30)
i = 0
while True:
    i += 1
    (e,) = spool.append([Draft.of("wasmlog.module.admitted", f"event {i}")], i)
    print(e.seq, e.id, flush=True)
"""


async def test_a_sigkill_loses_nothing_spooled(tmp_path: pathlib.Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", APPENDER, str(tmp_path / "spool"), stdout=asyncio.subprocess.PIPE,
                                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    reported: dict[int, str] = {}
    while len(reported) < 200:
        seq, event_id = (await asyncio.wait_for(proc.stdout.readline(), 60)).split()
        reported[int(seq)] = event_id.decode()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    spool = Spool(tmp_path / "spool", 1 << 30)
    try:
        held = {e.seq: e.id for e in spool.scan()}
        assert all(held.get(seq) == i for seq, i in reported.items())  # every event reported as written is there
        assert sorted(held) == list(range(1, len(held) + 1))
        (e,) = spool.append([Draft.of(ADMITTED, "after the kill")], 0)
        assert e.seq == len(held) + 1 and e.prev == spool.read(len(held) - 1, 1)[0].hash  # numbering and chain go on
        assert verify_events((str(x.seq), x) for x in spool.scan()).ok
    finally:
        spool.close()


def test_a_full_spool_drops_the_oldest_and_says_so(tmp_path: pathlib.Path) -> None:
    spool = Spool(tmp_path / "spool", 64 << 10, ["http://sink.example/v1/logs"])
    try:
        for i in range(100):
            spool.append([Draft.of(ADMITTED, f"early {i}" + "x" * 200)], i)
        spool.ack("http://sink.example/v1/logs", 50)  # the sink has the first 50
        for i in range(400):
            spool.append([Draft.of(ADMITTED, f"late {i}" + "x" * 200)], 100 + i)
        stats = spool.stats()
        assert stats["bytes"] <= 64 << 10 and stats["dropped"] > 50
        assert stats["dropped_undelivered"] == stats["dropped"] - 50  # the delivered ones went first
        held = list(spool.scan())
        drops = [e for e in held if e.name == DROPPED]
        assert drops and all(isinstance(e.attr("wasmlog.count"), int) for e in drops)
        assert held[0].seq == stats["dropped"] + 1  # exactly the oldest ones are gone
        report = verify_events((f"seq {e.seq}", e) for e in held)
        assert report.ok, report.as_json()  # every missing seq is declared by a drop event the spool still holds
        assert report.nodes[spool.node].declared_dropped == stats["dropped"]
    finally:
        spool.close()


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    assert backoff(1, rng=lambda: 1.0) == 0.2 and backoff(1, rng=lambda: 0.0) == 0.1
    assert backoff(100, rng=lambda: 1.0) == BACKOFF_CAP
    assert backoff(3, 7.0) == 7.0 and backoff(3, 10**9) == 300.0
    assert parse_retry_after("5", 0) == 5.0 and parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4.0) == 6.0
    assert parse_retry_after("soon", 0) is None and parse_retry_after(None, 0) is None


async def test_delivery_retries_what_otlp_says_to_retry_and_nothing_else(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    partial = {"partialSuccess": {"rejectedLogRecords": "1", "errorMessage": "one too old"}}
    answers = [(503, {"Retry-After": "0"}, None), (429, {"Retry-After": "0"}, None), (400, {}, None), (200, {}, partial), (200, {}, {})]
    received: list[tuple[int, list[int], str]] = []

    async def sink(request: web.Request) -> web.Response:
        body = await request.json()
        seqs = [e.seq for _, e in events_of(parse_logs_request(body)) if isinstance(e, Event)]
        status, headers, body = answers.pop(0) if answers else (200, {}, {})
        received.append((status, seqs, request.headers["Content-Type"]))
        return web.json_response({"message": "no"} if body is None else body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/logs", sink)
    client = await aiohttp_client(app)
    url = str(client.make_url("/v1/logs"))
    spool = Spool(tmp_path / "spool", 1 << 20, [url])
    reports: list[Draft] = []

    async def report(d: Draft) -> None:
        reports.append(d)
        spool.append([d], 0)
        shipper.wake.set()

    spool.append([Draft.of(ADMITTED, f"e{i}") for i in range(3)], 0)
    shipper = Shipper(spool, url, report)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(shipper.run(session))
        try:
            await wait_until(lambda: shipper.status.delivered_through == 5, "both drop reports delivered", 30)
        finally:
            task.cancel()
    statuses = [s for s, _, _ in received]
    assert statuses == [503, 429, 400, 200, 200]  # 503 and 429 retried; 400 and a partial success not: drop reports follow
    assert [seqs for _, seqs, _ in received] == [[1, 2, 3]] * 3 + [[4], [5]]  # same events (same ids and seqs) on every retry
    assert all(ct == "application/json" for _, _, ct in received)
    assert [r.name for r in reports] == [DROPPED, DROPPED] and dict(reports[0].attrs)["wasmlog.dropped.sink"] == url
    assert dict(reports[0].attrs)["wasmlog.count"] == 3 and dict(reports[0].attrs)["wasmlog.dropped.first_seq"] == 1
    assert dict(reports[1].attrs)["wasmlog.count"] == 1 and "wasmlog.dropped.first_seq" not in dict(reports[1].attrs)  # which one: unknown
    assert spool.cursor(url) == 5
    spool.close()


async def test_the_collector_stores_what_it_accepts_and_answers_otlp(aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    from edge.telemetry_collector import make_collector_app

    client = await aiohttp_client(make_collector_app(tmp_path / "c"))
    events = make_chain(5)
    body = json.dumps(encode_request(events[:3])).encode()
    r = await client.post("/v1/logs", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json") and await r.json() == {}
    r = await client.post("/v1/logs", data=gzip.compress(json.dumps(encode_request(events[3:])).encode()),
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status == 200
    for data, ctype, status in [(body, "application/x-protobuf", 415), (b"{", "application/json", 400),
                                (b'{"resourceLogs": 5}', "application/json", 400), (b'{"a":1,"a":2}', "application/json", 400),
                                (b"x" * (9 << 20), "application/json", 413)]:
        r = await client.post("/v1/logs", data=data, headers={"Content-Type": ctype})
        assert r.status == status, (ctype, data[:20], await r.text())
        assert r.headers["Content-Type"].startswith("application/json") and "message" in await r.json()
    r = await client.post("/v1/logs", data=b"{}", headers={"Content-Type": "application/json"})
    assert r.status == 200  # an empty request is a success (and stores nothing)
    r = await client.get("/v1/logs/export")
    export = await r.read()
    assert r.status == 200 and len(export.splitlines()) == 2
    assert [e for _, e in export_items(export)] == events
    assert (tmp_path / "c" / "logs.jsonl").read_bytes() == export


async def test_the_collector_routes_and_statuses_are_documented_both_ways(tmp_path: pathlib.Path) -> None:
    import re

    from test_spec_routes import check_both_ways, documented

    from edge.telemetry_collector import STATUS, make_collector_app

    spec = (ROOT / "spec" / "telemetry.md").read_text()
    await check_both_ways(make_collector_app(tmp_path), documented(spec))
    table = spec[spec.index("| status |"):]
    assert {int(s) for s in re.findall(r"^\| (\d{3}) \|", table, re.MULTILINE)} == {s for _, s in STATUS} - {500}


async def test_signed_heads_verify_and_catch_an_edit_of_the_tail(tmp_path: pathlib.Path) -> None:
    from edge.telemetry import Telemetry
    from tlog.note import Ed25519Signer

    telemetry = Telemetry(tmp_path, [], 1 << 20, 10)
    try:
        for i in range(5):
            await telemetry.emit(Draft.of(ADMITTED, f"event {i}"))
        head = await telemetry.sign_head()
        assert head is not None and await telemetry.sign_head() is None  # nothing new to sign
        events = list(telemetry.spool.scan())
        vkey = telemetry.signer.vkey
    finally:
        telemetry.spool.close()
    items: list[tuple[str, Event | EventError]] = [(str(e.seq), e) for e in events]
    report = verify_events(items, vkey)
    assert report.ok and report.nodes[head.node].signed_through == 5 and report.nodes[head.node].key_pinned
    last = events[4]  # the event the head signs: the head event's link and its signature both catch an edit
    edited = Event(last.node, last.seq, last.id, last.time_ns, last.name, "nothing to see", last.attrs, last.prev)
    report = verify_events([*items[:4], ("5", edited), items[5]], vkey)
    assert sorted((f.kind, f.seq) for f in report.findings) == [("broken-link", 6), ("head-mismatch", 5)]
    head_edit = Event(head.node, head.seq, head.id, head.time_ns + 1, head.name, head.body, head.attrs, head.prev)
    report = verify_events([*items[:5], ("6", head_edit)], vkey)  # the newest event: nothing after it, not signed
    assert report.ok and report.nodes[head.node].as_json()["unsigned_tail"] == 1  # reported as not covered
    other = Ed25519Signer.generate("wasmlog-agent/" + head.node).vkey  # a key that is not the node's
    report = verify_events(items, other)
    assert [(f.kind, f.seq) for f in report.findings] == [("bad-signature", 6)]
