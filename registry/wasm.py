"""A strict, bounded WebAssembly binary reader: preamble, sections, imports and exports. Pure.

It checks the framing of core modules and components (preamble, section ids
and order, sizes, LEB128 bounds, UTF-8 names) and decodes the import and export
sections completely; it does not type-check code (that is a runtime's job).
Core imports are ``module.name`` with a kind; component imports are their
names (e.g. ``wasi:http/types@0.2.0``) with the module part empty.
"""

from __future__ import annotations

from typing import NamedTuple

from tlog.errors import MalformedError, TooLargeError

MAX_MODULE_BYTES = 64 << 20
MAX_IMPORTS = 100_000
MAGIC = b"\x00asm"
CORE_VERSION = b"\x01\x00\x00\x00"
COMPONENT_VERSION = b"\x0d\x00\x01\x00"

# Core section ids in their required order (tag 13 sits between memory and global; datacount before code).
_CORE_ORDER = {section_id: order for order, section_id in enumerate([1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11])}
_CORE_IMPORT, _CORE_EXPORT = 2, 7
_COMPONENT_IMPORT, _COMPONENT_EXPORT = 10, 11
_COMPONENT_SECTIONS = set(range(0, 12))

IMPORT_KINDS = {0x00: "func", 0x01: "table", 0x02: "memory", 0x03: "global", 0x04: "tag"}
COMPONENT_KINDS = {0x00: "module", 0x01: "func", 0x02: "value", 0x03: "type", 0x04: "component", 0x05: "instance"}


class WasmError(MalformedError):
    """Not a well-formed WebAssembly binary."""


class Import(NamedTuple):
    """One import: a NamedTuple (immutable, ordered, cheap to build: verifiers parse them twice)."""

    module: str  # "" for component imports
    name: str
    kind: str

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


