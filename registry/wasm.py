"""A strict, bounded WebAssembly binary reader: preamble, sections, imports and exports. Pure.

It checks the framing of core modules and components (preamble, section ids
and order, sizes, LEB128 bounds, UTF-8 names). Of a core module it decodes the
type, import, function and export sections completely and validates them as
wasm-tools does (type indices, limits, unique export names, index bounds), and
frames the code section (one body per function, each with its locals and a
final ``end``); it does not type-check instructions (that is a runtime's job).
Subtype declarations (GC) are refused: checking their matching is not done here.
Of a component it frames the sections and decodes the import section's shape
(names and kinds); it does not validate component names or type indices.
Core imports are ``module.name`` with a kind; component imports are their
names (e.g. ``wasi:http/types@0.2.0``) with the module part empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from tlog.errors import MalformedError, TooLargeError

MAX_MODULE_BYTES = 64 << 20
MAX_IMPORTS = 100_000
# wasm-tools' (wasmparser's) validation limits that apply to what we read
MAX_NAME_BYTES = 100_000
MAX_TYPES = 1_000_000
MAX_FUNCTIONS = 1_000_000
MAX_EXPORTS = 1_000_000
MAX_PARAMS = MAX_RESULTS = 1000
MAX_STRUCT_FIELDS = 10_000
MAX_MEMORIES = 100
MAX_LOCALS = 50_000
MAX_MEMORY32_PAGES = 1 << 16
MAX_MEMORY64_PAGES = 1 << 48
MAGIC = b"\x00asm"
CORE_VERSION = b"\x01\x00\x00\x00"
COMPONENT_VERSION = b"\x0d\x00\x01\x00"

# Core section ids in their required order (tag 13 sits between memory and global; datacount before code).
_CORE_ORDER = {section_id: order for order, section_id in enumerate([1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11])}
_CORE_TYPE, _CORE_IMPORT, _CORE_FUNCTION, _CORE_EXPORT, _CORE_CODE = 1, 2, 3, 7, 10
# Sections of which only the count is read (for export index bounds): table, memory, tag, global.
_COUNTED = {4: 1, 5: 2, 13: 4, 6: 3}  # section id -> external kind
_COMPONENT_IMPORT, _COMPONENT_EXPORT = 10, 11
_COMPONENT_SECTIONS = set(range(12))

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
        if end - start > MAX_NAME_BYTES:
            raise WasmError(f"name over {MAX_NAME_BYTES} bytes")
        self.pos = end
        try:
            return self.data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise WasmError("name is not valid UTF-8") from None

    def done(self) -> bool:
        return self.pos == self.end


def _limits(r: _Reader, memory: bool) -> None:
    """Table or memory limits as wasm-tools validates them (no custom page sizes: a proposal it
    does not enable by default)."""
    flags = r.byte()
    allowed = 0x07 if memory else 0x05  # memory: max, shared, 64-bit / table: max, 64-bit
    if flags & ~allowed:
        raise WasmError(f"bad limits flags 0x{flags:02x}")
    bits = 64 if flags & 0x04 else 32
    minimum = r.uleb(bits)
    maximum = r.uleb(bits) if flags & 0x01 else None
    if maximum is not None and minimum > maximum:
        raise WasmError("limits minimum is greater than the maximum")
    if memory:
        pages = MAX_MEMORY64_PAGES if flags & 0x04 else MAX_MEMORY32_PAGES
        if minimum > pages or (maximum or 0) > pages:
            raise WasmError(f"memory size is over {pages} pages")
        if flags & 0x02 and maximum is None:
            raise WasmError("a shared memory needs a maximum size")


def _heaptype(r: _Reader, types: int) -> None:
    """An abstract heap type (one byte) or a type index below types."""
    if r.pos < r.end and 0x69 <= r.data[r.pos] <= 0x74:
        r.pos += 1
        return
    ht = r.sleb33()
    if ht < 0:
        raise WasmError("bad heap type")
    if ht >= types:
        raise WasmError(f"unknown type {ht}")


def _reftype(r: _Reader, types: int) -> None:
    t = r.byte()
    if t in (0x63, 0x64):  # (ref null? ht)
        _heaptype(r, types)
    elif not 0x69 <= t <= 0x74:  # abstract heap type shorthands: exn, array, struct, i31, eq, any, extern, func, none...
        raise WasmError(f"bad reference type 0x{t:02x}")


def _valtype(r: _Reader, types: int) -> None:
    """A value type; a concrete reference must name a type below types."""
    t = r.data[r.pos] if r.pos < r.end else -1
    if t in (0x7F, 0x7E, 0x7D, 0x7C, 0x7B):
        r.pos += 1
    else:
        _reftype(r, types)


# What imports, functions and bodies need of a type: for a function type, its parameter count
# shifted left once, with bit 0 set when it has results; _NOT_FUNC for a struct or array type.
_NOT_FUNC = -1


def _func_sig(params: int, results: int) -> int:
    return params << 1 | (results > 0)


def _fieldtype(r: _Reader, types: int) -> None:
    t = r.data[r.pos] if r.pos < r.end else -1
    if t in (0x78, 0x77):  # packed i8, i16
        r.pos += 1
    else:
        _valtype(r, types)
    if r.byte() > 1:
        raise WasmError("bad field mutability")


_NUMERIC_TYPES = b"\x7b\x7c\x7d\x7e\x7f"  # v128, f64, f32, i64, i32


def _numeric_func_types(r: _Reader) -> list[int] | None:
    """The common type section, read without a general decoder: fewer than 128 function types
    whose parameters and results are fewer than 128 numeric types each. None for anything else
    (the general reader then decides); r is only advanced on success."""
    data, pos, end = r.data, r.pos, r.end
    if pos >= end or data[pos] >= 0x80:
        return None
    kinds = []
    pos += 1
    for _ in range(data[pos - 1]):
        if pos + 2 >= end or data[pos] != 0x60 or data[pos + 1] >= 0x80:
            return None
        params = data[pos + 1]
        params_end = pos + 2 + params
        if params_end >= end or data[params_end] >= 0x80 or data[pos + 2 : params_end].strip(_NUMERIC_TYPES):
            return None
        results = data[params_end]
        pos = params_end + 1 + results
        if pos > end or data[params_end + 1 : pos].strip(_NUMERIC_TYPES):
            return None
        kinds.append(params << 1 | (results > 0))
    r.pos = pos
    return kinds


def _core_types(r: _Reader) -> list[int]:
    """The type section: each type as _func_sig or _NOT_FUNC."""
    numeric = _numeric_func_types(r)
    if numeric is not None:
        return numeric
    kinds: list[int] = []
    for _ in range(r.uleb()):
        group = 1
        if r.pos < r.end and r.data[r.pos] == 0x4E:  # a recursion group
            r.pos += 1
            group = r.uleb()
        bound = len(kinds) + group  # a type refers to earlier types and to those of its own group
        if bound > MAX_TYPES:
            raise WasmError(f"more than {MAX_TYPES} types")
        for _ in range(group):
            form = r.byte()
            if form in (0x50, 0x4F):  # (sub final? supertypes comptype)
                if r.uleb():
                    raise WasmError("subtype declarations are not supported")
                form = r.byte()
            if form == 0x60:
                params = r.uleb()
                if params > MAX_PARAMS:
                    raise WasmError(f"more than {MAX_PARAMS} parameters")
                for _ in range(params):
                    _valtype(r, bound)
                results = r.uleb()
                if results > MAX_RESULTS:
                    raise WasmError(f"more than {MAX_RESULTS} results")
                for _ in range(results):
                    _valtype(r, bound)
                kinds.append(_func_sig(params, results))
            elif form == 0x5F:  # struct
                fields = r.uleb()
                if fields > MAX_STRUCT_FIELDS:
                    raise WasmError(f"more than {MAX_STRUCT_FIELDS} struct fields")
                for _ in range(fields):
                    _fieldtype(r, bound)
                kinds.append(_NOT_FUNC)
            elif form == 0x5E:  # array
                _fieldtype(r, bound)
                kinds.append(_NOT_FUNC)
            else:
                raise WasmError(f"bad type form 0x{form:02x}")
    return kinds


def _func_type(r: _Reader, types: list[int]) -> int:
    """A type index that names a function type; returns its _func_sig."""
    i = r.uleb()
    if i >= len(types):
        raise WasmError(f"unknown type {i}")
    if types[i] < 0:
        raise WasmError(f"type {i} is not a function type")
    return types[i]


def _core_import(r: _Reader, types: list[int]) -> Import:
    module, name = r.name(), r.name()
    kind = r.byte()
    if kind == 0x00:
        i = r.uleb()  # _func_type, inline: imports are the hot path
        if i >= len(types):
            raise WasmError(f"unknown type {i}")
        if types[i] < 0:
            raise WasmError(f"type {i} is not a function type")
    elif kind == 0x01:
        _reftype(r, len(types))
        _limits(r, memory=False)
    elif kind == 0x02:
        _limits(r, memory=True)
    elif kind == 0x03:
        _valtype(r, len(types))
        if r.byte() not in (0, 1):
            raise WasmError("bad global mutability")
    elif kind == 0x04:
        if r.byte() != 0:
            raise WasmError("bad tag attribute")
        if _func_type(r, types) & 1:
            raise WasmError("a tag's type has results")
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


def _core_exports(r: _Reader, spaces: list[int]) -> list[str]:
    """Export names, unique, each naming an existing function, table, memory, global or tag."""
    n = r.uleb()
    if n > MAX_EXPORTS:
        raise WasmError(f"more than {MAX_EXPORTS} exports")
    out = []
    for _ in range(n):
        name = r.name()
        kind = r.byte()
        if kind > 0x04:
            raise WasmError("bad export kind")
        if r.uleb() >= spaces[kind]:
            raise WasmError(f"export {name[:60]!r} names an unknown {IMPORT_KINDS[kind]}")
        out.append(name)
    if len(set(out)) != len(out):
        raise WasmError("duplicate export name")
    return out


def _code(r: _Reader, types: int, functions: list[int]) -> None:
    """Frame the code section: one body per function (functions: their _func_sig), each with its
    size, locals (with the parameters, at most MAX_LOCALS) and final end."""
    n = r.uleb()
    if n != len(functions):
        raise WasmError(f"{len(functions)} functions but {n} bodies in the code section")
    for sig in functions:
        size = r.uleb()
        end = r.pos + size
        if end > r.end:
            raise WasmError("function body runs past the code section")
        body = _Reader(r.data, r.pos, end)
        locals_ = sig >> 1
        for _ in range(body.uleb()):
            locals_ += body.uleb()
            if locals_ > MAX_LOCALS:
                raise WasmError(f"more than {MAX_LOCALS} locals")
            _valtype(body, types)
        if body.pos >= end or r.data[end - 1] != 0x0B:
            raise WasmError("function body does not end with end")
        r.pos = end


def _sections(data: bytes, custom: list[str]) -> Iterator[tuple[int, int, int]]:
    """(id, start, end) of each section after the preamble; custom sections' names go to custom."""
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
        else:
            yield section_id, start, end


