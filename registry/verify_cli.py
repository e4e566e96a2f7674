"""The I/O around the pure verifier: read files, keep anti-rollback state, optionally go online."""

from __future__ import annotations

import base64
import json
import pathlib

import aiohttp
import uvloop

from tlog.checkpoint import parse_checkpoint
from tlog.errors import TlogError
from tlog.note import parse_note
from tlog.proof_file import parse_tlog_proof

from .client import RegistryClient
from .edge_state import load_known, save_known
from .record import decode_entry
from .verify import NamespaceStatus, VerifyError, namespace_status, parse_trust_policy, verify_module

MAX_INPUT_BYTES = 64 << 20


def _read(path: pathlib.Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise VerifyError("proof-malformed", f"{what} {path} is too large")
        return path.read_bytes()
    except OSError as e:
        raise VerifyError("proof-malformed", f"cannot read {what} {path}: {e.strerror}") from None


def _hash_lines(text: str) -> list[bytes]:
    try:
        return [base64.b64decode(line, validate=True) for line in text.splitlines() if line]
    except ValueError:
        raise VerifyError("proof-malformed", "consistency proof lines are not base64") from None


async def _online(url: str, proof: bytes, known_size: int | None, policy, now: int):  # type: ignore[no-untyped-def]
    """Fetch the consistency proof (if a known checkpoint needs one) and the namespace's actions."""
    tp = parse_tlog_proof(proof)
    cp = parse_checkpoint(parse_note(tp.checkpoint).text)
    ns = decode_entry(tp.extra or b"").namespace
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = RegistryClient(url, session)
        consistency = None
        if known_size is not None and known_size != cp.size and known_size > 0 and cp.size > 0:
            old, new = sorted((known_size, cp.size))
            consistency = _hash_lines((await api.get(f"/log/proof/consistency?old={old}&new={new}")).decode())
        actions = await api.actions(ns)
    status = namespace_status(ns, actions, policy, now)
    return consistency, status


def run_verify(
    *, policy_file: pathlib.Path, module_file: pathlib.Path, proof_file: pathlib.Path, sbom_file: pathlib.Path | None,
    state_dir: pathlib.Path | None, consistency_file: pathlib.Path | None, url: str | None, now: int, as_json: bool,
) -> tuple[int, str]:
    """Return (exit status, the one line to print)."""
    try:
        policy = parse_trust_policy(_read(policy_file, "trust policy").decode("utf-8", "replace"))
        module = _read(module_file, "module")
        proof = _read(proof_file, "tlog-proof")
        sbom = _read(sbom_file, "SBOM") if sbom_file else None
        consistency = _hash_lines(_read(consistency_file, "consistency proof").decode("ascii", "replace")) if consistency_file else None
        known = None
        origin = None
        if state_dir is not None:
            try:
                origin = parse_note(parse_tlog_proof(proof).checkpoint).text.split("\n", 1)[0]
            except TlogError as e:
                raise VerifyError("proof-malformed", f"tlog-proof: {e}") from None
            known = load_known(state_dir, origin)
        status: NamespaceStatus | None = None
        if url is not None:
            try:
                fetched, status = uvloop.run(_online(url, proof, None if known is None else known.checkpoint.size, policy, now))
            except (TlogError, aiohttp.ClientError, OSError, KeyError, ValueError) as e:
                raise VerifyError("proof-malformed", f"online refresh from {url} failed: {e}") from None
            consistency = consistency or fetched
        verified = verify_module(module=module, proof=proof, policy=policy, now=now, sbom=sbom, known=known, consistency=consistency, status=status)
        if state_dir is not None and verified.known != known:
            save_known(state_dir, verified.known)
    except VerifyError as e:
        code = 2 if e.unusable_input else 1
        if as_json:
            return code, json.dumps({"ok": False, "reason": e.reason, "message": str(e), "evidence": {k: v.decode() if isinstance(v, bytes) else v for k, v in e.evidence.items()}})
        return code, f"FAIL {e.reason}: {e}"
    if as_json:
        return 0, json.dumps(verified.as_json())
    return 0, verified.summary()
