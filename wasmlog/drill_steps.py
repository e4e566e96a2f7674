"""What `wasmlog drill`'s steps share: their report and timeline, a failed expectation, the agent's view
of a module, the edge decision on a release, and step 7's replay of the agent's telemetry from the collector."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from edge.telemetry_events import ADMITTED, CHECKPOINT, QUARANTINED, REFUSED, RELEASED, REQUEST_REFUSED
from edge.telemetry_events import Event as TelemetryEvent
from edge.telemetry_otlp import export_items
from edge.telemetry_verify import verify_events
from edge.verify import TrustPolicy, VerifyError, verify_module
from edge.verify_cli import online_facts
from registry.client import RegistryClient
from registry.record import PackageRef
from tlog.proof_file import parse_tlog_proof

REPLAY_TIMEOUT = 30.0  # seconds for the agent's events to reach the collector


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    at: float  # seconds since the drill started, when the step's outcome was known
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "at": self.at, "detail": self.detail}


@dataclass(frozen=True)
class Report:
    steps: list[Step]
    time_to_detect_s: float | None  # the attacker's publish sent -> the monitor reported it
    time_to_recover_s: float | None  # detection -> the agent serves the clean release

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def as_json(self) -> dict[str, Any]:
        return {"steps": [s.as_json() for s in self.steps], "time_to_detect_s": self.time_to_detect_s,
                "time_to_recover_s": self.time_to_recover_s}


class StepFailed(Exception):
    """A drill step that did not behave: the message says what was seen instead."""


def expect(condition: bool, otherwise: str) -> None:
    """Raise StepFailed(otherwise) unless condition holds."""
    if not condition:
        raise StepFailed(otherwise)


def module_entry(status: int, body: bytes, ref: str) -> dict[str, Any]:
    """The module ref in the agent's GET /status answer (status and body)."""
    expect(status == 200, f"the agent's /status answered {status}: {body[:200]!r}")
    m = next((m for m in json.loads(body)["modules"] if m["ref"] == ref), None)
    expect(m is not None, f"the agent's /status has no module {ref}")
    assert m is not None
    return m  # type: ignore[no-any-return]


async def edge_decision(api: RegistryClient, policy: TrustPolicy, ref: PackageRef) -> str:
    """What an edge verifier that follows the registry decides on ref now: "ok" or the reason code
    (the agent's admission check: the release's proof, module and SBOM, and the namespace's yanks and
    revocations fetched online)."""
    path = api.package_path(ref)
    tp = parse_tlog_proof(await api.get(path + "/tlog-proof"))
    meta = await api.get_json(path)
    sbom = await api.get(path + "/sbom") if meta["sbom"] else None
    now = int(time.time())
    assert tp.parsed is not None
    try:
        _, status = await online_facts(api.url, None, tp.parsed.size, ref.namespace, policy, now)
        verify_module(module=await api.get(path + "/module.wasm"), proof=tp, policy=policy, now=now, sbom=sbom, status=status)
    except VerifyError as e:
        return e.reason
    return "ok"


async def telemetry_replay(session: aiohttp.ClientSession, agent: str, collector: str, since: float, until: float) -> Replay:
    """Step 7's replay: every event the agent (URL agent) spooled up to now, as the collector (its /v1/logs
    URL) stored them, checked by `wasmlog telemetry verify`'s code with the node's key pinned (the
    chain, ids and seqs, the signed heads), and the node's events from since to until (POSIX seconds).
    Waits up to REPLAY_TIMEOUT for delivery."""
    async with session.get(agent + "/status") as r:
        expect(r.status == 200, f"the agent's /status answered {r.status}")
        telemetry = (await r.json())["telemetry"]
    node, vkey, spooled = telemetry["node"], telemetry["vkey"], telemetry["spool"]["node_events"]
    deadline = time.monotonic() + REPLAY_TIMEOUT
    while True:
        async with session.get(collector + "/export") as r:
            expect(r.status == 200, f"the collector's export answered {r.status}")
            items = list(export_items(await r.read()))
        delivered = max((e.seq for _, e in items if isinstance(e, TelemetryEvent) and e.node == node), default=0)
        if delivered >= spooled:
            break
        expect(time.monotonic() < deadline, f"after {REPLAY_TIMEOUT:.0f} s the collector has the agent's events up to seq {delivered} "
                                            f"of {spooled} (sinks: {telemetry['sinks']})")
        await asyncio.sleep(0.1)
    report = verify_events(items, key=vkey)
    expect(report.ok and node in report.nodes, f"the agent's telemetry does not verify: {[f.as_json() for f in report.findings][:5]}")
    window = sorted((e for _, e in items if isinstance(e, TelemetryEvent) and e.node == node and since * 1e9 <= e.time_ns <= until * 1e9),
                    key=lambda e: e.seq)
    return Replay(node, report.nodes[node].events, report.nodes[node].signed_through, window)


@dataclass(frozen=True)
class Replay:
    """What step 7 read back: the node, how many of its events verified, the newest seq under a verified
    head signature, and the window's events in seq order."""

    node: str
    events: int
    signed_through: int
    window: list[TelemetryEvent]

    def module_moves(self, ref: str) -> list[tuple[str, str | None, str | None]]:
        """(state, version, reason) of each admitted / refused / quarantined event of module ref, in order."""
        states = {ADMITTED: "admitted", RELEASED: "admitted", REFUSED: "refused", QUARANTINED: "quarantined"}
        return [(states[e.name], _str(e.attr("wasmlog.module.version")), _str(e.attr("wasmlog.reason")))
                for e in self.window if e.name in states and e.attr("wasmlog.module.ref") == ref]


    def checkpoint_size(self) -> int:
        """The largest log size the node's events say it advanced its trusted checkpoint to in the window."""
        return max((int(e.attr("wasmlog.checkpoint.size") or 0) for e in self.window if e.name == CHECKPOINT), default=0)

    def refused_requests(self, ref: str) -> int:
        """How many requests for ref the window's events count as refused."""
        return sum(int(e.attr("wasmlog.count") or 0) for e in self.window if e.name == REQUEST_REFUSED and e.attr("wasmlog.module.ref") == ref)


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def format_timeline(report: Report) -> str:
    lines = [f"{'+' + format(s.at, '.2f') + 's':>9}  {'ok  ' if s.ok else 'FAIL'}  {i}. {s.name}: {s.detail}"
             for i, s in enumerate(report.steps, 1)]
    times = [f"{what} {'-' if t is None else f'{t:.2f} s'}" for what, t in
             (("time to detect", report.time_to_detect_s), ("time to recover", report.time_to_recover_s))]
    failed = [s.name for s in report.steps if not s.ok]
    lines.append("; ".join(times))
    lines.append("drill passed: every step behaved" if not failed else f"drill FAILED: {', '.join(failed)}")
    return "\n".join(lines)
