"""A core module's bytes with its first memory also exported under a name of ours. Pure (bytes in, bytes out).

Wasmtime answers a memory.grow past a store's cap with -1, not a trap, and a module need not export its memory:
the export lets the sandbox worker read how much memory a run that then trapped was using, and so report the
memory cap as what stopped it. The module cannot see its own exports; nothing else about it changes.
"""

from __future__ import annotations

_EXPORT, _MEMORY, _EXPORT_KIND_MEMORY = 7, 5, 2
_AFTER_EXPORT = {8, 9, 12, 10, 11}  # start, element, data count, code, data: the sections an export section precedes
MODULE_PREAMBLE = b"\0asm\x01\0\0\0"


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of an unsigned LEB128 of at most 5 bytes."""
    value = 0
    for i in range(5):
        if pos >= len(data):
            raise ValueError("unexpected end of module")
        b = data[pos]
        value |= (b & 0x7F) << (7 * i)
        pos += 1
        if not b & 0x80:
            return value, pos
    raise ValueError("LEB128 integer too long")


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        b, value = value & 0x7F, value >> 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + _leb(len(payload)) + payload


def with_memory_export(wasm: bytes, name: str) -> bytes:
    """wasm with memory 0 exported as name when the module defines a memory; otherwise (no memory, a component,
    bytes this walk cannot frame) wasm unchanged: Wasmtime compiles or refuses it as it is."""
    if not wasm.startswith(MODULE_PREAMBLE):
        return wasm
    try:
        sections: list[tuple[int, int, int]] = []  # (id, payload start, payload end)
        pos = len(MODULE_PREAMBLE)
        while pos < len(wasm):
            size, start = _uleb(wasm, pos + 1)
            if start + size > len(wasm):
                return wasm
            sections.append((wasm[pos], start, start + size))
            pos = start + size
        memory = next(((s, e) for i, s, e in sections if i == _MEMORY), None)
        if memory is None or _uleb(wasm, memory[0])[0] == 0:
            return wasm
        encoded = name.encode()
        entry = _leb(len(encoded)) + encoded + bytes([_EXPORT_KIND_MEMORY]) + _leb(0)
        out, placed = bytearray(MODULE_PREAMBLE), False
        for section_id, start, end in sections:
            if section_id == _EXPORT:
                count, body = _uleb(wasm, start)
                out += _section(_EXPORT, _leb(count + 1) + wasm[body:end] + entry)
                placed = True
                continue
            if not placed and section_id in _AFTER_EXPORT:
                out += _section(_EXPORT, _leb(1) + entry)
                placed = True
            out += _section(section_id, wasm[start:end])  # sizes re-encoded minimally; payloads unchanged
        if not placed:
            out += _section(_EXPORT, _leb(1) + entry)
        return bytes(out)
    except ValueError:
        return wasm
