"""The edge trust policy (spec/trust-policy.md) and the checks every client of it shares. Pure.

What an edge node, a mirror and an auditor trust: the tlog-policy (log key, witness quorum),
the freshness bound, pinned publisher keys and allowed imports; VerifyError with its stable
reason codes; and open_checkpoint, tlog's checkpoint opener with the policy's freshness bound
and its errors as reason codes.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tlog.checkpoint import Checkpoint
from tlog.errors import (
    CosignatureError,
    QuorumNotMetError,
    SignatureError,
    StaleCheckpointError,
    TlogError,
    UnknownLogError,
    UnverifiedNoteError,
)
from tlog.note import OWN_KEY_NAME_RULE, Note, is_own_key_name, verifier_from_vkey
from tlog.policy import OpenedCheckpoint, Policy, open_checkpoint_times, parse_policy
from tlog.policy import open_checkpoint as open_tlog_checkpoint

from .wasm import Import

MAX_TRUST_POLICY_BYTES = 1 << 20
_T = TypeVar("_T")

# Stable reason codes, one per check (spec/trust-policy.md).
REASONS = (
    "proof-malformed", "entry-invalid", "not-a-release", "module-digest", "module-invalid", "imports-mismatch",
    "import-not-allowed", "signature-invalid", "publisher-not-allowed", "sbom-digest", "log-unknown",
    "log-signature", "inclusion", "witness-signature", "witness-quorum", "stale", "state-invalid",
    "consistency-required", "consistency-malformed", "inconsistent", "fork", "registry-unreachable",
    "registry-error", "yanked", "key-revoked", "policy-malformed", "input-unreadable",
    # the status proof (spec/status-proof.md)
    "status-missing", "status-malformed", "status-checkpoint", "status-quorum", "status-other-log", "status-stale",
    "status-inclusion", "status-root-invalid", "status-wrong-key", "status-map-proof", "status-release-missing",
    "status-foreign-record", "status-incomplete", "status-rollback",
)
DEFAULT_MAX_STATUS_AGE = 86400  # seconds: a status proof's checkpoint may be one day old
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
        return self.reason in ("proof-malformed", "policy-malformed", "state-invalid", "input-unreadable", "status-malformed")


@dataclass(frozen=True)
class TrustPolicy:
    """What an edge node trusts (spec/trust-policy.md)."""

    tlog: Policy
    max_checkpoint_age: int | None = None
    namespace_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_imports: tuple[str, ...] | None = None  # None: no restriction
    require_status: bool = False  # refuse a module without a status proof
    max_status_age: int = DEFAULT_MAX_STATUS_AGE  # seconds: how old a status proof's cosigned checkpoint may be

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
        unknown = set(obj) - {"tlog_policy", "max_checkpoint_age", "namespaces", "imports", "require_status", "max_status_age"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        tlog = parse_policy(obj["tlog_policy"].encode())
        if not tlog.logs:
            raise ValueError("tlog_policy names no log")
        age = obj.get("max_checkpoint_age")
        if age is not None and (not isinstance(age, int) or isinstance(age, bool) or age < 0):
            raise ValueError("max_checkpoint_age is a non-negative integer (seconds)")
        require_status = obj.get("require_status", False)
        if not isinstance(require_status, bool):
            raise ValueError("require_status is true or false")
        status_age = obj.get("max_status_age", DEFAULT_MAX_STATUS_AGE)
        if not isinstance(status_age, int) or isinstance(status_age, bool) or status_age < 0:
            raise ValueError("max_status_age is a non-negative integer (seconds)")
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
    return TrustPolicy(tlog, age, pins, allowed, require_status, status_age)


def open_checkpoint(
    note_bytes: bytes, policy: TrustPolicy, now: int, parsed: tuple[Note, Checkpoint] | None = None
) -> OpenedCheckpoint:
    """tlog.policy.open_checkpoint with the trust policy's freshness bound, its errors as VerifyError reasons.

    Returns the checkpoint, the note, the witnesses counted and the newest counted cosignature time.
    """
    return _reasons(lambda: open_tlog_checkpoint(note_bytes, policy.tlog, now, max_age=policy.max_checkpoint_age, parsed=parsed))


def open_checkpoint_quorum_time(note_bytes: bytes, policy: TrustPolicy, now: int) -> tuple[Checkpoint, int | None]:
    """The checkpoint, opened as open_checkpoint does without a freshness bound, and its quorum
    time (tlog.policy.Policy.quorum_time: the newest time by which a quorum had cosigned)."""
    opened, times = _reasons(lambda: open_checkpoint_times(note_bytes, policy.tlog, now))
    return opened.checkpoint, policy.tlog.quorum_time(times)


def _reasons(open_note: Callable[[], _T]) -> _T:
    """open_note(), tlog's checkpoint errors raised as VerifyError reasons."""
    try:
        return open_note()
    except UnknownLogError as e:
        raise VerifyError("log-unknown", f"{e}") from None
    except CosignatureError as e:
        raise VerifyError("witness-signature", f"{e}") from None
    except QuorumNotMetError as e:
        raise VerifyError("witness-quorum", f"{e}") from None
    except StaleCheckpointError as e:
        raise VerifyError("stale", f"{e}") from None
    except (SignatureError, UnverifiedNoteError) as e:
        raise VerifyError("log-signature", f"{e}") from None
    except TlogError as e:
        raise VerifyError("log-signature", f"checkpoint note: {e}") from None
