"""The I/O around the pure verifier: read files, keep anti-rollback state, optionally go online."""

from __future__ import annotations

import base64
import json
import pathlib

import aiohttp

from registry.client import RegistryClient, RegistryError
from registry.record import PackageRef, Release, decode_entry
from registry.status_proof import MAX_STATUS_PROOF_BYTES
from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.client import BAD_RESPONSE, UNREACHABLE, failure_kind
from tlog.errors import TlogError
from tlog.note import parse_note
from tlog.policy import NONE
from tlog.proof_file import TlogProof, parse_tlog_proof
from tlog.runloop import run

from .state import load_known, save_evidence, save_known
from .status import parse_status
from .verify import (
    EVIDENCE_REASONS,
    NamespaceStatus,
    TrustPolicy,
    Verified,
    VerifyError,
    namespace_status,
    parse_trust_policy,
    verify_module,
)

MAX_INPUT_BYTES = 64 << 20


def _read(path: pathlib.Path, what: str, reason: str = "input-unreadable") -> bytes:
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise VerifyError(reason, f"{what} {path} is too large")
        return path.read_bytes()
    except OSError as e:
        raise VerifyError(reason, f"cannot read {what} {path}: {e.strerror}") from None


def parse_proof(data: bytes) -> TlogProof:
    """Parse a tlog-proof (once: the online refresh and the verifier use what it read). Raises VerifyError
    proof-malformed."""
    try:
        return parse_tlog_proof(data)
    except TlogError as e:
        raise VerifyError("proof-malformed", f"tlog-proof: {e}") from None


def _hash_lines(text: str, source: str) -> list[bytes]:
    try:
        return [base64.b64decode(line, validate=True) for line in text.splitlines() if line]
    except ValueError:
        raise VerifyError("consistency-malformed", f"the consistency proof from {source} is not base64 lines") from None


async def online_facts(url: str, known_size: int | None, size: int, ns: str | None, policy, now: int):  # type: ignore[no-untyped-def]
    """Fetch the consistency proof (if a known checkpoint needs one) and the namespace's actions
    (none when ns is None: the status is then None). Also used by the edge agent (edge/).

    Raises VerifyError: registry-unreachable, registry-error (an error status, a body that
    is not what the API promises, or a namespace record that does not verify), consistency-malformed.
    """
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            api = RegistryClient(url, session)
            consistency = None
            if known_size is not None and known_size != size and known_size > 0 and size > 0:
                old, new = sorted((known_size, size))
                body = await api.get(f"/log/proof/consistency?old={old}&new={new}")
                consistency = _hash_lines(body.decode("ascii", "replace"), url)
            proofs = None if ns is None else await api.actions(ns)  # every page; MalformedError for a wrong shape
    except VerifyError:
        raise
    except Exception as e:  # every failure of the exchange is named below; ours is re-raised
        failure = _registry_failure(url, e)
        if failure is e:
            raise
        raise failure from None
    if ns is None or proofs is None:
        return consistency, None
    try:
        status = namespace_status(ns, proofs, policy, now)
    except VerifyError as e:  # the registry's records, not the module's proof
        raise VerifyError("registry-error", f"registry {url} sent a namespace record that does not verify ({e.reason}): {e}") from None
    return consistency, status


def _registry_failure(url: str, e: Exception) -> Exception:
    """A failed exchange with a registry as its reason (registry-unreachable, registry-error), or e itself (ours)."""
    kind = failure_kind(e)
    if kind == UNREACHABLE:
        return VerifyError("registry-unreachable", f"registry {url} unreachable: {e!r}")
    if kind == BAD_RESPONSE or isinstance(e, (KeyError, TypeError)):
        return VerifyError("registry-error", f"registry {url} answered badly: {e}")
    return e


