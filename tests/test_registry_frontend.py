"""`wasmlog registry serve --workers N`: publishes checked and stored by front-end processes,
state and log kept by the one registry process; everything else proxied to it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from helpers import free_port, front_end_pids, wait_front_ends_gone, wait_ready
from registry_helpers import CYCLONEDX, wat_module, with_custom_section

from registry.client import RegistryClient, RegistryError, release_statement
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, decode_entry, parse_package_ref
from tlog.hashes import leaf_hash
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

KEY = Ed25519Signer.generate("registry.example/frontlog")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")


async def test_front_ends_publish_and_refuse_like_one_process(tmp_path) -> None:
    key = tmp_path / "reg.key"
    key.write_text(KEY.private_key + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "registry", "registry", "serve", "--data", str(data), "--key", str(key),
         "--listen", f"127.0.0.1:{port}", "--interval-ms", "5", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await wait_ready(session, url + "/log", proc)
            assert len(front_end_pids(port)) == 2
            api = RegistryClient(url, session)
            module = wat_module("imports_all_kinds", tmp_path)
            ref = parse_package_ref("acme:hello@1.0.0")
            proof = await api.publish(ALICE, ref, module, CYCLONEDX, "application/vnd.cyclonedx+json")
            tp = parse_tlog_proof(proof)
            assert tp.extra is not None
            verify_tlog_proof(tp, leaf_hash(tp.extra), VERIFIER)
            assert decode_entry(tp.extra).signer == ALICE.vkey
            path = api.package_path(ref)
            assert await api.get(path + "/module.wasm") == module  # blobs a front-end wrote, served by the registry
            assert await api.get(path + "/sbom") == CYCLONEDX
            assert parse_tlog_proof(await api.publish(ALICE, ref, module, CYCLONEDX, "application/vnd.cyclonedx+json")).index == tp.index

            blob_dir = data / "blobs" / "sha256"
            other = wat_module("many_funcs", tmp_path)
            with pytest.raises(RegistryError) as conflict:  # same version, other bytes
                await api.publish(ALICE, ref, other)
            assert conflict.value.status == 409 and "already published" in str(conflict.value)
            with pytest.raises(RegistryError) as refused:  # Bob holds no key in acme
                await api.publish_signed(BOB.vkey, sign_envelope(
                    INTOTO_PAYLOAD_TYPE, release_statement(parse_package_ref("acme:hello@2.0.0"), other, None, None).statement(), BOB,
                ).to_json(), other)
            assert refused.value.status == 403
            assert not (blob_dir / hashlib.sha256(other).hexdigest()).exists()  # refused before any blob was written
            forged = sign_envelope(INTOTO_PAYLOAD_TYPE, release_statement(ref, module, None, None).statement(), BOB).to_json()
            with pytest.raises(RegistryError) as bad_sig:  # Alice's key named, Bob's signature
                await api.publish_signed(ALICE.vkey, forged, module)
            assert bad_sig.value.status == 403
            with pytest.raises(RegistryError) as mismatch:  # the statement names another module
                await api.publish_signed(ALICE.vkey, sign_envelope(
                    INTOTO_PAYLOAD_TYPE, release_statement(parse_package_ref("acme:hello@3.0.0"), module, None, None).statement(), ALICE,
                ).to_json(), other)
            assert mismatch.value.status == 422
            await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=int(time.time())))  # proxied
            await api.publish(BOB, parse_package_ref("acme:hello@2.0.0"), other)
            assert (await api.get_json("/api/v1/packages/acme/hello"))["versions"] == ["1.0.0", "2.0.0"]
            big = with_custom_section(module, 3 << 20)  # over the front-ends' PROXY_BUFFER: streamed through
            await api.publish(ALICE, parse_package_ref("acme:big@1.0.0"), big)
            assert await api.get("/api/v1/packages/acme/big/1.0.0/module.wasm") == big
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not wait_front_ends_gone(port)
    assert not [n for n in os.listdir(data / "blobs" / "sha256") if n.startswith(".tmp-")]
