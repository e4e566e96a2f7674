"""The pure core does no I/O, and layers only import downwards."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PURE = ["hashes", "merkle", "compact", "tiles", "note", "checkpoint", "cosignature", "proof_file", "integrate",
        "errors", "policy", "witness_protocol", "syntax"]
IO = {"asyncio", "aiohttp", "lmdb", "click", "socket", "os", "requests", "subprocess", "pathlib", "io", "time", "shutil"}
# cli → server → sequencer → log → storage → pure core
LAYER = {"cli": 5, "__main__": 5, "keys": 1, "files": 1, "runloop": 1, "server": 4, "frontend": 4, "metrics": 4, "httplimits": 4, "sequencer": 3, "addipc": 3, "witnessing": 3, "client": 3, "log": 2, "storage": 1,
         **{m: 0 for m in PURE}}


def imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(top-level modules imported absolutely, tlog modules imported relatively)."""
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                absolute.add(node.module.split(".")[0])
            elif node.level == 1 and node.module:
                relative.add(node.module.split(".")[0])
            elif node.level == 2 and node.module:
                relative.add(node.module.split(".")[0])
    return absolute, relative


@pytest.mark.parametrize("name", PURE)
def test_pure_module_does_no_io(name: str) -> None:
    absolute, relative = imports(ROOT / "tlog" / f"{name}.py")
    assert not absolute & IO
    assert relative <= set(PURE), f"{name} imports {relative - set(PURE)}"


def test_layers_import_only_downwards() -> None:
    for path in (ROOT / "tlog").rglob("*.py"):
        layer_name = "storage" if path.parent.name == "storage" else path.stem
        if layer_name == "__init__":
            continue
        _, relative = imports(path)
        for dep in relative:
            dep_layer = "storage" if dep == "storage" else dep
            assert LAYER[dep_layer] <= LAYER[layer_name], f"{path.name} ({layer_name}) imports {dep}"


WITNESS_PURE = ["errors", "loglist", "rules"]


@pytest.mark.parametrize("name", WITNESS_PURE)
def test_witness_pure_module_does_no_io(name: str) -> None:
    absolute, _ = imports(ROOT / "witness" / f"{name}.py")
    assert not absolute & IO


REGISTRY_PURE = ["wasm", "dsse", "record", "state", "sbom", "publish_body"]


@pytest.mark.parametrize("name", REGISTRY_PURE)
def test_registry_pure_module_does_no_io(name: str) -> None:
    absolute, _ = imports(ROOT / "registry" / f"{name}.py")
    assert not absolute & IO


def test_tlog_never_imports_registry() -> None:
    for path in (ROOT / "tlog").rglob("*.py"):
        absolute, _ = imports(path)
        assert "registry" not in absolute, path
