from __future__ import annotations

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHARED_VECTORS = ROOT.parent / "shared" / "vectors"  # the team's vectors, beside every checkout


def load_vectors(name: str) -> dict:
    """Load a vector file from ../shared/vectors; a missing file fails the test."""
    p = SHARED_VECTORS / name
    if not p.exists():
        pytest.fail(f"vector file {p} not found")
    return json.loads(p.read_text())