async def status_proof_of(url: str, ref: PackageRef) -> bytes | None:
    """The release's status proof from the registry at url, or None when it serves none (404: a registry
    from before status proofs; 503: no index root yet). Raises VerifyError like online_facts."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            api = RegistryClient(url, session)
            return await api.get(api.package_path(ref) + "/status-proof", MAX_STATUS_PROOF_BYTES)
    except RegistryError as e:
        if e.status in (404, 503):
            return None
        raise _registry_failure(url, e) from None
    except Exception as e:  # named by _registry_failure; ours is re-raised
        failure = _registry_failure(url, e)
        if failure is e:
            raise
        raise failure from None


async def status_consistency_of(url: str, status_proof: bytes, trusted: Checkpoint, policy: TrustPolicy, now: int) -> list[bytes] | None:
    """The consistency proof from the trusted checkpoint to the status proof's, from the registry at url, when
    that one is of the same log and larger (read unverified: the verifier checks the checkpoint and the proof);
    None otherwise, or when the status proof cannot be read (the verifier says why). Raises VerifyError like
    online_facts."""
    try:
        cp = parse_checkpoint(parse_note(parse_status(status_proof).checkpoint).text)
    except (VerifyError, TlogError):
        return None
    size = cp.size
    if cp.origin != trusted.origin or size <= trusted.size or trusted.size <= 0:
        return None
    trusted_size = trusted.size
    consistency: list[bytes] | None
    consistency, _ = await online_facts(url, trusted_size, size, None, policy, now)
    return consistency


async def status_online(url: str, ref: PackageRef, status_proof: bytes | None, trusted: Checkpoint, policy: TrustPolicy,
                        now: int) -> tuple[bytes | None, list[bytes] | None]:
    """With --registry (and the agent): the release's status proof (status_proof if given, else the registry's when the
    policy has witnesses to date it) and the consistency proof its checkpoint needs (status_consistency_of)."""
    if status_proof is None and policy.tlog.quorum != NONE:
        status_proof = await status_proof_of(url, ref)
    if status_proof is None:
        return None, None
    return status_proof, await status_consistency_of(url, status_proof, trusted, policy, now)


def run_verify(
    *, policy_file: pathlib.Path, module_file: pathlib.Path, proof_file: pathlib.Path, sbom_file: pathlib.Path | None,
    status_file: pathlib.Path | None = None,
    state_dir: pathlib.Path | None, consistency_file: pathlib.Path | None, url: str | None, now: int, as_json: bool,
) -> tuple[int, str]:
    """Return (exit status, the one line to print)."""
    try:
        verified = _verify(policy_file=policy_file, module_file=module_file, proof_file=proof_file, sbom_file=sbom_file, status_file=status_file,
                           state_dir=state_dir, consistency_file=consistency_file, url=url, now=now)
    except VerifyError as e:
        code = 2 if e.unusable_input else 1
        message = str(e)
        if state_dir is not None and e.reason in EVIDENCE_REASONS:
            message += f" (evidence kept in {save_evidence(state_dir, e.reason, message, e.evidence, now)})"
        if as_json:
            evidence = {k: v.decode() if isinstance(v, bytes) else v for k, v in e.evidence.items()}
            return code, json.dumps({"ok": False, "reason": e.reason, "message": message, "evidence": evidence})
        return code, f"FAIL {e.reason}: {message}"
    if as_json:
        return 0, json.dumps(verified.as_json())
    return 0, verified.summary()


def _verify(
    *, policy_file: pathlib.Path, module_file: pathlib.Path, proof_file: pathlib.Path, sbom_file: pathlib.Path | None,
    status_file: pathlib.Path | None,
    state_dir: pathlib.Path | None, consistency_file: pathlib.Path | None, url: str | None, now: int,
) -> Verified:
    policy = parse_trust_policy(_read(policy_file, "trust policy").decode("utf-8", "replace"))
    module = _read(module_file, "module")
    proof = _read(proof_file, "tlog-proof", "proof-malformed")
    sbom = _read(sbom_file, "SBOM") if sbom_file else None
    status_proof = _read(status_file, "status proof") if status_file else None
    consistency = None
    if consistency_file is not None:
        consistency = _hash_lines(_read(consistency_file, "consistency proof").decode("ascii", "replace"), str(consistency_file))
    tp = parse_proof(proof)  # once: the state, the online refresh and the verifier use it
    assert tp.parsed is not None  # parse_tlog_proof read the checkpoint
    cp = tp.parsed
    known = None
    if state_dir is not None:
        try:
            known = load_known(state_dir, cp.origin)
        except (TlogError, OSError) as e:
            raise VerifyError("state-invalid", f"the remembered checkpoint in {state_dir}: {e}") from None
    status: NamespaceStatus | None = None
    status_consistency = None
    if url is not None:
        try:
            release = decode_entry(tp.extra or b"")
        except TlogError as e:
            raise VerifyError("entry-invalid", f"log entry: {e}") from None
        fetched, status = run(online_facts(url, None if known is None else known.checkpoint.size, cp.size, release.namespace, policy, now))
        consistency = consistency or fetched
        if isinstance(release.body, Release):  # else verify_module says what it is
            trusted = known.checkpoint if known is not None and known.checkpoint.size > cp.size else cp
            status_proof, status_consistency = run(status_online(url, release.body.ref, status_proof, trusted, policy, now))
    verified = verify_module(module=module, proof=tp, policy=policy, now=now, sbom=sbom, known=known, consistency=consistency, status=status,
                             status_proof=status_proof, status_consistency=status_consistency)
    if state_dir is not None and verified.known != known:
        save_known(state_dir, verified.known)
    return verified
