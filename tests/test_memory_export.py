"""edge.memory_export: a module's memory also exported under our name, everything else as it was; checked
against Wasmtime's own reading of the module before and after."""

from __future__ import annotations

import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.memory_export import MODULE_PREAMBLE, with_memory_export
from edge.sandbox_protocol import MEMORY_EXPORT

ENGINE = wasmtime.Engine()


def kind(t: object) -> str:
    if isinstance(t, wasmtime.FuncType):
        return f"func {[str(v) for v in t.params]} -> {[str(v) for v in t.results]}"
    if isinstance(t, wasmtime.MemoryType):
        return f"memory {t.limits.min}"
    return type(t).__name__


def described(wasm: bytes) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """What Wasmtime reads: (imports, exports) as (name, type) pairs; the module must compile."""
    module = wasmtime.Module(ENGINE, wasm)
    return ([(f"{i.module}.{i.name}", kind(i.type)) for i in module.imports], [(e.name, kind(e.type)) for e in module.exports])


def memory_of(wasm: bytes) -> tuple[str, str]:
    """The export we add, as described() shows it: the module's first memory."""
    pages = next((e.type.limits.min for e in wasmtime.Module(ENGINE, with_memory_export(wasm, MEMORY_EXPORT)).exports
                  if e.name == MEMORY_EXPORT and isinstance(e.type, wasmtime.MemoryType)), None)
    assert pages is not None
    return MEMORY_EXPORT, f"memory {pages}"


@st.composite
def modules(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A core module as WAT, compiled: (bytes, the pages of the memory it defines, if it does)."""
    memory = draw(st.sampled_from(["none", "hidden", "exported"]))
    pages = None
    parts = ['(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'] if draw(st.booleans()) else []
    if memory != "none":
        pages = draw(st.integers(0, 3))
        export = '(export "memory") ' if memory == "exported" else ""
        parts.append(f"(memory {export}{pages})")
        if pages and draw(st.booleans()):
            parts.append('(data (i32.const 0) "some data")')
    for i in range(draw(st.integers(0, 3))):
        parts.append(f'(func (export "f{i}") (result i32) i32.const {i})')
    parts.append('(func (export "_start"))')
    if draw(st.booleans()):
        parts.append('(global (export "g") i32 (i32.const 7))')
    if draw(st.booleans()):
        parts.append("(start $s) (func $s)")
    wasm = bytes(wasmtime.wat2wasm("(module " + " ".join(parts) + ")"))
    if draw(st.booleans()):
        wasm += b"\x00\x05\x04note"  # a trailing custom section
    return wasm, pages


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules())
def test_the_memory_is_exported_and_nothing_else_changes(case: tuple[bytes, int | None]) -> None:
    wasm, pages = case
    imports, exports = described(wasm)
    out = with_memory_export(wasm, MEMORY_EXPORT)
    if pages is None:
        assert out == wasm
        return
    assert described(out) == (imports, [*exports, (MEMORY_EXPORT, f"memory {pages}")])
    assert with_memory_export(out, "another") != out  # still a module this walk can frame


def test_a_padded_section_size_is_read_and_rewritten() -> None:
    wasm = bytes(wasmtime.wat2wasm('(module (memory 1) (func (export "_start")))'))
    # Re-encode every section size as a 5-byte LEB128: valid, and not what wat2wasm writes.
    out, pos = bytearray(MODULE_PREAMBLE), len(MODULE_PREAMBLE)
    while pos < len(wasm):
        size = wasm[pos + 1]
        assert size < 0x80
        out += bytes([wasm[pos], 0x80 | size, 0x80, 0x80, 0x80, 0x00]) + wasm[pos + 2:pos + 2 + size]
        pos += 2 + size
    padded = bytes(out)
    assert described(padded) == described(wasm)
    assert described(with_memory_export(padded, MEMORY_EXPORT))[1] == [("_start", "func [] -> []"), (MEMORY_EXPORT, "memory 1")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_are_returned_or_rewritten_never_a_crash(data: bytes, with_preamble: bool) -> None:
    wasm = (MODULE_PREAMBLE + data) if with_preamble else data
    out = with_memory_export(wasm, MEMORY_EXPORT)
    if not wasm.startswith(MODULE_PREAMBLE):
        assert out == wasm


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules(), st.data())
def test_a_truncated_module_is_left_as_it_is(case: tuple[bytes, int | None], data: st.DataObject) -> None:
    wasm, _ = case
    cut = data.draw(st.integers(len(MODULE_PREAMBLE), len(wasm) - 1))
    truncated = wasm[:cut]
    out = with_memory_export(truncated, MEMORY_EXPORT)
    # A cut inside a section leaves the bytes alone; a cut between sections may still get the export, and then
    # the result is exactly the cut module plus the export Wasmtime reads.
    if out != truncated:
        try:
            imports, exports = described(truncated)
        except wasmtime.WasmtimeError:
            return  # Wasmtime refuses the cut module as it is, and the rewritten one too
        assert described(out) == (imports, [*exports, memory_of(truncated)])
