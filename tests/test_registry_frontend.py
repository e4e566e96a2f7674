"""`wasmlog registry serve --workers N`: publishes checked and stored by front-end processes,
state and log kept by the one registry process; everything else proxied to it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import aiohttp
import cbor2
import pytest
from helpers import free_port, front_end_pids, wait_front_ends_gone, wait_ready
from registry_helpers import (
    CYCLONEDX,
    NOT_WASM,
    big_cyclonedx,
    release_envelope,
    wat_module,
    with_custom_section,
)

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


def serve_with_two_front_ends(tmp_path: pathlib.Path, data: pathlib.Path, port: int) -> subprocess.Popen[bytes]:
    """`wasmlog registry serve --workers 2` on 127.0.0.1:port, its data in data."""
    key = tmp_path / "reg.key"
    key.write_text(KEY.private_key + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "wasmlog", "registry", "serve", "--data", str(data), "--key", str(key),
         "--listen", f"127.0.0.1:{port}", "--interval-ms", "5", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


async def test_front_ends_publish_and_refuse_like_one_process(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    proc = serve_with_two_front_ends(tmp_path, data, port)
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


def process_args(pid: int) -> list[bytes]:
    """The command line of a live process (Linux /proc); [] once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def sbom_validator_pids(parents: list[int]) -> list[int]:
    """SBOM validator processes (registry/sbom_pool.py) whose parent is one of parents."""
    pids = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in parents and b"registry.sbom_pool" in process_args(pid):
            pids.append(pid)
    return pids


def wait_validators_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    """Wait until none of these SBOM validators runs; return those still running after seconds."""
    deadline = time.monotonic() + seconds
    while (left := [pid for pid in pids if b"registry.sbom_pool" in process_args(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


async def test_front_ends_refuse_unauthorized_publishes_before_any_costly_check(tmp_path) -> None:
    """Forged and ungranted publishes are refused before the module is parsed and before any SBOM
    validator runs (none is even started); a tag bomb is a 400 and the server keeps answering."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    proc = serve_with_two_front_ends(tmp_path, data, port)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await wait_ready(session, url + "/log", proc)
            front_ends = front_end_pids(port)
            assert len(front_ends) == 2
            api = RegistryClient(url, session)
            await api.claim_if_unclaimed(ALICE, "acme")
            ref = parse_package_ref("acme:hello@1.0.0")
            sbom = big_cyclonedx()
            for signer, env in ((ALICE.vkey, release_envelope(BOB, ref, NOT_WASM, sbom)),  # forged: Bob's signature
                                (BOB.vkey, release_envelope(BOB, ref, NOT_WASM, sbom))):  # Bob holds no key in acme
                for _ in range(4):  # the front-ends share the port: reach both
                    with pytest.raises(RegistryError) as refused:
                        await api.publish_signed(signer, env, NOT_WASM, sbom)
                    assert refused.value.status == 403, str(refused.value)  # the wasm parse or the SBOM limits would say 422
            # Refused from the signer and envelope: the module is sent only once the answer came.
            body = cbor2.dumps({"signer": BOB.vkey.encode(), "envelope": release_envelope(BOB, ref, NOT_WASM, sbom),
                                "module": NOT_WASM, "sbom": sbom})
            start = body.index(NOT_WASM)
            answered = asyncio.Event()

            async def stream():  # type: ignore[no-untyped-def]
                yield body[:start]
                await answered.wait()
                yield body[start:]

            r = await asyncio.wait_for(session.post(url + "/api/v1/publish", data=stream(), headers={"Content-Type": "application/cbor"}), 60)
            answered.set()
            assert r.status == 403
            r.close()
            module = wat_module("imports_all_kinds", tmp_path)
            with pytest.raises(RegistryError) as over:
                await api.publish_signed(ALICE.vkey, release_envelope(ALICE, ref, module, sbom), module, sbom)
            assert over.value.status == 422 and "components (the limit)" in str(over.value)
            bomb = cbor2.dumps(cbor2.CBORTag(36, "x" * 2_400_000))
            async with session.post(url + "/api/v1/publish", data=bomb, headers={"Content-Type": "application/cbor"}) as r:
                assert r.status == 400
            async with session.get(url + "/log/checkpoint") as r:
                assert r.status == 200
            assert sbom_validator_pids(front_ends) == []
            assert not (data / "blobs" / "sha256" / hashlib.sha256(sbom).hexdigest()).exists()

            signed = release_envelope(ALICE, ref, module, CYCLONEDX)
            await api.publish_signed(ALICE.vkey, signed, module, CYCLONEDX)
            validators = sbom_validator_pids(front_ends)
            assert len(validators) == 1  # a validator does start for an authorized publish
            for _ in range(4):  # replays of the logged release (on either front-end) start no other validator
                await api.publish_signed(ALICE.vkey, signed, module, CYCLONEDX)
            assert sbom_validator_pids(front_ends) == validators
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not wait_front_ends_gone(port)
    assert not wait_validators_gone(validators)  # stopped with their front-end
