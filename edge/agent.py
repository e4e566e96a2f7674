"""The edge agent: keeps the configured modules admitted, refused or quarantined, and sweeps.

State changes are written to disk (state.json, atomically, under the node's MAC) before they are
acted on: a module is served only once its admission is on disk, and stops being served as soon as
its quarantine is. A start loads state.json and runs one sweep before anything is served: what the
sweep cannot re-check (its sources are down) keeps the state on disk, so nothing refused or
quarantined runs again until a sweep admits it. A state.json that is missing while modules were
admitted, malformed, or whose MAC does not check is not used at all: the start-up sweep decides
everything anew, and a module it cannot verify is not served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import pathlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp

from edge.state import load_known
from edge.verify import (
    TrustPolicy,
    VerifyError,
    open_checkpoint,
    parse_trust_policy,
)

from .agent_admission import FETCH_TIMEOUT, Admission, Decision, is_final
from .agent_config import AgentConfig, ModuleConfig
from .agent_state import ADMITTED, QUARANTINED, ModuleState, ModuleStore, StateError, StateFile, state_key
from .agent_sweep import next_state, refresh_checkpoint, status_stale
from .artifacts import load_or_create_key
from .sandbox import Sandbox
from .telemetry import Telemetry

logger = logging.getLogger("wasmlog.agent")
MAX_POLICY_BYTES = 1 << 20
ADMISSION_CONCURRENCY = 8  # fetches in flight during a sweep (verification itself is one at a time)


def load_trust_policy(path: pathlib.Path) -> TrustPolicy:
    """Read and parse the trust policy file. Raises VerifyError (policy-malformed, input-unreadable)."""
    try:
        if path.stat().st_size > MAX_POLICY_BYTES:
            raise VerifyError("policy-malformed", f"trust policy {path} is too large")
        text = path.read_text("utf-8", "replace")
    except OSError as e:
        raise VerifyError("input-unreadable", f"cannot read the trust policy {path}: {e.strerror}") from None
    return parse_trust_policy(text)


class Agent:
    def __init__(self, config: AgentConfig, sandbox: Sandbox, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.sandbox = sandbox
        self.clock = clock
        self.policy = load_trust_policy(config.trust_policy)
        config.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_file = StateFile(config.data, state_key(load_or_create_key(config.data / "artifact.key")))
        self.store = ModuleStore(config.data)
        self.checkpoints = config.data / "checkpoints"
        self.modules: dict[str, ModuleState] = {}
        self.lock = asyncio.Lock()  # one admission round or sweep at a time
        self._writing = asyncio.Lock()  # one change of state.json at a time (a sweep, a quarantine while serving)
        self.started: dict[str, Any] | None = None  # when, and what state.json was worth
        self.last_sweep: dict[str, Any] | None = None
        self.sweeps = 0
        self.findings_total: collections.Counter[str] = collections.Counter()  # by kind, over every sweep (the metrics)
        self.sources: dict[str, dict[str, Any]] = {url: {"last_ok": None, "last_error": None} for url in config.registries}
        self._next_sweep: asyncio.Future[dict[str, Any]] | None = None  # the sweep the callers since the running one wait for
        self._next_trigger = "request"  # who asked for it first: start, interval, request
        self.sweep_waiting = 0  # callers waiting for a sweep's result (the running one's, or the next one's)
        self._sweeper: asyncio.Task[None] | None = None
        self.telemetry = Telemetry(config.data, config.telemetry.sinks, config.telemetry.spool_bytes, config.telemetry.interval, clock)
        self.prewarming: asyncio.Future[dict[str, str]] | None = None
        self.prewarm_failures: dict[str, str] = {}  # digest -> why the last prewarm could not compile it

    def now(self) -> int:
        return int(self.clock())

    async def start(self) -> None:
        """Load state.json (its MAC checked), then run one sweep; serve nothing before this returns."""
        loaded, state_file = await asyncio.to_thread(self._load_state)
        self.modules = {m.ref: loaded[m.ref] for m in self.config.modules if m.ref in loaded and loaded[m.ref].profile == m.profile}
        if state_file.startswith("tampered"):
            logger.warning("state.json %s: nothing is served until the start-up sweep verifies it again", state_file)
        await self._save()
        self.started = {"time": self.now(), "state_file": state_file}
        await self.sweep("start")
        self.started["serving_since"] = self.now()

    def prewarm(self) -> None:
        """Compile the admitted modules' artifacts in the background, so that no first request waits for it.
        A stored module found not to hash to its digest is quarantined at once, as a request would."""
        self.prewarming = asyncio.ensure_future(self._prewarm([(s.digest, self.store.path(s.digest)) for s in self.modules.values()
                                                               if s.state == ADMITTED and s.digest is not None]))

    async def _prewarm(self, modules: list[tuple[str, pathlib.Path]]) -> dict[str, str]:
        self.prewarm_failures = failures = await self.sandbox.prewarm(modules)
        for digest in failures:
            if await asyncio.to_thread(self.store.get, digest) is None:  # missing, or not the bytes admitted
                for ref in [ref for ref, s in self.modules.items() if s.digest == digest and s.state == ADMITTED]:
                    await self.quarantine(ref, "integrity", f"the stored module sha256:{digest[:16]} does not hash to its digest "
                                          "(found by a prewarm)", {digest})
        return failures

    def _load_state(self) -> tuple[dict[str, ModuleState], str]:
        try:
            loaded = self.state_file.load()
        except StateError as e:
            return {}, f"tampered: {e}"
        if loaded is None:
            if next(self.store.digests(), None) is not None:
                return {}, "tampered: state.json is missing, though modules were admitted"
            return {}, "new"
        return loaded, "verified"

    async def _decide(self, admission: Admission, session: aiohttp.ClientSession, modules: list[ModuleConfig]) -> list[Decision]:
        """Admission decisions for modules, ADMISSION_CONCURRENCY fetching at once."""
        gate = asyncio.Semaphore(ADMISSION_CONCURRENCY)

        async def decide(m: ModuleConfig) -> Decision:
            old = self.modules.get(m.ref)
            admitted = old.version if old is not None and old.state in (ADMITTED, QUARANTINED) else None
            async with gate:
                return await admission.decide(session, m, self.config.profiles[m.profile], admitted)

        return list(await asyncio.gather(*(decide(m) for m in modules)))

    async def _apply(self, decisions: list[tuple[ModuleConfig, Decision]]) -> list[tuple[ModuleState | None, ModuleState]]:
        """Move each module to its next state; the new states are on disk before they are served."""
        async with self._writing:
            now = self.now()
            changed = dict(self.modules)
            moves = []
            max_status_age = self.policy.max_status_age if self.policy.require_status else None
            for m, decision in decisions:
                old = self.modules.get(m.ref)
                new = next_state(old, decision, m.profile, m.ref, now, max_status_age)
                changed[m.ref] = new
                moves.append((old, new))
                if new != old:
                    logger.info("%s: %s%s", m.ref, new.state, f" ({new.reason}: {new.message})" if new.reason else "")
            if changed != self.modules:
                await asyncio.to_thread(self.state_file.save, changed)
                await self.telemetry.moves(moves)  # on disk before it is served or reported
                self.modules = changed
            return moves

    async def _save(self) -> None:
        await asyncio.to_thread(self.state_file.save, dict(self.modules))

    async def quarantine(self, ref: str, reason: str, message: str, digests: set[str] | None = None) -> None:
        """Stop serving ref now (only if it is admitted, and still the release with one of digests, when given:
        a module never admitted stays refused)."""
        async with self._writing:
            old = self.modules.get(ref)
            if old is None or old.state != ADMITTED or (digests is not None and old.digest not in digests):
                return
            new = replace(old, state=QUARANTINED, reason=reason, message=message, since=self.now())
            changed = {**self.modules, ref: new}
            await asyncio.to_thread(self.state_file.save, changed)
            await self.telemetry.moves([(old, new)])
            self.modules = changed
        logger.warning("%s: quarantined (%s: %s)", ref, reason, message)

    def status_stale(self, s: ModuleState) -> str | None:
        """With require_status, why admitted s may no longer be served (its newest verified status proof aged
        out since the last sweep), else None."""
        if not self.policy.require_status or s.state != ADMITTED:
            return None
        return status_stale(s, self.now(), self.policy.max_status_age)

    def serving(self, namespace: str, name: str) -> tuple[ModuleConfig, ModuleState | None] | None:
        m = self.config.module(namespace, name)
        return None if m is None else (m, self.modules.get(m.ref))

    async def sweep(self, trigger: str = "request") -> dict[str, Any]:
        """The result of a sweep that starts after this call. Sweeps are coalesced: while one runs, every
        caller waits for the one next sweep, which starts when the running one ends (never more queued)."""
        if self._next_sweep is None:
            self._next_sweep = asyncio.get_running_loop().create_future()
            self._next_trigger = trigger
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep_while_asked())
        future = self._next_sweep
        self.sweep_waiting += 1
        try:
            return await asyncio.shield(future)
        finally:
            self.sweep_waiting -= 1

    async def close(self) -> None:
        """Stop a sweep in progress (its callers get CancelledError) and a prewarm."""
        if self.prewarming is not None:
            self.prewarming.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._next_sweep is not None and not self._next_sweep.done():
            self._next_sweep.cancel()

    async def _sweep_while_asked(self) -> None:
        try:
            while (future := self._next_sweep) is not None:
                self._next_sweep = None
                try:
                    result = await self._sweep(self._next_trigger)
                except asyncio.CancelledError:
                    future.cancel()
                    raise
                except Exception as e:  # noqa: BLE001 -- handed to every caller of this sweep
                    future.set_exception(e)
                else:
                    future.set_result(result)
        finally:
            self._sweeper = None

    async def _sweep(self, trigger: str) -> dict[str, Any]:
        """One integrity sweep (see README "Edge agent"); returns what it found and did."""
        async with self.lock:
            started = time.monotonic()
            now = self.now()
            findings: list[dict[str, Any]] = []
            try:
                self.policy = await asyncio.to_thread(load_trust_policy, self.config.trust_policy)
            except VerifyError as e:
                findings.append({"kind": "trust-policy", "reason": e.reason, "message": f"{e} (the previous policy stays in force)"})
            for digest in await asyncio.to_thread(self.store.check):
                refs = sorted(ref for ref, s in self.modules.items() if s.digest == digest)
                findings.append({"kind": "integrity", "what": "module", "digest": digest, "refs": refs})
                for ref in refs:
                    await self.quarantine(ref, "integrity", f"the stored module sha256:{digest[:16]} does not hash to its digest")
            for ref, s in list(self.modules.items()):
                if s.state == ADMITTED and s.digest is not None and not self.store.path(s.digest).exists():
                    findings.append({"kind": "integrity", "what": "module", "digest": s.digest, "refs": [ref], "message": "missing"})
                    await self.quarantine(ref, "integrity", f"the stored module sha256:{s.digest[:16]} is missing")
            artifacts = asyncio.ensure_future(asyncio.to_thread(self.sandbox.verify_cache))  # beside the fetching below
            try:
                async with aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session:
                    checkpoint = await refresh_checkpoint(session, self.config.registries, self.policy, self.checkpoints, now)
                    findings += checkpoint.pop("findings")  # type: ignore[arg-type]
                    admission = Admission(self.policy, self.config.registries, self.store, self.checkpoints, now)
                    decisions = list(zip(self.config.modules, await self._decide(admission, session, list(self.config.modules)), strict=True))
            finally:
                bad_artifacts = await artifacts
            self._note_sources(admission, findings, now)
            for digest in bad_artifacts:  # deleted by the sandbox: rebuilt from verified bytes on the next run
                refs = sorted(ref for ref, s in self.modules.items() if s.digest == digest)
                findings.append({"kind": "integrity", "what": "artifact", "digest": digest, "refs": refs})
                for ref in refs:  # until re-admitted below, by this sweep's decision
                    await self.quarantine(ref, "integrity", f"the compiled artifact of sha256:{digest[:16]} failed its HMAC")
            for m, decision in decisions:
                findings += [{"kind": "integrity", "what": "module", "digest": d, "refs": [m.ref], "message": "replaced by verified bytes"}
                             for d in decision.tampered]
                if decision.state != ADMITTED and not is_final(decision.reason) and m.ref in self.modules:  # it keeps its state
                    findings.append({"kind": "unavailable", "ref": m.ref, "reason": decision.reason, "message": decision.message})
            modules = [{**self._module_json(m, new), "previous": None if old is None else old.state,
                        "changed": old is None or (old.state, old.digest) != (new.state, new.digest)}
                       for (m, _), (old, new) in zip(decisions, await self._apply(decisions), strict=True)]
            self.sweeps += 1
            self.findings_total.update(f["kind"] for f in findings)
            self.prewarm()  # what this sweep admitted, or whose artifact it deleted
            self.last_sweep = {"number": self.sweeps, "trigger": trigger, "time": now, "seconds": round(time.monotonic() - started, 3),
                               "checkpoint": checkpoint, "findings": findings, "modules": modules}
            await self.telemetry.swept(self.last_sweep)
            return self.last_sweep

    def _note_sources(self, admission: Admission, findings: list[dict[str, Any]], now: int) -> None:
        """Each source's last error (and last good answer), for /status: a source's failure changes no module."""
        errors = {url: {"time": now, "reason": f.reason, "message": f.message} for url, f in admission.failures.items()}
        errors.update({f["registry"]: {"time": now, "reason": f.get("reason", f["kind"]), "message": f["message"]}
                       for f in findings if f["kind"] in ("checkpoint", "rollback")})
        for url, source in self.sources.items():
            if url in errors:
                source["last_error"] = errors[url]
            if url in admission.answered:
                source["last_ok"] = now

    def _module_json(self, m: ModuleConfig, s: ModuleState | None) -> dict[str, Any]:
        if s is None:
            return {"ref": m.ref, "state": "pending", "reason": None, "profile": m.profile}
        return {"ref": m.ref, "state": s.state, "reason": s.reason, "message": s.message, "version": s.version, "digest": s.digest,
                "log_index": s.log_index, "profile": s.profile, "since": s.since, "status_as_of": s.status_as_of}

    def checkpoints_json(self) -> list[dict[str, Any]]:
        out = []
        now = self.now()
        for log in self.policy.tlog.logs:
            known = load_known(self.checkpoints, log.origin)
            if known is None:
                continue
            try:
                _, _, _, newest = open_checkpoint(known.note, TrustPolicy(self.policy.tlog), now)
            except VerifyError:
                newest = None
            mtime = int((self.checkpoints).stat().st_mtime)
            out.append({"origin": log.origin, "size": known.checkpoint.size, "root_hash": known.checkpoint.root_hash.hex(),
                        "newest_cosignature": newest, "age_seconds": now - (newest if newest is not None else mtime)})
        return out

    def status(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "modules": [self._module_json(m, self.modules.get(m.ref)) for m in self.config.modules],
            "checkpoints": self.checkpoints_json(),
            "last_sweep": self.last_sweep,
            "sweeps": self.sweeps,
            "sweep_running": self.lock.locked(),
            "sweep_waiting": self.sweep_waiting,
            "prewarm": {"running": self.prewarming is not None and not self.prewarming.done(),
                        "failures": [{"digest": d, "refs": sorted(r for r, s in self.modules.items() if s.digest == d), "error": e}
                                     for d, e in sorted(self.prewarm_failures.items())]},
            "sources": [{"url": url, **source} for url, source in self.sources.items()],
            "sandbox": self.sandbox.status(),
            "telemetry": self.telemetry.status(),
        }
