"""Deciding a release's status from its status proof (spec/status-proof.md). Pure.

From the status proof alone and the trust policy: "not yanked, signer not revoked, as of the
checkpoint of size N cosigned at T", or VerifyError yanked (at index i) / key-revoked (at
index j), or the reason the status proof does not prove anything.
"""

from __future__ import annotations

from typing import NamedTuple

from registry.index import TYPE_CODES, history_hash, index_keys
from registry.index_map import MapProofError, key_hash, verify_map_proof
from registry.record import Action, Record, Release, decode_entry, decode_index_root
from registry.state import public_key
from registry.status_proof import CARRIED, Included, KeyProof, StatusProof, parse_status_proof
from registry.trust_policy import TrustPolicy, VerifyError, open_checkpoint_quorum_time
from tlog.checkpoint import Checkpoint
from tlog.errors import ProofError, TlogError
from tlog.hashes import leaf_hash
from tlog.merkle import verify_inclusion

_RELEASE = TYPE_CODES["release"]
# Checkpoint failures, as the status proof's own reasons.
_CHECKPOINT_REASONS = {"log-unknown": "status-other-log", "log-signature": "status-checkpoint",
                       "witness-signature": "status-quorum", "witness-quorum": "status-quorum"}


class StatusVerified(NamedTuple):
    """Not yanked and signer not revoked, as of the index root's size, in checkpoint cosigned by a quorum at time."""

    as_of: int
    checkpoint: Checkpoint
    time: int


def parse_status(data: bytes) -> StatusProof:
    try:
        return parse_status_proof(data)
    except TlogError as e:
        raise VerifyError("status-malformed", f"status proof: {e}") from None


def verify_status(
    status: bytes | StatusProof, *, release: Record, release_index: int, origin: str, policy: TrustPolicy, now: int,
) -> StatusVerified:
    """Check the status proof of release (at release_index in the log named origin), in the order of
    spec/status-proof.md; the first failure raises VerifyError."""
    sp = status if isinstance(status, StatusProof) else parse_status(status)
    try:
        cp, cosigned = open_checkpoint_quorum_time(sp.checkpoint, policy, now)
    except VerifyError as e:
        raise VerifyError(_CHECKPOINT_REASONS.get(e.reason, "status-checkpoint"), f"status proof checkpoint: {e}") from None
    if cp.origin != origin:
        raise VerifyError("status-other-log", f"the status proof is from log {cp.origin!r}, the release from {origin!r}")
    if cosigned is None or now - cosigned > policy.max_status_age:  # when a quorum had cosigned, not just one witness
        age = "no cosigned time" if cosigned is None else f"a quorum cosigned {now - cosigned}s ago"
        raise VerifyError("status-stale", f"the status proof's checkpoint is older than max_status_age {policy.max_status_age}s ({age})")
    _included(sp.root, cp, "the index-root record")
    try:
        root = decode_index_root(sp.root.entry)
    except TlogError as e:
        raise VerifyError("status-root-invalid", f"the status proof's root: {e}") from None
    if root.origin != cp.origin:
        raise VerifyError("status-other-log", f"the index root is of log {root.origin!r}, the checkpoint of {cp.origin!r}")
    if sp.root.index != cp.size - 1 or root.size != sp.root.index:
        raise VerifyError("status-root-invalid", f"the index root at {sp.root.index} (as of {root.size}) is not the last entry "
                                                 f"of the checkpoint (size {cp.size}) committing the index as of its own index")
    ns = release.namespace
    (package,) = index_keys(release)  # NS:NAME
    for kp, want in ((sp.namespace, ns), (sp.package, package)):
        _check_key(kp, want, root.root, root.size)
    if (release_index, _RELEASE) not in sp.package.history:
        raise VerifyError("status-release-missing", f"the history of {package} does not list this release at {release_index}")
    records = _records(sp, cp, ns, package)
    _decide(records, release, release_index)
    return StatusVerified(root.size, cp, cosigned)


def _included(inc: Included, cp: Checkpoint, what: str) -> None:
    try:
        verify_inclusion(inc.index, cp.size, leaf_hash(inc.entry), inc.proof, cp.root_hash)
    except ProofError as e:
        raise VerifyError("status-inclusion", f"{what} at {inc.index}: {e}") from None


def _check_key(kp: KeyProof, want: str, root: bytes, size: int) -> None:
    if kp.key != want:
        raise VerifyError("status-wrong-key", f"the status proof proves key {kp.key[:140]!r}, not {want!r}")
    if kp.history and kp.history[-1][0] >= size:
        raise VerifyError("status-map-proof", f"the history of {want} lists index {kp.history[-1][0]}, beyond the index's size {size}")
    try:
        verify_map_proof(root, key_hash(want), history_hash(kp.history) if kp.history else None, kp.proof)
    except MapProofError as e:
        raise VerifyError("status-map-proof", f"the map proof of {want}: {e}") from None


def _records(sp: StatusProof, cp: Checkpoint, ns: str, package: str) -> list[tuple[int, Record]]:
    """Every revocation and yank the histories list, each decoded, of its key and type, and included."""
    needed: dict[int, tuple[str, int]] = {i: (ns, code) for i, code in sp.namespace.history if code in CARRIED}
    needed.update({i: (package, code) for i, code in sp.package.history if code in CARRIED})
    out = []
    for inc in sp.records:
        try:
            record = decode_entry(inc.entry)
        except TlogError as e:
            raise VerifyError("status-foreign-record", f"the record at {inc.index} is not a namespace record: {e}") from None
        want = needed.pop(inc.index, None)
        if want is None or want[0] not in index_keys(record) or TYPE_CODES[record.type] != want[1]:
            listed = "not listed" if want is None else f"listed as a {_type_name(want[1])} of {want[0]}"
            raise VerifyError("status-foreign-record", f"the record at {inc.index} is a {record.type} of {index_keys(record)[0]}, {listed}")
        _included(inc, cp, f"the {record.type}")
        out.append((inc.index, record))
    if needed:
        i, (key, code) = min(needed.items())
        raise VerifyError("status-incomplete", f"the {_type_name(code)} of {key} at index {i} is listed but not in the status proof")
    return out


def _type_name(code: int) -> str:
    return next(t for t, c in TYPE_CODES.items() if c == code)


def _decide(records: list[tuple[int, Record]], release: Record, release_index: int) -> None:
    """Refuse a release whose signer's public key was revoked before it, or that was yanked. A record
    not signed by its signer is void and ignored; a void revocation or yank otherwise counts (it can
    only make the verifier refuse more, never accept more)."""
    body = release.body
    assert isinstance(body, Release)
    signer_key = release.signer_verifier.public_key
    for index, record in records:  # in index order
        action = record.body
        if not isinstance(action, Action) or not record.signed_by_signer:
            continue
        if action.action == "key-revocation" and action.key is not None and index < release_index \
                and public_key(action.key) == signer_key:
            raise VerifyError("key-revoked", f"{action.key} was revoked at index {index}, before this release ({release_index})")
        if action.action == "yank" and (action.name, action.version) == (body.ref.name, body.ref.version):
            raise VerifyError("yanked", f"{body.ref} was yanked at index {index}")
