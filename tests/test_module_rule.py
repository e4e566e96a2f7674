"""registry.record.check_module: the one module-checking rule of publish, edge verification, audit and mirror."""

from __future__ import annotations

import pytest

from registry.record import (
    ImportsMismatch,
    ModuleDigestMismatch,
    PackageRef,
    Release,
    check_module,
    check_module_digest,
    module_digest,
)
from registry.wasm import Import, WasmError

# (import "env" "log" (func)), and the same module without its import
MODULE = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")
EMPTY = bytes.fromhex("0061736d01000000")
REF = PackageRef("acme", "hello", "1.0.0")
IMPORTS = (Import("env", "log", "func"),)


def test_the_released_module_passes_and_is_read_once() -> None:
    info = check_module(Release(REF, module_digest(MODULE), IMPORTS), MODULE)
    assert info.imports == IMPORTS and not info.component
    assert check_module_digest(Release(REF, module_digest(MODULE), ()), MODULE) == module_digest(MODULE)


def test_each_mismatch_is_named() -> None:
    with pytest.raises(ModuleDigestMismatch):
        check_module(Release(REF, module_digest(EMPTY), IMPORTS), MODULE)
    with pytest.raises(ModuleDigestMismatch):
        check_module_digest(Release(REF, module_digest(EMPTY), IMPORTS), MODULE)
    with pytest.raises(ImportsMismatch):
        check_module(Release(REF, module_digest(EMPTY), IMPORTS), EMPTY)  # the module imports nothing
    with pytest.raises(ImportsMismatch):
        check_module(Release(REF, module_digest(MODULE), ()), MODULE)
    not_wasm = b"\0asm\x02\0\0\0"
    with pytest.raises(WasmError):
        check_module(Release(REF, module_digest(not_wasm), ()), not_wasm)
