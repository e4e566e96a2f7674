"""The repository stands alone: nothing in it reads, or sends readers to, a folder beside it."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", "wasmlog-data", "build", "results"}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = ["../" + "shared", '/ "' + 'shared"', "/work" + "/", "DESIGN" + ".md", "STYLE" + ".md", "C2SP-NOTES" + ".md"]


def project_files() -> list[pathlib.Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not set(rel.parts) & SKIP_DIRS and not rel.parts[0].endswith(".egg-info"):
            files.append(path)
    return files


def test_nothing_points_outside_the_repository() -> None:
    files = project_files()
    assert ROOT / "README.md" in files and ROOT / "tests" / "conftest.py" in files
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (e.g. compiled wasm fixtures)
        found += [f"{path.relative_to(ROOT)}: {s}" for s in OUTSIDE if s in text]
    assert not found, found


def test_the_vectors_the_tests_load_are_in_the_repository() -> None:
    vectors = ROOT / "tests" / "vectors"
    named = {p.name for p in vectors.glob("*.json")}
    assert {"rfc6962-8-leaves.json", "signed-note.json", "tiles.json"} <= named
    readme = (vectors / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in named), "every vector file has its source in tests/vectors/README.md"


def test_no_file_holds_an_unresolved_merge() -> None:
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")  # at the start of a line, as git writes them
    found = []
    for path in project_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            continue
        found += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(lines, 1) if line.startswith(markers)]
    assert not found, found
