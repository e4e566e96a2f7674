from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
from hypothesis import settings

# CI explores the same examples on every run (a red CI blocks landing, so it must be reproducible);
# local runs draw new examples each time and are where new counterexamples get found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VECTORS = ROOT / "tests" / "vectors"  # published known-answer values; see tests/vectors/README.md


def load_vectors(name: str) -> dict:
    """Load a vector file from tests/vectors; a missing file fails the test."""
    p = VECTORS / name
    if not p.exists():
        pytest.fail(f"vector file {p} not found")
    return json.loads(p.read_text())
