"""The edge verifier: decide offline, before running a module, whether to trust it. Pure.

Bytes and a trust policy in, a Verified result or a VerifyError with a stable
reason code out. No network, no clock (the caller passes ``now``), no disk: the
anti-rollback state is passed in and the new state handed back.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.errors import (
    MalformedError,
    MalformedProofError,
    ProofError,
    SplitViewError,
    TlogError,
)
from tlog.hashes import leaf_hash
from tlog.merkle import verify_consistency, verify_inclusion
from tlog.note import (
    OWN_KEY_NAME_RULE,
    Note,
    is_own_key_name,
    parse_note,
    verifier_from_vkey,
)
from tlog.policy import Policy, parse_policy
from tlog.proof_file import TlogProof, parse_tlog_proof

from .record import PackageRef, Record, RecordError, Release, decode_entry
from .wasm import Import, parse_wasm

MAX_FUTURE_SKEW = 600  # seconds a cosignature timestamp may lie ahead of `now` and still count
MAX_TRUST_POLICY_BYTES = 1 << 20

# Stable reason codes, one per check (spec/trust-policy.md).
REASONS = (
    "proof-malformed", "entry-invalid", "not-a-release", "module-digest", "module-invalid", "imports-mismatch",
    "import-not-allowed", "signature-invalid", "publisher-not-allowed", "sbom-digest", "log-unknown",
    "log-signature", "inclusion", "witness-signature", "witness-quorum", "stale", "state-invalid",
    "consistency-required", "consistency-malformed", "inconsistent", "fork", "registry-unreachable",
    "registry-error", "yanked", "key-revoked", "policy-malformed", "input-unreadable",
)
EVIDENCE_REASONS = ("inconsistent", "fork")  # the failures that carry signed checkpoints worth keeping


class VerifyError(Exception):
    """A failed check: reason is one of REASONS; evidence holds the signed checkpoints (and proof) of a fork or an inconsistency."""

    def __init__(self, reason: str, message: str, *, evidence: Mapping[str, object] | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.evidence = dict(evidence or {})

    @property
    def unusable_input(self) -> bool:
        """Input that could not be read at all (exit status 2), as opposed to a failed check (1)."""
        return self.reason in ("proof-malformed", "policy-malformed", "state-invalid", "input-unreadable")


@dataclass(frozen=True)
class TrustPolicy:
    """What an edge node trusts (spec/trust-policy.md)."""

    tlog: Policy
    max_checkpoint_age: int | None = None
    namespace_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_imports: tuple[str, ...] | None = None  # None: no restriction

    def import_allowed(self, imp: Import, component: bool) -> bool:
        """Whether an import of a core module (component False) or a component is allowed."""
        if self.allowed_imports is None:
            return True
        if component:
            return any(whole.fullmatch(imp.name) for whole, _, _ in self._import_patterns)
        return any(module is not None and name is not None and module.fullmatch(imp.module) and name.fullmatch(imp.name)
                   for _, module, name in self._import_patterns)

    @functools.cached_property
    def _import_patterns(self) -> list[tuple[re.Pattern[str], re.Pattern[str] | None, re.Pattern[str] | None]]:
        """Each pattern compiled as a whole (component import names) and as module and field,
        split on its first '.' (core imports; None for a pattern without '.')."""
        return [(_glob(p), *((_glob(p.partition(".")[0]), _glob(p.partition(".")[2])) if "." in p else (None, None)))
                for p in self.allowed_imports or ()]


def _publisher_vkey(vkey: str) -> str:
    """A pinned publisher key: a vkey named as registry records name their keys (printable ASCII)."""
    verifier = verifier_from_vkey(vkey)
    if not is_own_key_name(verifier.name):
        raise ValueError(f"pinned key {vkey[:80]!r}: {OWN_KEY_NAME_RULE}")
    return verifier.vkey


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def parse_trust_policy(text: str) -> TrustPolicy:
    """Parse a TOML trust policy. Raises VerifyError('policy-malformed')."""
    if len(text) > MAX_TRUST_POLICY_BYTES:
        raise VerifyError("policy-malformed", "trust policy too large")
    try:
        obj = tomllib.loads(text)
        unknown = set(obj) - {"tlog_policy", "max_checkpoint_age", "namespaces", "imports"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        tlog = parse_policy(obj["tlog_policy"].encode())
        if not tlog.logs:
            raise ValueError("tlog_policy names no log")
        age = obj.get("max_checkpoint_age")
        if age is not None and (not isinstance(age, int) or isinstance(age, bool) or age < 0):
            raise ValueError("max_checkpoint_age is a non-negative integer (seconds)")
        pins: dict[str, frozenset[str]] = {}
        for ns, table in obj.get("namespaces", {}).items():
            if not isinstance(table, dict) or set(table) != {"keys"} or not isinstance(table["keys"], list):
                raise ValueError(f"[namespaces.{ns}] holds exactly keys = [vkeys]")
            pins[ns] = frozenset(map(_publisher_vkey, table["keys"]))
        allowed = None
        if "imports" in obj:
            imports = obj["imports"]
            if not isinstance(imports, dict) or set(imports) != {"allow"} or not all(isinstance(p, str) for p in imports["allow"]):
                raise ValueError('[imports] holds exactly allow = ["module.field", "module.*", ...]')
            allowed = tuple(imports["allow"])
    except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError, AttributeError, TlogError) as e:
        raise VerifyError("policy-malformed", f"trust policy: {e}") from None
    return TrustPolicy(tlog, age, pins, allowed)


class KnownCheckpoint(NamedTuple):
    """The newest checkpoint this node accepted for a log: anti-rollback state."""

    checkpoint: Checkpoint
    note: bytes


class Verified(NamedTuple):
    ref: PackageRef
    module_sha256: str
    signer: str
    index: int
    checkpoint: Checkpoint
    witnesses: tuple[str, ...]
    newest_cosignature: int | None
    record: Record
    known: KnownCheckpoint  # the anti-rollback state to keep after this verification

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
        }


def open_checkpoint(
    note_bytes: bytes, policy: TrustPolicy, now: int, parsed: tuple[Note, Checkpoint] | None = None
) -> tuple[Checkpoint, Note, tuple[str, ...], int | None]:
    """Verify a checkpoint note against the policy: log signature, witness quorum, freshness.

    parsed: the note and checkpoint already parsed from note_bytes (saves parsing them again).
    Returns the checkpoint, the note, the witnesses counted, and the newest counted cosignature time.
    Signatures by keys the policy does not name are ignored; a named key's bad signature fails.
    """
    origin = parsed[1].origin if parsed is not None else note_bytes.split(b"\n", 1)[0].decode("utf-8", "replace")
    log = policy.tlog.log_for(origin)
    if log is None:
        raise VerifyError("log-unknown", f"log {origin!r} is not in the trust policy")
    if parsed is not None:
        note, cp = parsed
    else:
        try:
            note = parse_note(note_bytes)
            cp = parse_checkpoint(note.text)
        except TlogError as e:
            raise VerifyError("log-signature", f"checkpoint note: {e}") from None
    text = note.text.encode()
    log_verifier = log.verifier
    witness_keys = policy.tlog.witness_keys
    log_signed = False
    newest_by_witness: dict[str, int] = {}
    latest = now + MAX_FUTURE_SKEW  # a cosignature from further in the future does not count
    for name, key_id, signature in note.signatures:
        if name == log_verifier.name and key_id == log_verifier.key_id:
            if not log_verifier.verify(text, signature):
                raise VerifyError("log-signature", f"invalid signature by {name}+{key_id:08x}")
            log_signed = True
            continue
        witness = witness_keys.get((name, key_id))
        if witness is None:
            continue
        t = witness.verifier.verified_timestamp(text, signature)
        if t is None:
            raise VerifyError("witness-signature", f"invalid signature by {name}+{key_id:08x}")
        if t <= latest and t >= newest_by_witness.get(witness.name, t):
            newest_by_witness[witness.name] = t
    if not log_signed:
        raise VerifyError("log-signature", "checkpoint is not signed by the log")
    names = newest_by_witness.keys()
    if not policy.tlog.satisfied(names):
        raise VerifyError("witness-quorum", f"cosigned by {sorted(names) or 'no witness'}: the quorum {policy.tlog.quorum} is not met")
    newest = max(newest_by_witness.values()) if newest_by_witness else None
    if policy.max_checkpoint_age is not None:
        if newest is None or now - newest > policy.max_checkpoint_age:
            age = "no cosignature" if newest is None else f"newest cosignature {now - newest}s old"
            raise VerifyError("stale", f"checkpoint too old: {age}, the policy allows {policy.max_checkpoint_age}s")
    return cp, note, tuple(sorted(names)), newest


def check_known(known: KnownCheckpoint, policy: TrustPolicy) -> None:
    """The remembered checkpoint must still be one its log signed: only then can it convict the log of a fork."""
    log = policy.tlog.log_for(known.checkpoint.origin)
    if log is None:
        raise VerifyError("state-invalid", f"the remembered checkpoint's log {known.checkpoint.origin!r} is not in the trust policy")
    v = log.verifier
    try:
        note = parse_note(known.note)
        text = note.text.encode()
        if not any(n == v.name and k == v.key_id and v.verify(text, sig) for n, k, sig in note.signatures):
            raise MalformedError("it is not signed by the log")
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
    if cp.size == k.size:
        if cp.root_hash != k.root_hash:
            raise VerifyError("fork", f"two checkpoints of size {cp.size} with different roots", evidence={"known": known.note, "new": note})
        return known
    small, big = (k, cp) if k.size < cp.size else (cp, k)
    if small.size == 0:
        return KnownCheckpoint(cp, note) if cp.size > k.size else known
    if consistency is None:
        raise VerifyError("consistency-required", f"need a consistency proof between sizes {small.size} and {big.size}")
    try:
        verify_consistency(small.size, big.size, consistency, small.root_hash, big.root_hash)
    except MalformedProofError as e:
        raise VerifyError("consistency-malformed", f"consistency proof from {small.size} to {big.size}: {e}") from None
    except ProofError as e:
        reason = "fork" if isinstance(e, SplitViewError) else "inconsistent"
        what = "two histories" if reason == "fork" else "not shown consistent by this proof"
        raise VerifyError(reason, f"checkpoints of sizes {small.size} and {big.size} are {what}: {e}",
                          evidence={"known": known.note, "new": note, "proof": [h.hex() for h in consistency]}) from None
    return KnownCheckpoint(cp, note) if cp.size > k.size else known


@dataclass(frozen=True)
class NamespaceStatus:
    """Verified yank and revocation facts for a namespace, from the log (online refresh)."""

    yanked: frozenset[str] = frozenset()  # "name@version"
    revoked: Mapping[str, int] = field(default_factory=dict)  # vkey -> revocation index


def verify_module(
    *, module: bytes, proof: bytes | TlogProof, policy: TrustPolicy, now: int, sbom: bytes | None = None,
    known: KnownCheckpoint | None = None, consistency: Sequence[bytes] | None = None,
    status: NamespaceStatus | None = None,
) -> Verified:
    """Every check of spec/trust-policy.md, in order; the first failure raises VerifyError.

    proof: the tlog-proof file's bytes, or what parse_tlog_proof already read from them.
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
    digest = hashlib.sha256(module).hexdigest()
    if digest != release.module_sha256:
        raise VerifyError("module-digest", f"module sha256 {digest} is not the released {release.module_sha256}")
    try:
        info = parse_wasm(module)
    except TlogError as e:
        raise VerifyError("module-invalid", f"module: {e}") from None
    if info.imports != release.imports:  # tuples of Import
        raise VerifyError("imports-mismatch", "the statement's import list is not the module's imports")
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
    cp, _, witnesses, newest = open_checkpoint(tp.checkpoint, policy, now, parsed)
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
    return Verified(release.ref, digest, record.signer, tp.index, cp, witnesses, newest, record, new_known)


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
