"""Telemetry events as OTLP/HTTP JSON logs (opentelemetry-proto ExportLogsServiceRequest), both ways. Pure.

Encoding follows the OTLP JSON mapping: lowerCamelCase field names, 64-bit integers as decimal
strings, enums (severityNumber) as integers, attributes as KeyValue lists of AnyValue. Decoding is
strict about the fields it knows (their types and ranges, unique attribute keys, bounded sizes and
nesting) and ignores fields it does not know, as OTLP/JSON receivers must.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from registry.dsse import strict_json
from tlog.errors import MalformedError

from .telemetry_events import SEVERITY, Event, EventError, Value, check_event

SERVICE_NAME = "wasmlog-agent"
SCOPE = {"name": "wasmlog.agent", "version": "1"}
ID_KEYS = ("event.name", "wasmlog.event.id", "wasmlog.event.seq", "wasmlog.event.prev")
MAX_RECORDS = 100_000  # log records in one request
MAX_ATTRIBUTES = 256  # key-values in one list
MAX_DEPTH = 8  # nesting of arrayValue / kvlistValue
_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,19})")


class OtlpError(MalformedError):
    """An OTLP/JSON request that is not a well-formed ExportLogsServiceRequest (names the field)."""


# --- encoding --------------------------------------------------------------------------------

def _any(v: Value) -> dict[str, str]:
    return {"intValue": str(v)} if type(v) is int else {"stringValue": str(v)}


def _kv(key: str, v: Value) -> dict[str, object]:
    return {"key": key, "value": _any(v)}


def log_record(e: Event) -> dict[str, object]:
    number, text = e.severity
    return {
        "timeUnixNano": str(e.time_ns), "observedTimeUnixNano": str(e.time_ns), "severityNumber": number,
        "severityText": text, "body": {"stringValue": e.body}, "eventName": e.name,
        "attributes": [_kv("event.name", e.name), _kv("wasmlog.event.id", e.id), _kv("wasmlog.event.seq", e.seq),
                       _kv("wasmlog.event.prev", e.prev), *(_kv(k, v) for k, v in e.attrs)],
    }


def encode_request(events: Sequence[Event]) -> dict[str, object]:
    """One ExportLogsServiceRequest: a resourceLogs per node (in order of first appearance), records in order."""
    nodes: dict[str, list[Event]] = {}
    for e in events:
        nodes.setdefault(e.node, []).append(e)
    return {"resourceLogs": [
        {"resource": {"attributes": [_kv("service.name", SERVICE_NAME), _kv("service.instance.id", node)]},
         "scopeLogs": [{"scope": dict(SCOPE), "logRecords": [log_record(e) for e in evs]}]}
        for node, evs in nodes.items()
    ]}


# --- decoding --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogRecord:
    time_ns: int
    severity_number: int
    severity_text: str
    body: object
    attributes: dict[str, object]
    event_name: str


@dataclass(frozen=True)
class ResourceLogs:
    attributes: dict[str, object]
    records: tuple[LogRecord, ...]


def _obj(v: object, where: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise OtlpError(f"{where}: want an object, got {type(v).__name__}")
    return v


def _list(v: object, where: str, limit: int) -> list[Any]:
    if v is None:
        return []
    if type(v) is not list:
        raise OtlpError(f"{where}: want a list, got {type(v).__name__}")
    if len(v) > limit:
        raise OtlpError(f"{where}: over {limit} items")
    return v


def _str(v: object, where: str) -> str:
    if v is None:
        return ""
    if type(v) is not str:
        raise OtlpError(f"{where}: want a string")
    return v


def _int(v: object, where: str, low: int, high: int) -> int:
    """A protobuf JSON integer: a number or a decimal string (64-bit values are strings when we write them)."""
    if v is None:
        return 0
    if type(v) is str and _INT.fullmatch(v):
        n = int(v)
    elif type(v) is int:
        n = v
    else:
        raise OtlpError(f"{where}: want an integer (a number or a decimal string), got {v!r:.40}")
    if not low <= n <= high:
        raise OtlpError(f"{where}: {n} is out of range")
    return n


def _value(v: object, where: str, depth: int = 0) -> object:
    """An AnyValue as Python: str, bool, int, float, bytes (as its base64 text), list, dict; None when unset."""
    obj = _obj(v, where)
    known = [k for k in ("stringValue", "boolValue", "intValue", "doubleValue", "arrayValue", "kvlistValue", "bytesValue") if k in obj]
    if len(known) > 1:
        raise OtlpError(f"{where}: an AnyValue has one value, got {', '.join(known)}")
    if not known:
        return None
    k = known[0]
    if k in ("arrayValue", "kvlistValue") and depth >= MAX_DEPTH:
        raise OtlpError(f"{where}: nested over {MAX_DEPTH} levels")
    if k in {"stringValue", "bytesValue"}:
        return _str(obj[k], f"{where}.{k}")
    if k == "boolValue":
        if type(obj[k]) is not bool:
            raise OtlpError(f"{where}.boolValue: want true or false")
        return obj[k]
    if k == "intValue":
        return _int(obj[k], f"{where}.intValue", -(1 << 63), (1 << 63) - 1)
    if k == "doubleValue":
        if type(obj[k]) not in (int, float) and obj[k] not in ("NaN", "Infinity", "-Infinity"):
            raise OtlpError(f"{where}.doubleValue: want a number")
        return float(obj[k])
    inner = _obj(obj[k], f"{where}.{k}")
    items = _list(inner.get("values"), f"{where}.{k}.values", MAX_ATTRIBUTES)
    if k == "arrayValue":
        return [_value(x, f"{where}.{k}.values[{i}]", depth + 1) for i, x in enumerate(items)]
    return _attributes(items, f"{where}.{k}.values", depth + 1)


def _attributes(items: list[Any], where: str, depth: int = 0) -> dict[str, object]:
    out: dict[str, object] = {}
    for i, kv in enumerate(items):
        kv = _obj(kv, f"{where}[{i}]")
        key = _str(kv.get("key"), f"{where}[{i}].key")
        if key in out:
            raise OtlpError(f"{where}[{i}]: attribute key {key[:80]!r} repeated")
        out[key] = None if kv.get("value") is None else _value(kv["value"], f"{where}[{i}].value", depth)
    return out


def parse_logs_request(obj: object) -> list[ResourceLogs]:
    """A decoded ExportLogsServiceRequest; raises OtlpError naming the first field that is wrong."""
    top = _obj(obj, "request")
    out: list[ResourceLogs] = []
    count = 0
    for i, rl in enumerate(_list(top.get("resourceLogs"), "resourceLogs", MAX_RECORDS)):
        where = f"resourceLogs[{i}]"
        rl = _obj(rl, where)
        resource = _obj(rl.get("resource") or {}, f"{where}.resource")
        attrs = _attributes(_list(resource.get("attributes"), f"{where}.resource.attributes", MAX_ATTRIBUTES), f"{where}.resource.attributes")
        records: list[LogRecord] = []
        for j, sl in enumerate(_list(rl.get("scopeLogs"), f"{where}.scopeLogs", MAX_RECORDS)):
            sl = _obj(sl, f"{where}.scopeLogs[{j}]")
            for k, r in enumerate(_list(sl.get("logRecords"), f"{where}.scopeLogs[{j}].logRecords", MAX_RECORDS)):
                count += 1
                if count > MAX_RECORDS:
                    raise OtlpError(f"over {MAX_RECORDS} log records in one request")
                rw = f"{where}.scopeLogs[{j}].logRecords[{k}]"
                r = _obj(r, rw)
                records.append(LogRecord(
                    time_ns=_int(r.get("timeUnixNano"), f"{rw}.timeUnixNano", 0, (1 << 64) - 1),
                    severity_number=_int(r.get("severityNumber"), f"{rw}.severityNumber", 0, 24),
                    severity_text=_str(r.get("severityText"), f"{rw}.severityText"),
                    body=None if r.get("body") is None else _value(r["body"], f"{rw}.body"),
                    attributes=_attributes(_list(r.get("attributes"), f"{rw}.attributes", MAX_ATTRIBUTES), f"{rw}.attributes"),
                    event_name=_str(r.get("eventName"), f"{rw}.eventName"),
                ))
                _int(r.get("observedTimeUnixNano"), f"{rw}.observedTimeUnixNano", 0, (1 << 64) - 1)
                _int(r.get("flags"), f"{rw}.flags", 0, (1 << 32) - 1)
                _int(r.get("droppedAttributesCount"), f"{rw}.droppedAttributesCount", 0, (1 << 32) - 1)
        out.append(ResourceLogs(attrs, tuple(records)))
    return out


def record_count(resources: Sequence[ResourceLogs]) -> int:
    return sum(len(r.records) for r in resources)


def event_of(node: str, r: LogRecord) -> Event:
    """The wasmlog event a log record carries (of a resource with service.name wasmlog-agent); raises EventError."""
    a = dict(r.attributes)
    missing = [k for k in ID_KEYS if k not in a]
    if missing:
        raise EventError(f"not a wasmlog event: no attribute {missing[0]}")
    name, event_id, seq, prev = (a.pop(k) for k in ID_KEYS)
    if type(name) is not str or type(event_id) is not str or type(seq) is not int or type(prev) is not str:
        raise EventError("event.name, wasmlog.event.id and wasmlog.event.prev are strings, wasmlog.event.seq an integer")
    if type(r.body) is not str:
        raise EventError("the body is not a string")
    if r.event_name not in ("", name):
        raise EventError(f"eventName {r.event_name[:80]!r} is not event.name {name[:80]!r}")
    attrs: list[tuple[str, Value]] = []
    for k, v in a.items():
        if type(v) not in (str, int):
            raise EventError(f"attribute {k[:80]} is not a string or an integer")
        attrs.append((k, v))  # type: ignore[arg-type]
    e = check_event(Event(node, seq, event_id, r.time_ns, name, r.body, tuple(sorted(attrs)), prev))
    if (r.severity_number, r.severity_text) != SEVERITY[name]:
        raise EventError(f"severity {r.severity_number} {r.severity_text[:20]!r} is not {name}'s {SEVERITY[name]}")
    return e


def events_of(resources: Sequence[ResourceLogs]) -> Iterator[tuple[int, Event | EventError]]:
    """(record number in the request, the event or why it is none) for each record of a wasmlog agent."""
    n = 0
    for rl in resources:
        if rl.attributes.get("service.name") != SERVICE_NAME:
            n += len(rl.records)
            continue
        node = rl.attributes.get("service.instance.id")
        for r in rl.records:
            n += 1
            if type(node) is not str:
                yield n, EventError("the resource has no service.instance.id string")
                continue
            try:
                yield n, event_of(node, r)
            except EventError as e:
                yield n, e


def export_items(data: bytes) -> Iterator[tuple[str, Event | EventError]]:
    """The events of an export: one OTLP JSON request, or JSON lines of requests (as the collector stores them).
    Each item says where it is ("line L record R"); a line that is not a request is one EventError item."""
    lines: list[tuple[int, object]] = []
    try:
        lines.append((0 if b"\n" in data.strip() else 1, strict_json(data, "the export")))  # one JSON line is line 1
    except MalformedError:
        for n, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                try:
                    lines.append((n, strict_json(line, f"line {n}")))
                except MalformedError as e:
                    lines.append((n, e))
    for n, obj in lines:
        where = f"line {n}" if n else "the request"
        if isinstance(obj, MalformedError):
            yield where, EventError(str(obj))
            continue
        try:
            resources = parse_logs_request(obj)
        except OtlpError as e:
            yield where, EventError(f"not an ExportLogsServiceRequest: {e}")
            continue
        for k, item in events_of(resources):
            yield f"{where} record {k}", item
