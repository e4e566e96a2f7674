"""The edge node's anti-rollback state on disk: the newest accepted checkpoint per log.

One file per log origin, named by the SHA-256 of the origin, replaced atomically; and
evidence/, one JSON file per fork or inconsistency found (the signed checkpoints and the proof).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping

from tlog.checkpoint import parse_checkpoint
from tlog.files import atomic_write
from tlog.note import parse_note

from .verify import KnownCheckpoint


def _path(state_dir: pathlib.Path, origin: str) -> pathlib.Path:
    return state_dir / (hashlib.sha256(origin.encode()).hexdigest() + ".checkpoint")


def load_known(state_dir: pathlib.Path, origin: str) -> KnownCheckpoint | None:
    """The stored checkpoint for origin (its signatures were verified when it was stored)."""
    path = _path(state_dir, origin)
    if not path.exists():
        return None
    note = path.read_bytes()
    return KnownCheckpoint(parse_checkpoint(parse_note(note).text), note)


def save_known(state_dir: pathlib.Path, known: KnownCheckpoint) -> None:
    """Replace the stored checkpoint atomically: a crash leaves the old one or the new one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(_path(state_dir, known.checkpoint.origin), known.note)


def save_evidence(state_dir: pathlib.Path, reason: str, message: str, evidence: Mapping[str, object], now: int) -> pathlib.Path:
    """Keep what a fork or inconsistency was found with (both signed notes, the proof); return the file written."""
    record = {"reason": reason, "message": message, "time": now,
              **{k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in evidence.items()}}
    body = json.dumps(record, sort_keys=True, indent=1).encode()
    path = state_dir / "evidence" / f"{now}-{reason}-{hashlib.sha256(body).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, body)
    return path
