"""The edge agent: keeps the configured modules admitted, refused or quarantined, and sweeps.

State changes are written to disk (state.json, atomically) before they are acted on: a module is
served only once its admission is on disk, and stops being served as soon as its quarantine is.
After a restart the state on disk is what is served: nothing refused or quarantined runs again
until a sweep admits it.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from edge.state import load_known
from edge.verify import (
    TrustPolicy,
    VerifyError,
    open_checkpoint,
    parse_trust_policy,
)

from .agent_admission import FETCH_TIMEOUT, UNAVAILABLE_REASONS, Admission, Decision
from .agent_config import AgentConfig, ModuleConfig
from .agent_state import ADMITTED, QUARANTINED, ModuleState, ModuleStore, StateFile
from .agent_sweep import next_state, refresh_checkpoint
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
        self.state_file = StateFile(config.data)
        self.store = ModuleStore(config.data)
        self.checkpoints = config.data / "checkpoints"
        self.modules: dict[str, ModuleState] = {}
        self.lock = asyncio.Lock()  # one admission round or sweep at a time
        self._writing = asyncio.Lock()  # one change of state.json at a time (a sweep, a quarantine while serving)
        self.last_sweep: dict[str, Any] | None = None
        self.sweeps = 0
        self.telemetry = Telemetry(config.data, config.telemetry.sinks, config.telemetry.spool_bytes, config.telemetry.interval, clock)

    def now(self) -> int:
        return int(self.clock())

    async def start(self) -> None:
        """Load the state on disk; admit the configured modules it does not know (or whose profile changed)."""
        loaded = await asyncio.to_thread(self.state_file.load)
        self.modules = {m.ref: loaded[m.ref] for m in self.config.modules if m.ref in loaded and loaded[m.ref].profile == m.profile}
        await self._save()
        new = [m for m in self.config.modules if m.ref not in self.modules]
        if new:
            async with self.lock, aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session:
                admission = Admission(self.policy, self.config.registries, self.store, self.checkpoints, self.now())
                await self._apply(list(zip(new, await self._decide(admission, session, new), strict=True)))

    async def _decide(self, admission: Admission, session: aiohttp.ClientSession, modules: list[ModuleConfig]) -> list[Decision]:
        """Admission decisions for modules, ADMISSION_CONCURRENCY fetching at once."""
        gate = asyncio.Semaphore(ADMISSION_CONCURRENCY)

        async def decide(m: ModuleConfig) -> Decision:
            async with gate:
                return await admission.decide(session, m, self.config.profiles[m.profile])

        return list(await asyncio.gather(*(decide(m) for m in modules)))

    async def _apply(self, decisions: list[tuple[ModuleConfig, Decision]]) -> list[tuple[ModuleState | None, ModuleState]]:
        """Move each module to its next state; the new states are on disk before they are served."""
        async with self._writing:
            now = self.now()
            changed = dict(self.modules)
            moves = []
            for m, decision in decisions:
                old = self.modules.get(m.ref)
                new = next_state(old, decision, m.profile, m.ref, now)
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
        """Stop serving ref now (only if it is still the release with one of digests, when given)."""
        async with self._writing:
            old = self.modules.get(ref)
            if old is None or old.state == QUARANTINED or (digests is not None and old.digest not in digests):
                return
            new = ModuleState(ref, QUARANTINED, reason, message, old.profile, self.now(), old.version, old.digest, old.log_index)
            changed = {**self.modules, ref: new}
            await asyncio.to_thread(self.state_file.save, changed)
            await self.telemetry.moves([(old, new)])
            self.modules = changed
        logger.warning("%s: quarantined (%s: %s)", ref, reason, message)

    def serving(self, namespace: str, name: str) -> tuple[ModuleConfig, ModuleState | None] | None:
        m = self.config.module(namespace, name)
        return None if m is None else (m, self.modules.get(m.ref))

    async def sweep(self) -> dict[str, Any]:
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
            for digest in bad_artifacts:  # deleted by the sandbox: rebuilt from verified bytes on the next run
                refs = sorted(ref for ref, s in self.modules.items() if s.digest == digest)
                findings.append({"kind": "integrity", "what": "artifact", "digest": digest, "refs": refs})
                for ref in refs:  # until re-admitted below, by this sweep's decision
                    await self.quarantine(ref, "integrity", f"the compiled artifact of sha256:{digest[:16]} failed its HMAC")
            for m, decision in decisions:
                findings += [{"kind": "integrity", "what": "module", "digest": d, "refs": [m.ref], "message": "replaced by verified bytes"}
                             for d in decision.tampered]
                if decision.reason in UNAVAILABLE_REASONS and m.ref in self.modules:  # the module keeps its state
                    findings.append({"kind": "unavailable", "ref": m.ref, "reason": decision.reason, "message": decision.message})
            modules = [{**self._module_json(m, new), "previous": None if old is None else old.state,
                        "changed": old is None or (old.state, old.digest) != (new.state, new.digest)}
                       for (m, _), (old, new) in zip(decisions, await self._apply(decisions), strict=True)]
            self.sweeps += 1
            self.last_sweep = {"time": now, "seconds": round(time.monotonic() - started, 3), "checkpoint": checkpoint,
                               "findings": findings, "modules": modules}
            await self.telemetry.swept(self.last_sweep)
            return self.last_sweep

    def _module_json(self, m: ModuleConfig, s: ModuleState | None) -> dict[str, Any]:
        if s is None:
            return {"ref": m.ref, "state": "pending", "reason": None, "profile": m.profile}
        return {"ref": m.ref, "state": s.state, "reason": s.reason, "message": s.message, "version": s.version, "digest": s.digest,
                "log_index": s.log_index, "profile": s.profile, "since": s.since}

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
            "modules": [self._module_json(m, self.modules.get(m.ref)) for m in self.config.modules],
            "checkpoints": self.checkpoints_json(),
            "last_sweep": self.last_sweep,
            "sweeps": self.sweeps,
            "sandbox": self.sandbox.status(),
            "telemetry": self.telemetry.status(),
        }
