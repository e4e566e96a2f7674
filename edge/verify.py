"""The edge verifier: decide offline, before running a module, whether to trust it. Pure.

Bytes and a trust policy in, a Verified result or a VerifyError with a stable
reason code out. No network, no clock (the caller passes ``now``), no disk: the
anti-rollback state is passed in and the new state handed back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from registry.record import (
    ImportsMismatch,
    ModuleDigestMismatch,
    PackageRef,
    Record,
    RecordError,
    Release,
    check_module,
    decode_entry,
)
from registry.status_proof import StatusProof
from registry.trust_policy import (
    EVIDENCE_REASONS,
    REASONS,
    TrustPolicy,
    VerifyError,
    open_checkpoint,
    parse_trust_policy,
)
from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.errors import (
    MalformedError,
    MalformedProofError,
    ProofError,
    SplitViewError,
    TlogError,
)
from tlog.hashes import leaf_hash
from tlog.merkle import check_extends, verify_inclusion
from tlog.note import open_note, verifier_from_vkey
from tlog.policy import MAX_FUTURE_SKEW
from tlog.proof_file import TlogProof, parse_tlog_proof

from .status import StatusVerified, parse_status, verify_status

__all__ = [  # the trust policy's names, re-exported: the verifier is where edge code finds them
    "EVIDENCE_REASONS", "MAX_FUTURE_SKEW", "REASONS", "KnownCheckpoint", "NamespaceStatus", "TrustPolicy", "Verified",
    "VerifyError", "check_against_known", "check_known", "check_status_checkpoint", "namespace_status", "open_checkpoint",
    "parse_trust_policy", "verify_module",
]


class KnownCheckpoint(NamedTuple):
    """The newest checkpoint this node accepted for a log: anti-rollback state."""

    checkpoint: Checkpoint
    note: bytes


class Verified(NamedTuple):
    ref: PackageRef
    module_sha256: str
    signer: str
    index: int  # type: ignore[assignment]  # shadows tuple.index: the name is part of the JSON and the API
    checkpoint: Checkpoint
    witnesses: tuple[str, ...]
    newest_cosignature: int | None
    record: Record
    known: KnownCheckpoint  # the anti-rollback state to keep after this verification
    status: StatusVerified | None = None  # what the status proof showed, if one was given

    def summary(self) -> str:
        w = ",".join(self.witnesses) or "none"
        return (
            f"OK {self.ref} sha256:{self.module_sha256[:16]} signed by {self.signer.split('+')[0]} "
            f"at index {self.index} of {self.checkpoint.origin} size {self.checkpoint.size}, witnesses {w}"
        )

    def as_json(self) -> dict[str, object]:
        return {
            "ok": True, "package": str(self.ref), "module_sha256": self.module_sha256, "signer": self.signer,
            "index": self.index, "origin": self.checkpoint.origin, "tree_size": self.checkpoint.size,
            "witnesses": list(self.witnesses), "newest_cosignature": self.newest_cosignature,
            "status": None if self.status is None else {
                "as_of": self.status.as_of, "tree_size": self.status.checkpoint.size, "cosigned": self.status.time},
        }


def check_known(known: KnownCheckpoint, policy: TrustPolicy) -> None:
    """The remembered checkpoint must still be one its log signed: only then can it convict the log of a fork."""
    log = policy.tlog.log_for(known.checkpoint.origin)
    if log is None:
        raise VerifyError("state-invalid", f"the remembered checkpoint's log {known.checkpoint.origin!r} is not in the trust policy")
    try:
        note, _ = open_note(known.note, [log.verifier])
        if parse_checkpoint(note.text) != known.checkpoint:
            raise MalformedError("it is not the checkpoint its note holds")
    except TlogError as e:
        raise VerifyError("state-invalid", f"the remembered checkpoint: {e}") from None


def check_against_known(
    cp: Checkpoint, note: bytes, known: KnownCheckpoint | None, consistency: Sequence[bytes] | None
) -> KnownCheckpoint:
    """Anti-rollback: accept cp only if consistent with the newest checkpoint we accepted; return the new known.

    Both checkpoints must already be verified as signed by the log. A proof of the wrong
    shape is consistency-malformed (it proves nothing); a well-formed one that fails is
    inconsistent (another proof may still reconcile them); only what proves two histories
    (equal sizes with different roots, or a proof yielding the newer root from another
    older root) is a fork.
    """
    if known is None or known.checkpoint.origin != cp.origin:
        return KnownCheckpoint(cp, note)
    k = known.checkpoint
    small, big = (k, cp) if k.size <= cp.size else (cp, k)
    needs_proof = 0 < small.size < big.size
    if needs_proof and consistency is None:
        raise VerifyError("consistency-required", f"need a consistency proof between sizes {small.size} and {big.size}")
    proof = consistency if needs_proof and consistency is not None else ()
    try:
        check_extends(small.size, small.root_hash, big.size, big.root_hash, proof)
    except SplitViewError as e:
        if small.size == big.size:
            raise VerifyError("fork", f"two checkpoints of size {cp.size} with different roots",
                              evidence={"known": known.note, "new": note}) from None
        raise VerifyError("fork", f"checkpoints of sizes {small.size} and {big.size} are two histories: {e}",
                          evidence={"known": known.note, "new": note, "proof": [h.hex() for h in proof]}) from None
    except MalformedProofError as e:
        raise VerifyError("consistency-malformed", f"consistency proof from {small.size} to {big.size}: {e}") from None
    except ProofError as e:
        raise VerifyError("inconsistent", f"checkpoints of sizes {small.size} and {big.size} are not shown consistent by this proof: {e}",
                          evidence={"known": known.note, "new": note, "proof": [h.hex() for h in proof]}) from None
    return KnownCheckpoint(cp, note) if cp.size > k.size else known


def check_status_checkpoint(cp: Checkpoint, note: bytes, known: KnownCheckpoint, consistency: Sequence[bytes] | None,
                            required: bool) -> None:
    """The status proof's checkpoint cp (verified, of known's log) against known, the checkpoint this
    verification trusts (the remembered one or the module's tlog-proof's, whichever is newer). Older is
    status-rollback (it says nothing of what came after); the same size with another root is a fork; newer
    must be shown consistent by consistency (from known's size), which is required when required (a node
    that remembers a checkpoint); without one otherwise, the witness quorum both carry vouches for it."""
    k = known.checkpoint
    if cp.size < k.size:
        raise VerifyError("status-rollback", f"the status proof's checkpoint (size {cp.size}) is older than the one this node "
                                             f"trusts (size {k.size}): it says nothing of the records since")
    if cp.size > k.size and consistency is None and not required:
        return
    try:
        check_against_known(cp, note, known, consistency)
    except VerifyError as e:
        raise VerifyError(e.reason, f"the status proof's checkpoint: {e}", evidence=e.evidence) from None


@dataclass(frozen=True)
class NamespaceStatus:
    """Verified yank and revocation facts for a namespace, from the log (online refresh)."""

    yanked: frozenset[str] = frozenset()  # "name@version"
    revoked: Mapping[str, int] = field(default_factory=dict)  # vkey -> revocation index


def verify_module(
    *, module: bytes, proof: bytes | TlogProof, policy: TrustPolicy, now: int, sbom: bytes | None = None,
    known: KnownCheckpoint | None = None, consistency: Sequence[bytes] | None = None,
    status: NamespaceStatus | None = None, status_proof: bytes | StatusProof | None = None,
    status_consistency: Sequence[bytes] | None = None,
) -> Verified:
    """Every check of spec/trust-policy.md, in order; the first failure raises VerifyError.

    proof: the tlog-proof file's bytes, or what parse_tlog_proof already read from them.
    status_proof: the release's status proof (spec/status-proof.md); with one, freshness is the
    status proof's (max_status_age) and max_checkpoint_age does not apply to the inclusion proof.
    status_consistency: a consistency proof from the trusted checkpoint (the newer of known and the
    tlog-proof's) to the status proof's, when that is newer (check_status_checkpoint).
    """
    try:
        tp: TlogProof = proof if isinstance(proof, TlogProof) else parse_tlog_proof(proof)
    except TlogError as e:
        raise VerifyError("proof-malformed", f"tlog-proof: {e}") from None
    if tp.extra is None:
        raise VerifyError("proof-malformed", "the tlog-proof has no extra line carrying the log entry")
    try:
        record = decode_entry(tp.extra)
    except (RecordError, MalformedError) as e:
        raise VerifyError("entry-invalid", f"log entry: {e}") from None
    if not isinstance(record.body, Release):
        raise VerifyError("not-a-release", f"the log entry is a {record.type}, not a release")
    release = record.body
    try:
        info = check_module(release, module)
    except ModuleDigestMismatch as e:
        raise VerifyError("module-digest", f"{e}") from None
    except ImportsMismatch as e:
        raise VerifyError("imports-mismatch", f"{e}") from None
    except TlogError as e:
        raise VerifyError("module-invalid", f"module: {e}") from None
    digest = release.module_sha256
    if policy.allowed_imports is not None:
        refused = [i.qualified if info.component else f"{i.module}.{i.name}" for i in info.imports if not policy.import_allowed(i, info.component)]
        if refused:
            raise VerifyError("import-not-allowed", f"imports not provided by this node: {', '.join(refused[:10])}")
    if not record.envelope.verified_by(verifier_from_vkey(record.signer)):
        raise VerifyError("signature-invalid", f"the release statement is not signed by {record.signer}")
    pins = policy.namespace_keys.get(release.ref.namespace)
    if pins is not None and record.signer not in pins:
        raise VerifyError("publisher-not-allowed", f"{record.signer} is not pinned for namespace {release.ref.namespace}")
    if sbom is not None and (release.sbom_sha256 is None or hashlib.sha256(sbom).hexdigest() != release.sbom_sha256):
        raise VerifyError("sbom-digest", "the SBOM's digest is not the one in the statement")
    parsed = (tp.note, tp.parsed) if tp.note is not None and tp.parsed is not None else None
    inclusion_policy = policy if status_proof is None else replace(policy, max_checkpoint_age=None)
    cp, _, witnesses, newest = open_checkpoint(tp.checkpoint, inclusion_policy, now, parsed)
    try:
        verify_inclusion(tp.index, cp.size, leaf_hash(tp.extra), tp.proof, cp.root_hash)
    except ProofError as e:
        raise VerifyError("inclusion", f"inclusion proof: {e}") from None
    if known is not None and known.checkpoint.origin == cp.origin:
        check_known(known, policy)
    new_known = check_against_known(cp, tp.checkpoint, known, consistency)
    if status is not None:
        if f"{release.ref.name}@{release.ref.version}" in status.yanked:
            raise VerifyError("yanked", f"{release.ref} was yanked")
        signer_key = record.signer_verifier.public_key  # a key is its public key, whatever name it signs under
        for vkey, revoked_at in status.revoked.items():
            if revoked_at < tp.index and verifier_from_vkey(vkey).public_key == signer_key:
                raise VerifyError("key-revoked", f"{vkey} was revoked at index {revoked_at}, before this release ({tp.index})")
    verified_status = None
    if status_proof is not None:
        sp = status_proof if isinstance(status_proof, StatusProof) else parse_status(status_proof)
        verified_status = verify_status(sp, release=record, release_index=tp.index, origin=cp.origin, policy=policy, now=now)
        remembers = known is not None and known.checkpoint.origin == cp.origin
        check_status_checkpoint(verified_status.checkpoint, sp.checkpoint, new_known, status_consistency, remembers)
    elif policy.require_status:
        raise VerifyError("status-missing", "the trust policy requires a status proof and none was given")
    return Verified(release.ref, digest, record.signer, tp.index, cp, witnesses, newest, record, new_known, verified_status)


def namespace_status(namespace: str, proofs: Iterable[bytes], policy: TrustPolicy, now: int) -> NamespaceStatus:
    """Build yank/revocation facts from the namespace's action records, each with its tlog-proof.

    Every record must be included in a checkpoint the policy accepts (log signature and
    quorum), else VerifyError. Completeness is not provable offline: a registry that
    withholds a revocation is caught by auditors replaying the log, not here. A void
    record (signed by an unauthorized key) can only make us refuse more, never accept more.
    """
    yanked: set[str] = set()
    revoked: dict[str, int] = {}
    for proof in proofs:
        try:
            tp = parse_tlog_proof(proof)
            record = decode_entry(tp.extra or b"")
        except TlogError as e:
            raise VerifyError("entry-invalid", f"namespace record: {e}") from None
        cp, _, _, _ = open_checkpoint(tp.checkpoint, TrustPolicy(policy.tlog), now)  # freshness is the release's
        try:
            verify_inclusion(tp.index, cp.size, leaf_hash(tp.extra or b""), tp.proof, cp.root_hash)
        except ProofError as e:
            raise VerifyError("inclusion", f"namespace record inclusion: {e}") from None
        if record.namespace != namespace or not record.signed_by_signer:
            raise VerifyError("entry-invalid", "a namespace record is for another namespace or not signed")
        body = record.body
        if isinstance(body, Release):
            continue
        if body.action == "yank":
            yanked.add(f"{body.name}@{body.version}")
        elif body.action == "key-revocation" and body.key is not None:
            revoked[body.key] = min(tp.index, revoked.get(body.key, tp.index))
    return NamespaceStatus(frozenset(yanked), revoked)
