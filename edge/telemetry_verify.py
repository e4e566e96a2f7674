"""Verify an export of telemetry events: gaps, edits, reordering, reused ids or seqs, bad head signatures. Pure.

Input is the events in the order the export holds them, each with where it is (a line and record
number, a spool seq), or why a record there is not an event. Per node:

- an event whose id was already seen with the very same content is a redelivery (at-least-once), skipped;
  the same id on another event, or two events with one seq, is a finding;
- in export order seqs must rise (`reordered` otherwise);
- each event's prev must be the hash of the event before it (`broken-link`: one of the two was edited);
- missing seqs are a `gap` unless a wasmlog.telemetry.dropped event of the node declares them dropped;
- each signed chain head (wasmlog.telemetry.head_signed) must verify with the node's key (pinned with
  `key`, else the one the event names) and name the hash of the event at its seq (`head-mismatch`).
Events after the last signed head are reported as `unsigned_tail`: an edit there cannot be seen.
A collector's retention may have dropped a node's oldest events: given, per node, the highest seq
it dropped and that event's hash, the seqs up to it are counted as `retention_dropped` (not a gap)
and the next event must link to that hash (`broken-link` otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tlog.errors import TlogError
from tlog.note import parse_note, verifier_from_vkey, verify_note

from .telemetry_events import DROPPED, HEAD_SIGNED, Event, EventError, parse_head_note_text


@dataclass(frozen=True)
class Finding:
    kind: str  # not-an-event | id-reused | seq-reused | reordered | broken-link | gap | bad-signature | head-mismatch
    node: str | None
    seq: int | None
    where: str
    message: str

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "node": self.node, "seq": self.seq, "where": self.where, "message": self.message}


@dataclass
class NodeReport:
    events: int = 0
    duplicates: int = 0
    first_seq: int = 0
    last_seq: int = 0
    declared_dropped: int = 0  # seqs missing here that the node said it dropped
    retention_dropped: int = 0  # seqs missing here that the collector's retention dropped
    signed_through: int = 0  # the newest seq covered by a verified head signature
    key_pinned: bool = False

    def as_json(self) -> dict[str, object]:
        return {**self.__dict__, "unsigned_tail": max(0, self.last_seq - self.signed_through)}


@dataclass
class Report:
    nodes: dict[str, NodeReport] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and bool(self.nodes)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "nodes": {n: r.as_json() for n, r in self.nodes.items()}, "findings": [f.as_json() for f in self.findings]}


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive numbers in sorted seqs."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] + 1 == s:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def verify_events(items: Iterable[tuple[str, Event | EventError]], key: str | None = None,
                  retained_after: Mapping[str, tuple[int, str]] | None = None) -> Report:
    """Check items (where, event or the error of a record that is not one) as described above;
    retained_after: per node, (the highest seq the collector's retention dropped, that event's hash)."""
    report = Report()
    by_node: dict[str, dict[int, tuple[str, Event]]] = {}
    ids: dict[str, Event] = {}
    last: dict[str, tuple[int, str]] = {}
    for where, e in items:
        if isinstance(e, EventError):
            report.findings.append(Finding("not-an-event", None, None, where, str(e)))
            continue
        node = report.nodes.setdefault(e.node, NodeReport())
        seen = ids.get(e.id)
        if seen == e:
            node.duplicates += 1
            continue
        if seen is not None:
            message = f"event id {e.id} names two different events (seq {seen.seq} and {e.seq})"
            report.findings.append(Finding("id-reused", e.node, e.seq, where, message))
            continue
        ids[e.id] = e
        seqs = by_node.setdefault(e.node, {})
        if e.seq in seqs:
            report.findings.append(Finding("seq-reused", e.node, e.seq, where, f"seq {e.seq} is also {seqs[e.seq][0]}, another event"))
            continue
        seqs[e.seq] = (where, e)
        node.events += 1
        if e.node in last and e.seq < last[e.node][0]:
            report.findings.append(Finding("reordered", e.node, e.seq, where, f"seq {e.seq} comes after seq {last[e.node][0]} ({last[e.node][1]})"))
        if e.node not in last or e.seq > last[e.node][0]:
            last[e.node] = (e.seq, where)
    for node_id, seqs in by_node.items():
        _check_node(report, node_id, seqs, key, (retained_after or {}).get(node_id))
    return report


def _check_node(report: Report, node_id: str, seqs: dict[int, tuple[str, Event]], key: str | None,
                retention: tuple[int, str] | None) -> None:
    node = report.nodes[node_id]
    order = sorted(seqs)
    node.first_seq, node.last_seq = order[0], order[-1]
    through, through_hash = retention or (0, "")
    if through and through + 1 in seqs and seqs[through + 1][1].prev != through_hash:
        where = seqs[through + 1][0]
        report.findings.append(Finding("broken-link", node_id, through + 1, where,
                                       f"seq {through + 1}'s prev is not the hash of seq {through}, the last event retention dropped"))
    for s in order:
        where, e = seqs[s]
        if s - 1 in seqs and seqs[s - 1][1].hash != e.prev:
            report.findings.append(Finding("broken-link", node_id, s, where,
                                           f"seq {s}'s prev is not the hash of seq {s - 1} ({seqs[s - 1][0]}): one of them was edited"))
    declared: set[int] = set()
    for _, e in seqs.values():
        first, last = e.attr("wasmlog.dropped.first_seq"), e.attr("wasmlog.dropped.last_seq")
        if e.name == DROPPED and type(first) is int and type(last) is int and first <= last < e.seq:
            declared.update(range(first, last + 1))  # bounded: a drop names seqs before its own
    missing = [s for s in range(through + 1, order[-1] + 1) if s not in seqs]
    node.retention_dropped = sum(s not in seqs for s in range(1, min(through, order[-1]) + 1))
    node.declared_dropped = sum(s in declared for s in missing)
    for lo, hi in _ranges([s for s in missing if s not in declared]):
        after = seqs[lo - 1][0] if lo - 1 in seqs else "the start"
        report.findings.append(Finding("gap", node_id, lo, f"after {after}",
                                       f"seq {lo}..{hi} missing ({hi - lo + 1} events), not declared dropped"))
    for s in order:
        where, e = seqs[s]
        if e.name == HEAD_SIGNED:
            _check_head(report, node, node_id, seqs, where, e, key)


def _check_head(report: Report, node: NodeReport, node_id: str, seqs: dict[int, tuple[str, Event]], where: str, e: Event,
                key: str | None) -> None:
    note_text, vkey = e.attr("wasmlog.head.note"), key or e.attr("wasmlog.node.vkey")
    try:
        if type(note_text) is not str or type(vkey) is not str:
            raise EventError("a head event without wasmlog.head.note or wasmlog.node.vkey")
        note = parse_note(note_text.encode())
        if not verify_note(note, [verifier_from_vkey(vkey)]):
            raise EventError("no signature by the node's key")
    except TlogError as err:
        report.findings.append(Finding("bad-signature", node_id, e.seq, where, f"the chain head signed at seq {e.seq} does not verify: {err}"))
        return
    try:
        signed_node, seq, head = parse_head_note_text(note.text)
    except EventError as err:
        report.findings.append(Finding("bad-signature", node_id, e.seq, where, str(err)))
        return
    if signed_node != node_id or seq >= e.seq:
        report.findings.append(Finding("head-mismatch", node_id, e.seq, where, f"the head note names node {signed_node} seq {seq}"))
    elif seq in seqs and seqs[seq][1].hash != head:
        report.findings.append(Finding("head-mismatch", node_id, seq, seqs[seq][0],
                                       f"seq {seq} is not the event the node signed at seq {e.seq} ({where}): edited"))
    elif seq in seqs:
        node.signed_through = max(node.signed_through, seq)
        node.key_pinned = key is not None
