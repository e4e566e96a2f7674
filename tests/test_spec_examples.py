"""The worked examples in spec/ are reproduced from scratch, byte for byte."""

from __future__ import annotations

import pathlib
import re

from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import PackageRef, Release, decode_entry, module_digest, record_for
from registry.wasm import parse_wasm
from tlog.hashes import leaf_hash
from tlog.note import parse_private_key

SPEC = pathlib.Path(__file__).resolve().parent.parent / "spec" / "registry.md"


def test_registry_worked_example() -> None:
    text = SPEC.read_text()
    hex_block = re.search(r"```hex\n(.*?)```", text, re.DOTALL)
    assert hex_block
    entry = bytes.fromhex(hex_block[1].replace("\n", ""))
    key = parse_private_key(re.search(r"`(PRIVATE\+KEY\+[^`]+)`", text)[1])  # type: ignore[index]
    module = bytes.fromhex(re.search(r"27 bytes:\n`([0-9a-f]+)`", text)[1])  # type: ignore[index]
    release = Release(PackageRef("acme", "hello", "1.0.0"), module_digest(module), parse_wasm(module).imports)
    built = record_for("release", key.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), key)).encode()
    assert built == entry
    record = decode_entry(entry)
    assert record.envelope.verified_by(record.signer_verifier)
    assert module_digest(module) in text and key.vkey in text
    assert leaf_hash(entry).hex() in text
    assert f"this {len(entry)}-byte entry" in text
