"""The revocation refresh: a namespace's yanks and key revocations, from every source.

Hosts are untrusted, proofs are what count. Every configured source is asked for the namespace's
action records (GET /api/v1/namespaces/{ns}/actions) and each record is checked on its own: it must
be included in a checkpoint its log signed with the policy's quorum (edge.verify.namespace_status),
and that checkpoint must be consistent with the one this node trusts (a consistency proof from the
same source; edge.verify.check_against_known). A record that passes counts, whichever source sent
it; the union over the sources is the namespace's status. A source that cannot be reached, answers
garbage, or sends a record that does not check proves nothing: it is reported as that source's
failure, and omitting a record cannot hide it while another source has it.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

from edge.state import load_known, save_evidence
from edge.verify import EVIDENCE_REASONS, NamespaceStatus, TrustPolicy, VerifyError, check_against_known, namespace_status
from edge.verify_cli import online_facts, parse_proof
from registry.client import RegistryClient, RegistryError
from tlog.checkpoint import Checkpoint
from tlog.client import UNREACHABLE, failure_kind
from tlog.errors import TlogError
from tlog.proof_file import TlogProof

STATUS_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass(frozen=True)
class SourceFailure:
    """What went wrong with one source (a reason code of spec/trust-policy.md, or not-found)."""

    url: str
    reason: str
    message: str


@dataclass(frozen=True)
class StatusRefresh:
    status: NamespaceStatus | None  # the union of what the sources proved; None when no source answered at all
    answered: tuple[str, ...] = ()  # the sources that answered with a list of records
    failures: tuple[SourceFailure, ...] = ()
    evidence: tuple[str, ...] = ()  # files of fork/inconsistency evidence written


def source_failure(url: str, e: BaseException) -> SourceFailure:
    """A failed exchange with url, named: not-found, registry-unreachable or registry-error (or a check's reason)."""
    if isinstance(e, VerifyError):
        return SourceFailure(url, e.reason, f"{url}: {e}")
    if isinstance(e, RegistryError) and e.status == 404:
        return SourceFailure(url, "not-found", f"{url}: {e}")
    reason = "registry-unreachable" if failure_kind(e) == UNREACHABLE else "registry-error"
    return SourceFailure(url, reason, f"{url}: {e!r}")


async def refresh_namespace_status(registries: Sequence[str], namespace: str, policy: TrustPolicy,
                                   checkpoints: pathlib.Path, now: int) -> StatusRefresh:
    """Ask every source at once; combine what each proves."""
    async with aiohttp.ClientSession(timeout=STATUS_TIMEOUT) as session:
        answers = await asyncio.gather(*(_from_source(session, url, namespace, policy, checkpoints, now) for url in registries))
    proven = [status for status, _, _ in answers if status is not None]
    answered = tuple(url for url, (status, _, _) in zip(registries, answers, strict=True) if status is not None)
    failures = tuple(f for _, fs, _ in answers for f in fs)
    evidence = tuple(e for _, _, es in answers for e in es)
    return StatusRefresh(union(proven) if proven else None, answered, failures, evidence)


def union(statuses: Iterable[NamespaceStatus]) -> NamespaceStatus:
    """Every yank of any of statuses; every revocation, at the earliest index any of them proves."""
    yanked: set[str] = set()
    revoked: dict[str, int] = {}
    for status in statuses:
        yanked |= status.yanked
        for vkey, index in status.revoked.items():
            revoked[vkey] = min(index, revoked.get(vkey, index))
    return NamespaceStatus(frozenset(yanked), revoked)


def _check_one(ns: str, proof: bytes, policy: TrustPolicy, now: int) -> tuple[NamespaceStatus, TlogProof] | VerifyError:
    """One action record: included in a checkpoint its log signed with the policy's quorum (namespace_status)."""
    try:
        return namespace_status(ns, [proof], policy, now), parse_proof(proof)
    except VerifyError as e:
        return e


async def _from_source(session: aiohttp.ClientSession, url: str, ns: str, policy: TrustPolicy, checkpoints: pathlib.Path,
                       now: int) -> tuple[NamespaceStatus | None, list[SourceFailure], list[str]]:
    """What url proves about ns: (its records that check, combined; its failures; evidence files)."""
    try:
        proofs = await RegistryClient(url, session).actions(ns)
    except Exception as e:  # noqa: BLE001 -- this source's failure, named; the others still count
        return None, [source_failure(url, e)], []
    checked = await asyncio.to_thread(lambda: [_check_one(ns, proof, policy, now) for proof in proofs])  # signatures: off the loop
    consistent: dict[bytes, VerifyError | None] = {}  # checkpoint note -> why it is not consistent with ours (None: it is)
    evidence: list[str] = []
    good: list[NamespaceStatus] = []
    bad: list[VerifyError] = []
    for one in checked:
        if isinstance(one, VerifyError):
            bad.append(one)
            continue
        status, tp = one
        if tp.checkpoint not in consistent:
            assert tp.parsed is not None  # parse_tlog_proof read the checkpoint
            failure = consistent[tp.checkpoint] = await _consistency_failure(url, tp.parsed, tp.checkpoint, policy, checkpoints, now)
            if failure is not None and failure.reason in EVIDENCE_REASONS:
                evidence.append(str(await asyncio.to_thread(save_evidence, checkpoints, failure.reason, str(failure), failure.evidence, now)))
        if (failure := consistent[tp.checkpoint]) is not None:
            bad.append(failure)
        else:
            good.append(status)
    failures = [] if not bad else [SourceFailure(url, "registry-error", f"{url}: {len(bad)} of the {len(proofs)} action records of "
                                                 f"{ns} do not check and are not counted; the first: ({bad[0].reason}) {bad[0]}")]
    return union(good), failures, evidence


async def _consistency_failure(url: str, cp: Checkpoint, note: bytes, policy: TrustPolicy, checkpoints: pathlib.Path,
                               now: int) -> VerifyError | None:
    """None if cp (its note already checked as signed by its log) is consistent with the checkpoint this node
    trusts for that log (a consistency proof fetched from url when the sizes differ), else why not."""
    try:
        known = await asyncio.to_thread(load_known, checkpoints, cp.origin)
        if known is None:
            return None
        consistency = None
        if min(known.checkpoint.size, cp.size) > 0 and known.checkpoint.size != cp.size:
            consistency, _ = await online_facts(url, known.checkpoint.size, cp.size, None, policy, now)
        check_against_known(cp, note, known, consistency)
    except VerifyError as e:
        return e
    except (TlogError, OSError) as e:
        return VerifyError("state-invalid", f"the remembered checkpoint cannot be read: {e}")
    return None
