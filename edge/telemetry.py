"""The agent's telemetry: what the agent calls at its decision points, and the tasks that ship and sign.

- `moves`, `swept`, `request_failed`, `emit`: turn what happened into events and append them to the
  write-ahead spool (edge/telemetry_spool.py); each returns once its events are on disk, so the
  agent reports an action only after its event is durable.
- Refused, trapped, timed-out and memory-capped requests are aggregated per (event, module, reason)
  and interval: the first of an interval is spooled at once (count 1), the rest are counted in
  memory and spooled as one event with their count at the interval's end. A SIGKILL loses at most
  the counts of the interval in progress; a flood costs at most two events per key and interval.
- `running` (an aiohttp cleanup context): a Shipper per sink (edge/telemetry_ship.py), and a ticker
  that flushes the aggregates every interval and signs the chain head every HEAD_INTERVAL when it
  moved (also after every sweep and at shutdown): a C2SP signed note by the node's own Ed25519 key
  (DATA/telemetry/node.key), shipped as a wasmlog.telemetry.head_signed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import lmdb
from aiohttp import web

from tlog.errors import MalformedError
from tlog.keys import load_or_create_signer
from tlog.note import sign_note

from . import telemetry_events as ev
from .agent_state import ADMITTED, QUARANTINED, ModuleState
from .sandbox import DeadlineExceeded, MemoryExceeded, NoLongerAllowed, NotGranted, SandboxBusy, Trapped
from .telemetry_events import Draft, Event, head_note_text, node_key_name
from .telemetry_ship import Shipper
from .telemetry_spool import Spool, SpoolError

logger = logging.getLogger("wasmlog.agent.telemetry")
HEAD_INTERVAL = 60.0
NOT_SERVED = "not-served"  # request_failed's reason for a module that is refused or quarantined
SEEN = {"yanked": ev.YANK, "key-revoked": ev.REVOCATION}
INTEGRITY_KINDS = {"integrity", "rollback"}
QUIET_CHECKPOINT_REASONS = {"registry-unreachable", "registry-error"}


def _module_attrs(s: ModuleState) -> dict[str, ev.Value | None]:
    return {"wasmlog.module.ref": s.ref, "wasmlog.module.version": s.version,
            "wasmlog.module.digest": None if s.digest is None else "sha256:" + s.digest, "wasmlog.module.log_index": s.log_index}


def move_drafts(old: ModuleState | None, new: ModuleState) -> list[Draft]:
    """The events of a module's move from old to new (none when nothing that matters changed)."""
    if old is not None and (old.state, old.reason, old.version, old.digest) == (new.state, new.reason, new.version, new.digest):
        return []
    attrs = {**_module_attrs(new), "wasmlog.reason": new.reason, "wasmlog.state.previous": None if old is None else old.state}
    if new.state == ADMITTED:
        name = ev.RELEASED if old is not None and old.state == QUARANTINED and old.digest == new.digest else ev.ADMITTED
        return [Draft.of(name, f"{new.ref} admitted ({new.version})", attrs)]
    why = f"{new.reason}: {new.message}" if new.message else str(new.reason)
    out = [Draft.of(ev.QUARANTINED if new.state == QUARANTINED else ev.REFUSED, f"{new.ref} {new.state} ({why})", attrs)]
    if new.reason in SEEN:
        out.insert(0, Draft.of(SEEN[new.reason], f"{new.ref}: {why}", attrs))
    return out


def failure_name(error: Exception | None) -> tuple[str, str]:
    """(event name, reason) of a request that failed with error (None: the module is not served)."""
    if error is None:
        return ev.REQUEST_REFUSED, NOT_SERVED
    if isinstance(error, DeadlineExceeded):
        return ev.DEADLINE, "deadline"
    if isinstance(error, MemoryExceeded):
        return ev.MEMORY_CAP, "memory-cap"
    if isinstance(error, SandboxBusy):
        return ev.REQUEST_REFUSED, "busy"
    if isinstance(error, (NoLongerAllowed, NotGranted)):
        return ev.REQUEST_REFUSED, NOT_SERVED
    if isinstance(error, Trapped):
        return ev.TRAP, "trap"
    return ev.TRAP, type(error).__name__