def _read_core(data: bytes, imports: list[Import], exports: list[str], custom: list[str]) -> None:
    """Read a core module's sections after the preamble into imports, exports and custom."""
    types: list[int] = []
    spaces = [0, 0, 0, 0, 0]  # functions, tables, memories, globals, tags (imported and defined)
    functions: list[int] = []  # the function section: each function's _func_sig
    bodies = False  # whether there is a code section
    last_order = -1
    for section_id, start, end in _sections(data, custom):
        order = _CORE_ORDER.get(section_id)
        if order is None:
            raise WasmError(f"bad section id {section_id}")
        if order <= last_order:
            raise WasmError(f"section {section_id} out of order or repeated")
        last_order = order
        body = _Reader(data, start, end)
        if section_id == _CORE_IMPORT:
            for _ in range(body.uleb()):
                imp = _core_import(body, types)
                imports.append(imp)
                spaces[_KIND_INDEX[imp.kind]] += 1
                if len(imports) > MAX_IMPORTS:
                    raise TooLargeError("too many imports")
            if spaces[2] > MAX_MEMORIES:
                raise WasmError(f"more than {MAX_MEMORIES} memories")
        elif section_id == _CORE_TYPE:
            types = _core_types(body)
        elif section_id == _CORE_FUNCTION:
            count = body.uleb()
            if spaces[0] + count > MAX_FUNCTIONS:  # checked first: the list below is bounded
                raise WasmError(f"more than {MAX_FUNCTIONS} functions")
            functions = [_func_type(body, types) for _ in range(count)]
            spaces[0] += count
        elif section_id == _CORE_EXPORT:
            exports[:] = _core_exports(body, spaces)
        elif section_id == _CORE_CODE:
            _code(body, len(types), functions)
            bodies = True
        elif section_id in _COUNTED:
            spaces[_COUNTED[section_id]] += body.uleb()  # the rest of these sections is framed, not decoded
            continue
        else:
            continue
        if body.pos != body.end:
            raise WasmError(f"trailing bytes in section {section_id}")
    if functions and not bodies:
        raise WasmError(f"{len(functions)} functions but no code section")


_KIND_INDEX = {kind: i for i, kind in IMPORT_KINDS.items()}


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
    if not component:
        _read_core(data, imports, exports, custom)
        return WasmInfo(component, tuple(imports), tuple(exports), tuple(custom))
    for section_id, start, end in _sections(data, custom):
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
        # other component sections are framed, not decoded
    return WasmInfo(component, tuple(imports), tuple(exports), tuple(custom))
