"""The parts of a sweep that are not admission: the trusted checkpoint's refresh (anti-rollback)
and how a module's state moves on a sweep's decision."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Sequence
from dataclasses import replace

import aiohttp

from edge.state import load_known, save_evidence, save_known
from edge.verify import (
    EVIDENCE_REASONS,
    TrustPolicy,
    VerifyError,
    check_against_known,
    check_known,
    open_checkpoint,
)
from edge.verify_cli import online_facts
from registry.client import RegistryClient

from .agent_admission import Decision, is_final
from .agent_state import ADMITTED, QUARANTINED, ModuleState
from .agent_status import source_failure

MAX_CHECKPOINT_BYTES = 1 << 20


async def refresh_checkpoint(session: aiohttp.ClientSession, registries: Sequence[str], policy: TrustPolicy,
                             checkpoints: pathlib.Path, now: int) -> dict[str, object]:
    """Ask every registry for its checkpoint; accept each one signed by a log the policy names, with its
    witness quorum, fresh enough, and consistent with (and not older than) the one this node trusts, so
    the trusted checkpoint moves to the newest a source can prove (one serving an old one cannot hold it
    back). Returns {"accepted": bool, "registry", "origin", "size", "findings": [...]}: a registry
    serving an older checkpoint is a "rollback" finding, and the known checkpoint is kept."""
    findings: list[dict[str, object]] = []
    newest: tuple[int, str, str] | None = None  # size, registry, origin of the newest accepted
    for url in registries:
        try:
            note = await RegistryClient(url, session).get("/log/checkpoint", MAX_CHECKPOINT_BYTES)  # read no further
            cp, _, _, _ = open_checkpoint(note, policy, now)
            known = await asyncio.to_thread(load_known, checkpoints, cp.origin)
            if known is not None:
                check_known(known, policy)
            consistency, _ = await online_facts(url, None if known is None else known.checkpoint.size, cp.size, None, policy, now)
            new = check_against_known(cp, note, known, consistency)  # fork / inconsistent raise with evidence
            if known is not None and cp.size < known.checkpoint.size:
                findings.append({"kind": "rollback", "registry": url, "size": cp.size, "known_size": known.checkpoint.size,
                                 "message": f"{url} serves a checkpoint of size {cp.size}, older than the trusted {known.checkpoint.size}: refused"})
                continue
            if new != known:
                await asyncio.to_thread(save_known, checkpoints, new)
            if newest is None or new.checkpoint.size > newest[0]:
                newest = (new.checkpoint.size, url, cp.origin)
        except VerifyError as e:
            finding: dict[str, object] = {"kind": "checkpoint", "registry": url, "reason": e.reason, "message": str(e)}
            if e.reason in EVIDENCE_REASONS:
                finding["evidence"] = str(await asyncio.to_thread(save_evidence, checkpoints, e.reason, str(e), e.evidence, now))
            findings.append(finding)
        except Exception as e:  # noqa: BLE001 -- this registry's failure, named; then the next
            failure = source_failure(url, e)
            findings.append({"kind": "checkpoint", "registry": url, "reason": failure.reason, "message": failure.message})
    if newest is None:
        return {"accepted": False, "findings": findings}
    return {"accepted": True, "registry": newest[1], "origin": newest[2], "size": newest[0], "findings": findings}


def next_state(old: ModuleState | None, decision: Decision, profile: str, ref: str, now: int,
               max_status_age: int | None = None) -> ModuleState:
    """Where a module goes on a decision: admitted when admitted; a module that was admitted (or
    quarantined) and is refused for a final reason (is_final: a verified yank or revocation, a policy or
    capability refusal of verified data) is quarantined; one never admitted stays refused. Any other
    failure (a source unreachable, garbage from it, a proof that does not verify) proves nothing about
    the release: the module's state stays as it was, and the next sweep tries again, except that
    freshness belongs to status: with max_status_age (the policy's, when it has require_status), an
    admitted module whose newest verified status proof (status_as_of) is older than that is
    quarantined `status-stale` (the node can no longer vouch for it), until a sweep admits it with a
    fresh one."""
    if old is not None and decision.state != ADMITTED and not is_final(decision.reason):
        stale = None if max_status_age is None or old.state != ADMITTED else status_stale(old, now, max_status_age)
        if stale is None:
            return old
        message = f"{stale}; this sweep: ({decision.reason}) {decision.message}"
        return replace(old, state=QUARANTINED, reason="status-stale", message=message, since=now)
    as_of = None if old is None or old.digest != decision.digest else old.status_as_of  # the newest known of this release
    if decision.status_time is not None:
        as_of = max(as_of or 0, decision.status_time)
    if decision.state == ADMITTED:
        new = ModuleState(ref, ADMITTED, None, None, profile, now, decision.version, decision.digest, decision.log_index, as_of)
    else:
        state = QUARANTINED if old is not None and old.state in (ADMITTED, QUARANTINED) else decision.state
        digest, index = decision.digest, decision.log_index
        if digest is None and old is not None and old.version == decision.version:  # the release that stops serving
            digest, index, as_of = old.digest, old.log_index, old.status_as_of
        new = ModuleState(ref, state, decision.reason, decision.message, profile, now, decision.version, digest, index, as_of)
    if old is not None and (old.state, old.reason, old.version, old.digest) == (new.state, new.reason, new.version, new.digest):
        return replace(new, since=old.since, message=new.message or old.message)
    return new


def status_stale(s: ModuleState, now: int, max_status_age: int) -> str | None:
    """Why s can no longer be vouched for: its newest verified status proof is older than max_status_age
    (or there is none); None while it is not."""
    if s.status_as_of is not None and now - s.status_as_of <= max_status_age:
        return None
    known = "none verified" if s.status_as_of is None else f"the newest that verified was cosigned {now - s.status_as_of}s ago"
    return f"no source served a status proof younger than max_status_age {max_status_age}s ({known})"
