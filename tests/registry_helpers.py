"""Builders for registry tests: a real registry app on loopback and real modules."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

from registry.blobs import BlobStore
from registry.client import RegistryClient
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import PackageRef, Release, module_digest
from registry.server import make_app
from registry.service import Registry
from registry.wasm import WasmError, parse_wasm
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore

WASM_TOOLS = shutil.which("wasm-tools") or str(pathlib.Path(sys.executable).parent / "wasm-tools")
CORPUS = pathlib.Path(__file__).parent / "wasm"
REGISTRY_KEY = Ed25519Signer.generate("registry.example/log")

CYCLONEDX = b"""{"bomFormat":"CycloneDX","specVersion":"1.5","version":1,
"metadata":{"component":{"type":"application","name":"hello","version":"1.0.0"}},
"components":[{"type":"library","name":"serde","version":"1.0.200","purl":"pkg:cargo/serde@1.0.200"}]}"""
NOT_WASM = b"\x00asm\x01\x00\x00\x00\x01\xff\xff\xff\xff\x0f"  # a type section that claims 4 GiB


def big_cyclonedx(components: int = 4000) -> bytes:
    """A CycloneDX SBOM with this many components, each depending on the next (4,000: 30 s of validation without limits)."""
    return json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
                       "components": [{"type": "library", "name": f"c{i}", "version": "1.0.0", "bom-ref": f"r{i}"} for i in range(components)],
                       "dependencies": [{"ref": f"r{i}", "dependsOn": [f"r{(i + 1) % components}"]} for i in range(components)]}).encode()


def release_envelope(signer: Ed25519Signer, ref: PackageRef, module: bytes, sbom: bytes | None,
                     media_type: str = "application/vnd.cyclonedx+json") -> bytes:
    """The DSSE envelope of a release of module (and sbom) signed by signer; a module that is not wasm gets no imports."""
    try:
        imports = parse_wasm(module).imports
    except WasmError:
        imports = ()
    release = Release(ref, module_digest(module), imports, None if sbom is None else module_digest(sbom), None if sbom is None else media_type)
    return sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer).to_json()


def wat_module(name: str, tmp: pathlib.Path) -> bytes:
    out = tmp / f"{name}.wasm"
    subprocess.run([WASM_TOOLS, "parse", str(CORPUS / f"{name}.wat"), "-o", str(out)], check=True)
    return out.read_bytes()


def with_custom_section(module: bytes, size: int, *, random: bool = False) -> bytes:
    """module with a custom section of size zero (or random) bytes appended (a valid, larger module)."""
    payload = b"\x04blob" + (os.urandom(size) if random else bytes(size))
    n, leb = len(payload), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        leb.append(byte | (0x80 if n else 0))
        if not n:
            break
    return module + b"\x00" + bytes(leb) + payload


def build_registry(tmp: pathlib.Path) -> tuple[Registry, Sequencer, LMDBLogStore]:
    store = LMDBLogStore(str(tmp / "log"))
    seq = Sequencer(Log(store, REGISTRY_KEY), interval=0.005)
    return Registry(sequencer=seq, blobs=BlobStore(str(tmp / "blobs"))), seq, store


async def start_registry(aiohttp_client, tmp: pathlib.Path):  # type: ignore[no-untyped-def]
    registry, seq, store = build_registry(tmp)
    client = await aiohttp_client(make_app(registry, seq))
    return RegistryClient(str(client.make_url("")), client.session), client, registry, store