class Telemetry:
    def __init__(self, data: pathlib.Path, sinks: Sequence[str], spool_bytes: int, interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        try:
            self.spool = Spool(data / "telemetry", spool_bytes, sinks)
            self.signer = load_or_create_signer(data / "telemetry" / "node", node_key_name(self.spool.node))
        except (lmdb.Error, MalformedError, OSError, UnicodeDecodeError) as e:
            raise SpoolError(f"the telemetry spool or key in {data / 'telemetry'} cannot be used: {e}") from None
        self.sinks = tuple(sinks)
        self.interval = interval
        self.clock = clock
        self.shippers = [Shipper(self.spool, url, self.emit) for url in self.sinks]
        self._aggregates: dict[tuple[str, str, str], list[Any]] = {}  # key -> [interval start ns, count since, module attrs]
        self._signed_seq = 0

    @property
    def node(self) -> str:
        return self.spool.node

    def now_ns(self) -> int:
        return int(self.clock() * 1e9)

    async def emit(self, *drafts: Draft, facts: dict[str, str] | None = None) -> list[Event]:
        """Append drafts to the spool; returns once they are on disk."""
        if not drafts and not facts:
            return []
        events = await asyncio.to_thread(self.spool.append, drafts, self.now_ns(), facts)
        for s in self.shippers:
            s.wake.set()
        return events

    async def moves(self, moves: Sequence[tuple[ModuleState | None, ModuleState]]) -> None:
        await self.emit(*(d for old, new in moves for d in move_drafts(old, new)))

    async def request_failed(self, ref: str, state: ModuleState | None, error: Exception | None) -> None:
        """A request for ref refused (error None: not admitted) or failed in the sandbox, aggregated."""
        name, reason = failure_name(error)
        key = (name, ref, reason)
        agg = self._aggregates.get(key)
        if agg is not None:
            agg[1] += 1
            return
        attrs = {**(_module_attrs(state) if state is not None else {"wasmlog.module.ref": ref}), "wasmlog.reason": reason}
        now = self.now_ns()
        self._aggregates[key] = [now, 0, attrs]
        await self.emit(Draft.of(name, f"{ref}: {reason} (first of this interval)", {
            **attrs, "wasmlog.count": 1, "wasmlog.interval.start_unix_nano": now, "wasmlog.interval.end_unix_nano": now}))

    async def flush(self) -> None:
        """Spool the counts aggregated since each key's first event, one event per key; start new intervals."""
        now, aggregates, self._aggregates = self.now_ns(), self._aggregates, {}
        drafts = [Draft.of(name, f"{ref}: {reason} x{count} more", {
            **attrs, "wasmlog.count": count, "wasmlog.interval.start_unix_nano": start, "wasmlog.interval.end_unix_nano": now})
            for (name, ref, reason), (start, count, attrs) in aggregates.items() if count > 0]
        await self.emit(*drafts)

    async def swept(self, result: dict[str, Any]) -> None:
        """A sweep's findings, its checkpoint if it advanced, the sweep itself; then sign the head."""
        drafts = [Draft.of(ev.INTEGRITY, str(f.get("message") or f"{f['kind']} finding: {f.get('what', '')}"), {
            "wasmlog.finding.kind": f["kind"], "wasmlog.finding.what": f.get("what") or f.get("reason"),
            "wasmlog.module.digest": None if f.get("digest") is None else "sha256:" + f["digest"],
            "wasmlog.module.ref": ",".join(f.get("refs", []))[:8192] or None})
            for f in result["findings"]
            if f["kind"] in INTEGRITY_KINDS or (f["kind"] == "checkpoint" and f.get("reason") not in QUIET_CHECKPOINT_REASONS)]
        cp, facts = result["checkpoint"], {}
        if cp.get("accepted"):
            known = self.spool.meta("checkpoint:" + cp["origin"])
            if known is None or int(known) < cp["size"]:
                facts["checkpoint:" + cp["origin"]] = str(cp["size"])
                drafts.append(Draft.of(ev.CHECKPOINT, f"{cp['origin']} at size {cp['size']}", {
                    "wasmlog.checkpoint.origin": cp["origin"], "wasmlog.checkpoint.size": cp["size"],
                    "wasmlog.checkpoint.previous_size": None if known is None else int(known)}))
        changed = sum(bool(m["changed"]) for m in result["modules"])
        drafts.append(Draft.of(ev.SWEEP, f"sweep: {len(result['findings'])} findings, {changed} modules changed", {
            "wasmlog.sweep.findings": len(result["findings"]), "wasmlog.sweep.changed": changed}))
        await self.emit(*drafts, facts=facts)
        await self.sign_head()

    async def sign_head(self) -> Event | None:
        """Sign the chain head (when it moved since the last signature) and spool the signature as an event."""
        seq, head = await asyncio.to_thread(self.spool.head)
        if seq == 0 or seq <= self._signed_seq:
            return None
        note = sign_note(head_note_text(self.node, seq, head), [self.signer]).decode()
        events = await self.emit(Draft.of(ev.HEAD_SIGNED, f"chain head signed at seq {seq}", {
            "wasmlog.head.seq": seq, "wasmlog.head.hash": head, "wasmlog.head.note": note, "wasmlog.node.vkey": self.signer.vkey}))
        self._signed_seq = events[-1].seq
        return events[-1]

    def status(self) -> dict[str, Any]:
        return {"node": self.node, "vkey": self.signer.vkey, "spool": self.spool.stats(),
                "sinks": [s.status.as_json() for s in self.shippers]}

    async def _tick(self) -> None:
        last_head = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)  # the aggregation interval itself
            try:
                await self.flush()
                if time.monotonic() - last_head >= HEAD_INTERVAL:
                    await self.sign_head()
                    last_head = time.monotonic()
            except Exception:  # logged; the next tick tries again
                logger.exception("telemetry tick failed")

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """Ship to every sink and tick while app runs; at shutdown flush, sign the head, close the spool."""
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(s.run(session)) for s in self.shippers]
            ticker = asyncio.create_task(self._tick())
            try:
                yield
            finally:
                for t in (ticker, *tasks):
                    t.cancel()
                for t in (ticker, *tasks):
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                with contextlib.suppress(Exception):
                    await self.flush()
                    await self.sign_head()
                self.spool.close()