class WasmInfo(NamedTuple):
    component: bool
    imports: tuple[Import, ...]
    exports: tuple[str, ...]
    custom_sections: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise WasmError("unexpected end of section")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def bytes(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise WasmError("unexpected end of section")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uleb(self, bits: int = 32) -> int:
        """Unsigned LEB128 of at most ceil(bits/7) bytes whose value fits in bits (unused bits zero)."""
        pos = self.pos
        if pos < self.end and self.data[pos] < 0x80:  # one byte: the common case
            self.pos = pos + 1
            return self.data[pos]
        result, shift = 0, 0
        for _ in range((bits + 6) // 7):
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if result >> bits:
                    raise WasmError("LEB128 integer too large")
                return result
        raise WasmError("LEB128 integer too long")

    def sleb33(self) -> int:
        result, shift = 0, 0
        for i in range(5):
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if i == 4 and b & 0x70 not in (0, 0x70):
                    raise WasmError("s33 integer too large")
                return result - (1 << shift) if b & 0x40 else result
        raise WasmError("s33 integer too long")

    def name(self) -> str:
        pos = self.pos
        if pos < self.end and self.data[pos] < 0x80:  # a one-byte length: the common case
            start, end = pos + 1, pos + 1 + self.data[pos]
        else:
            n = self.uleb()
            start, end = self.pos, self.pos + n
        if end > self.end:
            raise WasmError("unexpected end of section")
        self.pos = end
        try:
            return self.data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise WasmError("name is not valid UTF-8") from None

    def done(self) -> bool:
        return self.pos == self.end


def _limits(r: _Reader, memory: bool) -> None:
    flags = r.byte()
    allowed = 0x0F if memory else 0x05  # max, shared, 64-bit, custom page size / table: max, 64-bit
    if flags & ~allowed:
        raise WasmError(f"bad limits flags 0x{flags:02x}")
    bits = 64 if flags & 0x04 else 32
    r.uleb(bits)
    if flags & 0x01:
        r.uleb(bits)
    if memory and flags & 0x08:
        r.uleb()


def _heaptype(r: _Reader) -> None:
    r.sleb33()


def _reftype(r: _Reader) -> None:
    t = r.byte()
    if t in (0x63, 0x64):  # (ref null? ht)
        _heaptype(r)
    elif not 0x69 <= t <= 0x74:  # abstract heap type shorthands: func, extern, any, eq, i31, struct, array, none...
        raise WasmError(f"bad reference type 0x{t:02x}")


def _valtype(r: _Reader) -> None:
    t = r.data[r.pos] if r.pos < r.end else -1
    if t in (0x7F, 0x7E, 0x7D, 0x7C, 0x7B):
        r.byte()
    else:
        _reftype(r)


def _core_import(r: _Reader) -> Import:
    module, name = r.name(), r.name()
    kind = r.byte()
    if kind == 0x00:
        r.uleb()
    elif kind == 0x01:
        _reftype(r)
        _limits(r, memory=False)
    elif kind == 0x02:
        _limits(r, memory=True)
    elif kind == 0x03:
        _valtype(r)
        if r.byte() not in (0, 1):
            raise WasmError("bad global mutability")
    elif kind == 0x04:
        if r.byte() != 0:
            raise WasmError("bad tag attribute")
        r.uleb()
    else:
        raise WasmError(f"bad import kind 0x{kind:02x}")
    return Import(module, name, IMPORT_KINDS[kind])


def _component_valtype(r: _Reader) -> None:
    t = r.data[r.pos] if r.pos < r.end else -1
    if 0x64 <= t <= 0x7F:
        r.byte()  # a primitive value type
    else:
        r.uleb()  # a type index


def _component_import(r: _Reader) -> Import:
    if r.byte() not in (0x00, 0x01):
        raise WasmError("bad component import name")
    name = r.name()
    kind = r.byte()
    if kind == 0x00:
        if r.byte() != 0x11:
            raise WasmError("bad core module import")
        r.uleb()
    elif kind in (0x01, 0x04, 0x05):
        r.uleb()
    elif kind == 0x02:
        b = r.byte()
        if b == 0x00:
            r.uleb()
        elif b == 0x01:
            _component_valtype(r)
        else:
            raise WasmError("bad value bound")
    elif kind == 0x03:
        b = r.byte()
        if b == 0x00:
            r.uleb()
        elif b != 0x01:
            raise WasmError("bad type bound")
    else:
        raise WasmError(f"bad component import kind 0x{kind:02x}")
    return Import("", name, COMPONENT_KINDS[kind])


def _core_exports(r: _Reader) -> list[str]:
    out = []
    for _ in range(r.uleb()):
        name = r.name()
        if r.byte() > 0x04:
            raise WasmError("bad export kind")
        r.uleb()
        out.append(name)
    return out


def parse_wasm(data: bytes) -> WasmInfo:
    """Read a core module or component. Raises WasmError (a MalformedError) or TooLargeError."""
    if len(data) > MAX_MODULE_BYTES:
        raise TooLargeError(f"module of {len(data)} bytes is over {MAX_MODULE_BYTES}")
    if len(data) < 8 or data[:4] != MAGIC:
        raise WasmError("not a WebAssembly binary (bad magic)")
    if data[4:8] == CORE_VERSION:
        component = False
    elif data[4:8] == COMPONENT_VERSION:
        component = True
    else:
        raise WasmError("unsupported WebAssembly version or layer")
    imports: list[Import] = []
    exports: list[str] = []
    custom: list[str] = []
    last_order = -1
    pos, length = 8, len(data)
    while pos < length:
        section_id = data[pos]
        if pos + 1 < length and data[pos + 1] < 0x80:  # a one-byte size: read inline (the common case)
            size, start = data[pos + 1], pos + 2
        else:
            r = _Reader(data, pos + 1)
            size = r.uleb()
            start = r.pos
        pos = end = start + size
        if end > length:
            raise WasmError("section runs past the end of the binary")
        if section_id == 0:
            custom.append(_Reader(data, start, end).name())
            continue
        if component:
            if section_id not in _COMPONENT_SECTIONS:
                raise WasmError(f"bad component section id {section_id}")
            if section_id == _COMPONENT_IMPORT:
                body = _Reader(data, start, end)
                for _ in range(body.uleb()):
                    imports.append(_component_import(body))
                    if len(imports) > MAX_IMPORTS:
                        raise TooLargeError("too many imports")
                if not body.done():
                    raise WasmError("trailing bytes in import section")
            continue  # other component sections are framed, not decoded
        order = _CORE_ORDER.get(section_id)
        if order is None:
            raise WasmError(f"bad section id {section_id}")
        if order <= last_order:
            raise WasmError(f"section {section_id} out of order or repeated")
        last_order = order
        if section_id == _CORE_IMPORT:
            body = _Reader(data, start, end)
            for _ in range(body.uleb()):
                imports.append(_core_import(body))
                if len(imports) > MAX_IMPORTS:
                    raise TooLargeError("too many imports")
        elif section_id == _CORE_EXPORT:
            body = _Reader(data, start, end)
            exports = _core_exports(body)
        else:
            continue
        if not body.done():
            raise WasmError(f"trailing bytes in section {section_id}")
    return WasmInfo(component, tuple(imports), tuple(exports), tuple(custom))
