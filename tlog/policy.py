"""c2sp.org/tlog-policy: which logs and witnesses are trusted, and the witness quorum. Pure.

    log <vkey> [<url>]
    witness <name> <vkey> [<url>]
    group <name> all|any|<k> <name>...
    quorum <name>|none
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .checkpoint import Checkpoint, parse_checkpoint
from .cosignature import CosignatureV1Verifier, cosignature_verifier_from_vkey
from .errors import (
    CosignatureError,
    MalformedError,
    QuorumNotMetError,
    SignatureError,
    StaleCheckpointError,
    TooLargeError,
    UnknownLogError,
    UnverifiedNoteError,
)
from .note import Ed25519Verifier, Note, NoteSignature, parse_note, verifier_from_vkey
from .syntax import positive_decimal

MAX_POLICY_BYTES = 1 << 20
MAX_LOGS = MAX_WITNESSES = MAX_GROUPS = 1024  # the spec asks for at least 32 of each
NONE = "none"
_WS = re.compile(r"[ \t]+")
_K = re.compile(positive_decimal(4))  # a group threshold: at most its member count, checked after


@dataclass(frozen=True)
class PolicyLog:
    verifier: Ed25519Verifier
    url: str | None = None

    @property
    def origin(self) -> str:
        return self.verifier.name  # tlog-policy: the key name MUST be the log's origin


@dataclass(frozen=True)
class PolicyWitness:
    name: str
    verifier: CosignatureV1Verifier
    url: str | None = None


@dataclass(frozen=True)
class Group:
    name: str
    threshold: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    """A parsed tlog-policy. groups are in definition order: every member is defined before its group."""

    logs: tuple[PolicyLog, ...]
    witnesses: Mapping[str, PolicyWitness]
    groups: Mapping[str, Group]
    quorum: str  # a witness or group name, or NONE

    def log_for(self, origin: str) -> PolicyLog | None:
        return self._logs_by_origin.get(origin)

    @functools.cached_property
    def _logs_by_origin(self) -> dict[str, PolicyLog]:
        by_origin: dict[str, PolicyLog] = {}
        for log in self.logs:
            by_origin.setdefault(log.origin, log)  # the first log line for an origin wins
        return by_origin

    def satisfied(self, witnessed: Iterable[str]) -> bool:
        """Whether the quorum holds when exactly these witnesses (policy names) cosigned."""
        if self.quorum == NONE:
            return True
        holds = set(witnessed)
        for group in self.groups.values():  # in definition order: a group's members come before it
            if len(holds.intersection(group.members)) >= group.threshold:
                holds.add(group.name)
        return self.quorum in holds

    def quorum_time(self, times: Mapping[str, int]) -> int | None:
        """The newest time T such that the witnesses whose cosignature (times: policy name -> time) is
        at T or later meet the quorum on their own: how fresh a quorum vouches the checkpoint is.
        None when there is no cosignature (with quorum none, the newest cosignature's time)."""
        ordered = sorted(times.items(), key=lambda item: item[1], reverse=True)
        for k in range(1, len(ordered) + 1):  # monotone: adding witnesses never breaks a quorum
            if self.satisfied(name for name, _ in ordered[:k]):
                return ordered[k - 1][1]
        return None

    @functools.cached_property
    def witness_keys(self) -> dict[tuple[str, int], PolicyWitness]:
        """The policy's witnesses by the (key name, key ID) of their signature lines."""
        return {(w.verifier.name, w.verifier.key_id): w for w in self.witnesses.values()}

    def witnessed_by(self, signatures: Iterable[NoteSignature]) -> set[str]:
        """Names of policy witnesses among verified note signatures (matched by key name and ID)."""
        keys = self.witness_keys
        return {keys[(s.name, s.key_id)].name for s in signatures if (s.name, s.key_id) in keys}

    def encode(self) -> str:
        lines = [f"log {log.verifier.vkey}" + (f" {log.url}" if log.url else "") for log in self.logs]
        lines += [f"witness {w.name} {w.verifier.vkey}" + (f" {w.url}" if w.url else "") for w in self.witnesses.values()]
        lines += [f"group {g.name} {g.threshold} {' '.join(g.members)}" for g in self.groups.values()]
        lines.append(f"quorum {self.quorum}")
        return "\n".join(lines) + "\n"


def _fail(line: int, why: str) -> MalformedError:
    return MalformedError(f"policy line {line}: {why}")


def parse_policy(data: bytes) -> Policy:
    """Parse a tlog-policy file. Raises MalformedError naming the line at fault."""
    if len(data) > MAX_POLICY_BYTES:
        raise TooLargeError("policy file is too large")
    if any((b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F for b in data):
        raise MalformedError("policy has a control character")
    text = data.decode("utf-8", "surrogateescape")  # non-ASCII octets are opaque
    logs: list[PolicyLog] = []
    witnesses: dict[str, PolicyWitness] = {}
    groups: dict[str, Group] = {}
    quorum: str | None = None
    log_keys: set[bytes] = set()
    witness_keys: set[bytes] = set()
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t")
        if not line or line.startswith("#"):
            continue
        words = _WS.split(line)

        def define(name: str, n: int = n) -> None:
            if name == NONE or name in witnesses or name in groups:
                raise _fail(n, f"name {name!r} is reserved or already defined")

        if words[0] == "log" and len(words) in (2, 3):
            v = verifier_from_vkey(words[1])
            if v.public_key in log_keys:
                raise _fail(n, "duplicate log key")
            log_keys.add(v.public_key)
            logs.append(PolicyLog(v, words[2] if len(words) == 3 else None))
        elif words[0] == "witness" and len(words) in (3, 4):
            define(words[1])
            w = cosignature_verifier_from_vkey(words[2])
            if w.public_key in witness_keys:
                raise _fail(n, "duplicate witness key")
            witness_keys.add(w.public_key)
            witnesses[words[1]] = PolicyWitness(words[1], w, words[3] if len(words) == 4 else None)
        elif words[0] == "group" and len(words) >= 4:
            name, k, members = words[1], words[2], tuple(words[3:])
            define(name)
            if len(set(members)) != len(members):
                raise _fail(n, "a member is listed twice")
            for m in members:
                if m not in witnesses and m not in groups:
                    raise _fail(n, f"member {m!r} is not defined above")
            if k == "all":
                threshold = len(members)
            elif k == "any":
                threshold = 1
            elif _K.fullmatch(k) and int(k) <= len(members):
                threshold = int(k)
            else:
                raise _fail(n, f"bad threshold {k!r}")
            groups[name] = Group(name, threshold, members)
        elif words[0] == "quorum" and len(words) == 2:
            if quorum is not None:
                raise _fail(n, "a second quorum line")
            if words[1] != NONE and words[1] not in witnesses and words[1] not in groups:
                raise _fail(n, f"quorum {words[1]!r} is not defined above")
            quorum = words[1]
        else:
            raise _fail(n, "not a log, witness, group or quorum line")
        if len(logs) > MAX_LOGS or len(witnesses) > MAX_WITNESSES or len(groups) > MAX_GROUPS:
            raise TooLargeError("policy has too many logs, witnesses or groups")
    if quorum is None:
        raise MalformedError("policy has no quorum line")
    return Policy(tuple(logs), witnesses, groups, quorum)


MAX_FUTURE_SKEW = 600  # seconds a cosignature timestamp may lie ahead of `now` and still count


class OpenedCheckpoint(NamedTuple):
    """A checkpoint note verified against a tlog-policy."""

    checkpoint: Checkpoint
    note: Note
    witnesses: tuple[str, ...]  # the policy names of the witnesses counted, sorted
    newest_cosignature: int | None  # the newest counted cosignature's time (None: no witness counted)


def open_checkpoint(
    note_bytes: bytes, policy: Policy, now: int, *, max_age: int | None = None, parsed: tuple[Note, Checkpoint] | None = None,
) -> OpenedCheckpoint:
    """Open a checkpoint note against a tlog-policy: the one way every part of wasmlog does it.

    The log is the policy's log for the checkpoint's origin, and its signature must verify; a
    cosignature counts for a policy witness when it verifies and its time is at most
    MAX_FUTURE_SKEW seconds after now (each witness counts once, at its newest time); the counted
    witnesses must meet the quorum; with max_age, the quorum time (Policy.quorum_time: the newest
    time by which a quorum had cosigned) must be at most that many seconds old, so one witness's
    fresh cosignature never makes a checkpoint the rest stopped vouching for look fresh.
    Signatures by keys the policy does not name are ignored; a named key's bad signature fails
    the note. parsed: the note and checkpoint already parsed from note_bytes.

    Raises UnknownLogError, MalformedError (not a checkpoint note), SignatureError (the log's
    signature fails), UnverifiedNoteError (no log signature), CosignatureError, QuorumNotMetError,
    StaleCheckpointError.
    """
    opened, times = open_checkpoint_times(note_bytes, policy, now, parsed=parsed)
    vouched = policy.quorum_time(times)
    if max_age is not None and (vouched is None or now - vouched > max_age):
        age = "no cosignature" if vouched is None else f"the quorum's cosignatures are {now - vouched}s old"
        raise StaleCheckpointError(f"checkpoint too old: {age}, the policy allows {max_age}s")
    return opened


def open_checkpoint_times(
    note_bytes: bytes, policy: Policy, now: int, *, parsed: tuple[Note, Checkpoint] | None = None,
) -> tuple[OpenedCheckpoint, dict[str, int]]:
    """open_checkpoint without a freshness bound, with each counted witness's cosignature time
    (policy name -> time; Policy.quorum_time takes them). Raises as open_checkpoint."""
    origin = parsed[1].origin if parsed is not None else note_bytes.split(b"\n", 1)[0].decode("utf-8", "replace")
    log = policy.log_for(origin)
    if log is None:
        raise UnknownLogError(f"log {origin!r} is not in the policy")
    if parsed is not None:
        note, cp = parsed
    else:
        note = parse_note(note_bytes)
        cp = parse_checkpoint(note.text)
    text = note.text.encode()
    log_verifier = log.verifier
    witness_keys = policy.witness_keys
    log_signed = False
    newest_by_witness: dict[str, int] = {}
    latest = now + MAX_FUTURE_SKEW  # a cosignature from further in the future does not count
    for name, key_id, signature in note.signatures:  # one pass, no allocation per signature: the edge's hot path
        if name == log_verifier.name and key_id == log_verifier.key_id:
            if not log_verifier.verify(text, signature):
                raise SignatureError(f"invalid signature by {name}+{key_id:08x}")
            log_signed = True
            continue
        witness = witness_keys.get((name, key_id))
        if witness is None:
            continue
        t = witness.verifier.verified_timestamp(text, signature)
        if t is None:
            raise CosignatureError(f"invalid signature by {name}+{key_id:08x}")
        if t <= latest and t >= newest_by_witness.get(witness.name, t):
            newest_by_witness[witness.name] = t
    if not log_signed:
        raise UnverifiedNoteError("checkpoint is not signed by the log")
    names = newest_by_witness.keys()
    if not policy.satisfied(names):
        raise QuorumNotMetError(f"cosigned by {sorted(names) or 'no witness'}: the quorum {policy.quorum} is not met")
    newest = max(newest_by_witness.values()) if newest_by_witness else None
    return OpenedCheckpoint(cp, note, tuple(sorted(names)), newest), newest_by_witness
