"""Imports run one way between the packages, layers inside tlog only import downwards, and the pure core does no I/O.

Every import counts: absolute or relative, at module level or inside a function.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("tlog", "witness", "registry", "edge", "wasmlog")
# wasmlog → edge → registry → tlog, wasmlog → witness → tlog; nothing imports wasmlog.
MAY_IMPORT = {
    "tlog": set(),
    "witness": {"tlog"},
    "registry": {"tlog"},
    "edge": {"registry", "tlog"},
    "wasmlog": {"tlog", "witness", "registry", "edge"},
}
PURE = {
    "tlog": ["hashes", "merkle", "compact", "tiles", "note", "checkpoint", "cosignature", "proof_file", "integrate",
             "errors", "policy", "witness_protocol", "syntax", "sigv4", "dsn", "http_answer"],
    "witness": ["errors", "loglist", "rules"],
    "registry": ["wasm", "dsse", "record", "state", "sbom", "publish_body", "trust_policy", "diff",
                 "index_map", "index", "status_proof", "byte_range"],
    "edge": ["verify", "agent_cgi", "telemetry_events", "telemetry_otlp", "telemetry_verify", "sandbox_types", "memory_export", "status"],
}
IO = {"asyncio", "aiohttp", "lmdb", "click", "socket", "os", "requests", "subprocess", "pathlib", "io", "time", "shutil",
      "uvloop", "urllib", "http", "ssl", "select", "selectors", "multiprocessing", "datetime"}
# tlog's layers: server → sequencer → log → storage → pure core
LAYER = {"keys": 1, "files": 1, "runloop": 1, "server": 4, "frontend": 4, "metrics": 4, "httplimits": 4, "sequencer": 3, "shared_sequencer": 3,
         "addipc": 3, "witnessing": 3, "client": 3, "log": 2, "storage": 1, **dict.fromkeys(PURE["tlog"], 0)}


def imported(source: str, package: tuple[str, ...]) -> set[str]:
    """Every module name source imports, dotted and absolute (relative ones resolved from package),
    wherever the import statement is; `from X import y` also counts X.y (y may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parent = package[: len(package) - node.level + 1]
                base = ".".join((*parent, *([node.module] if node.module else [])))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def our_files(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imports_of(path: pathlib.Path) -> set[str]:
    return imported(path.read_text(), path.relative_to(ROOT).parts[:-1])


def top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def test_imports_are_seen_in_every_form() -> None:
    source = (
        "import tlog.note\nfrom witness.rules import check\nfrom . import merkle\nfrom ..errors import TlogError\n"
        "def f():\n    from registry import record\n    import edge.verify\n"
        "class C:\n    def g(self):\n        from .sibling import x\n"
    )
    names = imported(source, ("tlog", "storage"))
    assert {"tlog.note", "witness.rules", "tlog.storage.merkle", "tlog.errors", "registry.record", "edge.verify",
            "tlog.storage.sibling"} <= names


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_one_way(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    for path in our_files(package):
        wrong = {top(n) for n in imports_of(path)} & set(PACKAGES) - allowed
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_nothing_imports_the_application() -> None:
    for package in PACKAGES[:-1]:
        for path in our_files(package):
            assert "wasmlog" not in {top(n) for n in imports_of(path)}, path.relative_to(ROOT)


def is_pure(name: str) -> bool:
    """A module of ours in a PURE list (a package itself, i.e. its __init__, counts as pure)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in PURE.get(parts[0], ()):
        return True
    is_module = (ROOT / parts[0] / f"{parts[1]}.py").exists() or (ROOT / parts[0] / parts[1]).is_dir()
    return not is_module  # a name imported from the package's __init__


@pytest.mark.parametrize("package,name", [(p, m) for p, ms in PURE.items() for m in ms])
def test_pure_module_does_no_io(package: str, name: str) -> None:
    names = imports_of(ROOT / package / f"{name}.py")
    assert not {top(n) for n in names} & IO, f"{package}/{name}.py imports {sorted({top(n) for n in names} & IO)}"
    impure = {n for n in names if top(n) in PACKAGES and not is_pure(n)}
    assert not impure, f"{package}/{name}.py imports modules that are not pure: {sorted(impure)}"


def test_tlog_layers_import_only_downwards() -> None:
    for path in our_files("tlog"):
        layer_name = "storage" if path.parent.name == "storage" else path.stem
        if layer_name == "__init__":
            continue
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] != "tlog" or len(parts) < 2 or parts[1] not in LAYER:
                continue
            assert LAYER[parts[1]] <= LAYER[layer_name], f"{path.relative_to(ROOT)} ({layer_name}) imports {name}"
