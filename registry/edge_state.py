"""The edge node's anti-rollback state on disk: the newest accepted checkpoint per log.

One file per log origin, named by the SHA-256 of the origin, replaced atomically.
"""

from __future__ import annotations

import hashlib
import pathlib

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
