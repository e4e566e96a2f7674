"""Telemetry events of the edge agent: the event model, the hash chain and the signed chain head.
Pure (no I/O). Names and attributes: spec/telemetry.md.

An event is what the node decided or saw, numbered per node (seq from 1, never reused) and
chained: each carries the hash of the previous one (`prev`; 64 zeros for seq 1), and its own hash
covers every field, so an edit, a deletion or a reordering breaks the chain. The node signs the
chain head now and then (a C2SP signed note, `head_note_text`), itself shipped as an event.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from tlog.errors import MalformedError

# event.name of each kind of event
ADMITTED = "wasmlog.module.admitted"
REFUSED = "wasmlog.module.refused"
QUARANTINED = "wasmlog.module.quarantined"
RELEASED = "wasmlog.module.released"  # out of quarantine, admitted again
INTEGRITY = "wasmlog.integrity.finding"
SWEEP = "wasmlog.sweep.completed"
CHECKPOINT = "wasmlog.checkpoint.advanced"
YANK = "wasmlog.yank.seen"
REVOCATION = "wasmlog.revocation.seen"
REQUEST_REFUSED = "wasmlog.request.refused"  # aggregated per module and interval
TRAP = "wasmlog.request.trapped"  # aggregated
DEADLINE = "wasmlog.request.deadline_hit"  # aggregated
MEMORY_CAP = "wasmlog.request.memory_cap_hit"  # aggregated
DROPPED = "wasmlog.telemetry.dropped"
HEAD_SIGNED = "wasmlog.telemetry.head_signed"

INFO, WARN, ERROR = (9, "INFO"), (13, "WARN"), (17, "ERROR")  # OTLP SeverityNumber and its short name
SEVERITY: dict[str, tuple[int, str]] = {
    ADMITTED: INFO, RELEASED: INFO, SWEEP: INFO, CHECKPOINT: INFO, HEAD_SIGNED: INFO,
    REFUSED: WARN, QUARANTINED: WARN, YANK: WARN, REVOCATION: WARN, REQUEST_REFUSED: WARN, TRAP: WARN,
    DEADLINE: WARN, MEMORY_CAP: WARN, DROPPED: WARN,
    INTEGRITY: ERROR,
}

# The event's own attributes (besides event.name and wasmlog.event.*): name -> type. Anything else is refused.
ATTRIBUTES: dict[str, type] = {
    "wasmlog.module.ref": str, "wasmlog.module.version": str, "wasmlog.module.digest": str, "wasmlog.module.log_index": int,
    "wasmlog.reason": str, "wasmlog.state.previous": str, "wasmlog.count": int, "wasmlog.interval.start_unix_nano": int,
    "wasmlog.interval.end_unix_nano": int, "wasmlog.finding.kind": str, "wasmlog.finding.what": str,
    "wasmlog.checkpoint.origin": str, "wasmlog.checkpoint.size": int, "wasmlog.checkpoint.previous_size": int,
    "wasmlog.sweep.findings": int, "wasmlog.sweep.changed": int, "wasmlog.dropped.first_seq": int,
    "wasmlog.dropped.last_seq": int, "wasmlog.dropped.undelivered": int, "wasmlog.dropped.sink": str,
    "wasmlog.head.seq": int, "wasmlog.head.hash": str, "wasmlog.head.note": str, "wasmlog.node.vkey": str,
}
MAX_BODY = 1024
MAX_ATTR_STRING = 8192
MAX_SEQ = (1 << 63) - 1
MAX_TIME_NS = (1 << 64) - 1
GENESIS = "0" * 64  # prev of seq 1
HASH_CONTEXT = b"wasmlog.dev/telemetry-event/v1\n"
HEAD_ORIGIN = "wasmlog.dev/telemetry-head/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")
_NODE = re.compile(r"[0-9a-f]{32}")

Value = str | int


class EventError(MalformedError):
    """An event (or a chain head note) that is not well-formed: a field of the wrong type, range or shape."""


@dataclass(frozen=True)
class Draft:
    """What the agent reports: an event before the spool numbers, dates and chains it."""

    name: str
    body: str
    attrs: tuple[tuple[str, Value], ...] = ()

    @classmethod
    def of(cls, name: str, body: str, attrs: dict[str, Value | None] | None = None) -> Draft:
        """A draft; attributes whose value is None are left out, the body and strings cut to their bounds."""
        items = ((k, v[:MAX_ATTR_STRING] if isinstance(v, str) else v) for k, v in (attrs or {}).items() if v is not None)
        return cls(name, body[:MAX_BODY], tuple(sorted(items)))


@dataclass(frozen=True)
class Event:
    node: str  # 32 lowercase hex: the node's id, kept in its spool
    seq: int  # 1, 2, 3 ... per node, never reused
    id: str  # 32 lowercase hex, random, kept on every retry
    time_ns: int  # POSIX nanoseconds
    name: str
    body: str
    attrs: tuple[tuple[str, Value], ...]  # sorted by name
    prev: str  # hex SHA-256 of the previous event, GENESIS for seq 1

    @property
    def hash(self) -> str:
        return event_hash(self)

    def attr(self, key: str) -> Value | None:
        return dict(self.attrs).get(key)

    @property
    def severity(self) -> tuple[int, str]:
        return SEVERITY[self.name]

    def as_json(self) -> dict[str, object]:
        """The event as one JSON object (the spool's record and `wasmlog agent events --json`)."""
        return {"node": self.node, "seq": self.seq, "id": self.id, "time_unix_nano": self.time_ns, "name": self.name,
                "body": self.body, "attributes": dict(self.attrs), "prev": self.prev}


def check_event(e: Event) -> Event:
    """e, if every field has its type, range and shape; raises EventError naming the field otherwise."""
    if not _NODE.fullmatch(e.node):
        raise EventError(f"node id {e.node[:40]!r} is not 32 lowercase hex digits")
    if type(e.seq) is not int or not 1 <= e.seq <= MAX_SEQ:
        raise EventError(f"seq {e.seq!r} is not an integer from 1 to 2^63-1")
    if not _ID.fullmatch(e.id):
        raise EventError(f"event id {e.id[:40]!r} is not 32 lowercase hex digits")
    if type(e.time_ns) is not int or not 0 <= e.time_ns <= MAX_TIME_NS:
        raise EventError(f"time {e.time_ns!r} is not POSIX nanoseconds")
    if e.name not in SEVERITY:
        raise EventError(f"unknown event name {e.name[:80]!r}")
    if type(e.body) is not str or len(e.body) > MAX_BODY:
        raise EventError(f"body is not a string of at most {MAX_BODY} characters")
    if not _HEX64.fullmatch(e.prev) or (e.seq == 1) != (e.prev == GENESIS):
        raise EventError(f"prev {e.prev[:70]!r} is not a SHA-256 in hex (all zeros exactly for seq 1)")
    keys = [k for k, _ in e.attrs]
    if keys != sorted(set(keys)):
        raise EventError("attributes are not sorted by name without repeats")
    for k, v in e.attrs:
        want = ATTRIBUTES.get(k)
        if want is None:
            raise EventError(f"unknown attribute {k[:80]!r}")
        if type(v) is not want or (len(v) > MAX_ATTR_STRING if isinstance(v, str) else not 0 <= v <= MAX_SEQ):
            raise EventError(f"attribute {k} is not a {want.__name__} in range: {v!r:.80}")
    return e


def canonical(e: Event) -> bytes:
    """The bytes an event's hash covers: every field, in a fixed order, as compact ASCII JSON."""
    fields = [e.node, e.seq, e.id, e.time_ns, e.name, e.body, [[k, v] for k, v in e.attrs], e.prev]
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()


def event_hash(e: Event) -> str:
    return hashlib.sha256(HASH_CONTEXT + canonical(e)).hexdigest()


def chain(draft: Draft, *, node: str, seq: int, event_id: str, time_ns: int, prev: str) -> Event:
    """The next event of a chain whose head hash is prev. Raises EventError for a malformed draft."""
    return check_event(Event(node, seq, event_id, time_ns, draft.name, draft.body, draft.attrs, prev))


def event_from_json(obj: object) -> Event:
    """An event from its JSON object (Event.as_json); raises EventError."""
    fields = {"node", "seq", "id", "time_unix_nano", "name", "body", "attributes", "prev"}
    if type(obj) is not dict or set(obj) != fields or type(obj["attributes"]) is not dict:
        raise EventError(f"not a telemetry event object: {obj!r:.120}")
    for k in ("node", "id", "name", "body", "prev"):
        if type(obj[k]) is not str:
            raise EventError(f"{k} is not a string")
    return check_event(Event(obj["node"], obj["seq"], obj["id"], obj["time_unix_nano"], obj["name"], obj["body"],
                             tuple(sorted(obj["attributes"].items())), obj["prev"]))


def head_note_text(node: str, seq: int, head: str) -> str:
    """The text the node signs for its chain head: the event at seq has hash head."""
    return f"{HEAD_ORIGIN}\n{node}\n{seq}\n{head}\n"


def parse_head_note_text(text: str) -> tuple[str, int, str]:
    """(node, seq, head hash) of a head note's text; raises EventError."""
    m = re.fullmatch(r"([^\n]+)\n([0-9a-f]{32})\n([1-9][0-9]{0,18})\n([0-9a-f]{64})\n", text)
    if m is None or m[1] != HEAD_ORIGIN or int(m[3]) > MAX_SEQ:
        raise EventError(f"not a {HEAD_ORIGIN} note text: {text[:120]!r}")
    return m[2], int(m[3]), m[4]


def node_key_name(node: str) -> str:
    """The name of a node's telemetry signing key (a C2SP signed-note key name)."""
    return f"wasmlog-agent/{node}"
