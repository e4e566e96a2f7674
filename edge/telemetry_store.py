"""The telemetry collector's store (spec/telemetry.md "Collector"): accepted requests as JSON lines in
numbered segments under a total size bound, each event stored once.

Files in DATA:
- `logs.jsonl`, the open segment: one accepted request per line (compact JSON), appended and fsynced
  before the request is answered. A line that would take it past the segment size is written after
  it is closed: renamed `logs.N.jsonl`, N one more than the newest closed segment (never a line split).
- `logs.N.jsonl`, the closed segments, oldest first. After a rotation the oldest go while all the
  segments together exceed the retention bound (the open one never goes).
- `retention.json`, what retention dropped: per node the highest seq dropped and that event's hash
  (so a verifier can tell retention from a gap and check the first kept event's link), and totals.
  Written (atomically, fsynced) before the segment is unlinked.

Redelivery (OTLP clients retry a batch when its answer was lost): an event whose hash is among the
last WINDOW events stored is not stored again (its hash covers node, seq, id and every field, so
an event reusing an id with other content is stored, for the verifier to report). A request with
no new event is answered 200 and not stored; otherwise only its new records are. After a restart
the window is refilled from the last TAIL_BYTES of the open segment.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from .telemetry_events import Event
from .telemetry_otlp import ResourceLogs, events_of, export_items

DEFAULT_RETAIN_BYTES = 1 << 30
MIN_RETAIN_BYTES = 64 << 10
MAX_SEGMENT_BYTES = 16 << 20
WINDOW = 16384  # events: 32 full batches of the agent's (edge/telemetry_ship.py BATCH_EVENTS)
TAIL_BYTES = 4 << 20
OPEN = "logs.jsonl"
_CLOSED = re.compile(r"logs\.([1-9][0-9]{0,17})\.jsonl")
RETENTION = "retention.json"


def segment_bytes(retain_bytes: int) -> int:
    """A closed segment's size: a quarter of the bound, at most MAX_SEGMENT_BYTES."""
    return min(MAX_SEGMENT_BYTES, retain_bytes // 4)


def segments(data: pathlib.Path) -> list[pathlib.Path]:
    """The store's segments, oldest first: the closed ones by number, then the open one (if present)."""
    closed = sorted((int(m.group(1)), p) for p in data.glob("logs.*.jsonl") if (m := _CLOSED.fullmatch(p.name)))
    return [p for _, p in closed] + ([data / OPEN] if (data / OPEN).is_file() else [])


def read_retention(data: pathlib.Path) -> dict[str, Any]:
    """retention.json, or an empty record when retention has dropped nothing. Raises ValueError
    (json.JSONDecodeError included) for a file that is not a retention record."""
    try:
        obj = json.loads((data / RETENTION).read_bytes())
    except FileNotFoundError:
        return {"segments": 0, "requests": 0, "nodes": {}}
    if type(obj) is not dict or type(obj.get("nodes")) is not dict or type(obj.get("segments")) is not int \
            or type(obj.get("requests")) is not int:
        raise ValueError(f"{data / RETENTION} is not a retention record")
    return obj


def dropped_through(retention: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Per node, (the highest seq retention dropped, that event's hash)."""
    out = {}
    for node, v in retention["nodes"].items():
        if type(v) is not dict or type(v.get("seq")) is not int or type(v.get("hash")) is not str:
            raise ValueError(f"the retention record of node {node!r} is not {{seq, hash}}")
        out[node] = (v["seq"], v["hash"])
    return out


def stored_items(data: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """The events of every segment, oldest first, each named by file, line and record (export_items)."""
    for path in segments(data):
        for where, item in export_items(path.read_bytes()):
            yield f"{path.name} {where}", item


class LogStore:
    """DATA's segments, appended under a lock (call append from one thread at a time or from threads)."""

    def __init__(self, data: pathlib.Path, retain_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        if retain_bytes < MIN_RETAIN_BYTES:
            raise ValueError(f"the collector's retention bound is at least {MIN_RETAIN_BYTES} bytes")
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data, self.path = data, data / OPEN
        self.retain_bytes, self.segment_bytes = retain_bytes, segment_bytes(retain_bytes)
        self._lock = threading.Lock()
        self.requests = self.records = self.redelivered = 0
        self._window: collections.OrderedDict[str, None] = collections.OrderedDict()
        dropped_through(read_retention(data))  # a damaged retention record stops the collector here, not at a rotation
        self._refill_window()

    def append(self, request: Any, resources: list[ResourceLogs]) -> int:
        """Store request (parsed as resources) without the events already stored; the records stored."""
        with self._lock:
            hashes = {n: e.hash for n, e in events_of(resources) if isinstance(e, Event)}
            known, seen = set(), set()
            for n, h in hashes.items():
                if h in self._window or h in seen:
                    known.add(n)
                seen.add(h)
            total = sum(len(r.records) for r in resources)
            self.redelivered += len(known)
            if len(known) == total:
                return 0
            line = json.dumps(_without(request, known) if known else request, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(line) > self.segment_bytes:
                self._close_segment()
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._remember(h for n, h in hashes.items() if n not in known)
            self.requests += 1
            self.records += total - len(known)
            self._apply_retention()
            return total - len(known)

    def _remember(self, hashes: Iterable[str]) -> None:
        for h in hashes:
            self._window[h] = None
            self._window.move_to_end(h)
        while len(self._window) > WINDOW:
            self._window.popitem(last=False)

    def _refill_window(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
        if size > TAIL_BYTES:
            tail = tail[tail.find(b"\n") + 1:]  # from the first whole line
        self._remember(e.hash for _, e in export_items(tail) if isinstance(e, Event))

    def _close_segment(self) -> None:
        closed = segments(self.data)[:-1]
        number = int(_CLOSED.fullmatch(closed[-1].name).group(1)) + 1 if closed else 1  # type: ignore[union-attr]
        os.rename(self.path, self.data / f"logs.{number}.jsonl")
        _sync_dir(self.data)

    def _apply_retention(self) -> None:
        files = segments(self.data)
        sizes = [p.stat().st_size for p in files]
        while len(files) > 1 and sum(sizes) > self.retain_bytes:
            self._record_drop(files[0])
            files[0].unlink()
            _sync_dir(self.data)
            files, sizes = files[1:], sizes[1:]

    def _record_drop(self, segment: pathlib.Path) -> None:
        record = read_retention(self.data)
        lines = segment.read_bytes()
        for _, e in export_items(lines):
            if isinstance(e, Event) and e.seq > record["nodes"].get(e.node, {}).get("seq", 0):
                record["nodes"][e.node] = {"seq": e.seq, "hash": e.hash}
        record["segments"] += 1
        record["requests"] += lines.count(b"\n")
        tmp = self.data / (RETENTION + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(record, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.data / RETENTION)
        _sync_dir(self.data)


def _without(request: dict[str, Any], numbers: set[int]) -> dict[str, Any]:
    """request without its log records numbered so (1, 2, ... in order, as events_of numbers them)."""
    n = 0
    resource_logs = []
    for rl in request.get("resourceLogs") or []:
        scope_logs = []
        for sl in rl.get("scopeLogs") or []:
            kept = []
            for r in sl.get("logRecords") or []:
                n += 1
                if n not in numbers:
                    kept.append(r)
            scope_logs.append({**sl, "logRecords": kept})
        resource_logs.append({**rl, "scopeLogs": scope_logs})
    return {**request, "resourceLogs": resource_logs}


def _sync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

