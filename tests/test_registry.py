"""The registry over real HTTP: publish, fetch, authorization, immutability, validation, replay."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time

import aiohttp
import pytest
from registry_helpers import CYCLONEDX, REGISTRY_KEY, build_registry, start_registry, wat_module

from registry.client import RegistryError, release_statement
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, Release, decode_entry, parse_package_ref
from registry.wasm import Import
from tlog.checkpoint import parse_checkpoint
from tlog.hashes import leaf_hash
from tlog.merkle import verify_consistency
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

REG_VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
REF = parse_package_ref("acme:hello@1.0.0")


def check_proof(proof: bytes) -> tuple[int, bytes]:
    tp = parse_tlog_proof(proof)
    assert tp.extra is not None
    verify_tlog_proof(tp, leaf_hash(tp.extra), REG_VERIFIER)
    return tp.index, tp.extra


async def test_publish_and_fetch_everything_back(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("imports_all_kinds", tmp_path)
    proof = await api.publish(ALICE, REF, module, CYCLONEDX, "application/vnd.cyclonedx+json")
    index, entry = check_proof(proof)
    record = decode_entry(entry)
    assert record.type == "release" and record.signer == ALICE.vkey
    assert isinstance(record.body, Release) and record.body.module_sha256 == hashlib.sha256(module).hexdigest()
    assert [i.qualified for i in record.body.imports][:2] == ["wasi_snapshot_preview1.fd_write", "env.memory"]
    path = api.package_path(REF)
    assert await api.get(path + "/module.wasm") == module
    assert await api.get(path + "/sbom") == CYCLONEDX
    meta = await api.get_json(path)
    assert meta["index"] == index and meta["signer"] == ALICE.vkey and meta["yanked_at"] is None
    statement = json.loads(await api.get(path + "/statement"))
    assert statement["payloadType"] == INTOTO_PAYLOAD_TYPE
    assert (await api.get_json("/api/v1/packages/acme/hello"))["versions"] == ["1.0.0"]
    fresh = await api.get(path + "/tlog-proof")
    assert check_proof(fresh) == (index, entry)
    with_old = await api.get_json(path + "/tlog-proof?old=1")
    tp = parse_tlog_proof(with_old["tlog_proof"].encode())
    cp = parse_checkpoint(open_note(tp.checkpoint, [REG_VERIFIER])[0].text)
    consistency = [base64.b64decode(h) for h in with_old["consistency_proof"]]
    root1 = leaf_hash((await (await client.get("/log/tile/entries/000.p/1")).read())[2:])
    verify_consistency(1, cp.size, consistency, root1, cp.root_hash)


async def test_second_key_refused_until_granted_and_after_revocation(aiohttp_client, tmp_path) -> None:
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, REF, module)
    with pytest.raises(RegistryError) as e:
        await api.publish(BOB, parse_package_ref("acme:hello@1.0.1"), module)
    assert e.value.status == 403
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=int(time.time())))
    await api.publish(BOB, parse_package_ref("acme:hello@1.0.1"), module)
    await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=int(time.time())))
    with pytest.raises(RegistryError) as e:
        await api.publish(BOB, parse_package_ref("acme:hello@1.0.2"), module)
    assert e.value.status == 403
    ns = await api.get_json("/api/v1/namespaces/acme")
    assert ns["keys"] == [ALICE.vkey] and BOB.vkey in ns["revoked"]
    with pytest.raises(RegistryError) as e:  # Bob cannot claim acme for himself either
        await api.act(BOB, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    assert e.value.status == 403


async def test_a_revoked_key_never_comes_back_under_another_name(aiohttp_client, tmp_path) -> None:
    """issue 12: a revoked key was granted again under a new name and its old envelopes replayed."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, REF, module)
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    later = parse_package_ref("acme:hello@1.0.2")
    old_envelope = sign_envelope(INTOTO_PAYLOAD_TYPE, release_statement(later, module, None, None).statement(), BOB).to_json()
    bob_again = Ed25519Signer("bob-again", BOB.seed)
    with pytest.raises(RegistryError) as e:  # one grant per public key
        await api.act(ALICE, Action("key-grant", "acme", key=bob_again.vkey, issued=2))
    assert e.value.status == 409
    revoked_at = parse_tlog_proof(await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=3))).index
    with pytest.raises(RegistryError) as e:
        await api.act(ALICE, Action("key-grant", "acme", key=bob_again.vkey, issued=4))
    assert e.value.status == 403 and "cannot be granted again under any name" in str(e.value)
    for signer in (BOB.vkey, bob_again.vkey):  # Bob's envelope signed before the revocation, under either name
        with pytest.raises(RegistryError) as e:
            await api.publish_signed(signer, old_envelope, module)
        assert e.value.status == 403 and f"revoked in acme at index {revoked_at}" in str(e.value)  # the logged revocation, by its index
    assert (await api.get_json("/api/v1/namespaces/acme"))["keys"] == [ALICE.vkey]


async def test_key_names_that_are_not_printable_ascii_are_422(aiohttp_client, tmp_path) -> None:
    """issue 12: a key name with a zero-width space printed as another name."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, REF, module)
    hidden = Ed25519Signer("b\u200bob", BOB.seed)
    with pytest.raises(RegistryError) as e:
        await api.act(ALICE, Action("key-grant", "acme", key=hidden.vkey, issued=1))
    assert e.value.status == 422 and "printable ASCII" in str(e.value)
    with pytest.raises(RegistryError) as e:
        await api.publish(Ed25519Signer("\u0430lice", ALICE.seed), parse_package_ref("acme:hello@1.0.1"), module)
    assert e.value.status == 422 and "printable ASCII" in str(e.value)


async def test_modules_with_garbage_in_the_type_or_code_section_are_422(aiohttp_client, tmp_path) -> None:
    """issue 12: the wasm reader accepted type and code sections that wasm-tools rejects."""
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    header = bytes.fromhex("0061736d01000000")
    garbage = {
        "bad value type": header + bytes.fromhex("010501600155 00".replace(" ", "")),
        "two functions, one body": header + bytes.fromhex("010401600000 0303020000 0a0401020 00b".replace(" ", "")),
        "body without end": header + bytes.fromhex("010401600000 03020100 0a0401020001".replace(" ", "")),
    }
    for why, module in garbage.items():
        r = await _raw_publish(client, ALICE, release_statement(REF, b"\0asm\x01\0\0\0", None, None)._replace(
            module_sha256=hashlib.sha256(module).hexdigest()), module)
        assert r.status == 422, (why, await r.text())


async def test_the_last_key_of_a_namespace_cannot_revoke_itself(aiohttp_client, tmp_path) -> None:
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, REF, module)
    with pytest.raises(RegistryError) as e:
        await api.act(ALICE, Action("key-revocation", "acme", key=ALICE.vkey, issued=1))
    assert e.value.status == 409 and "last key of acme" in str(e.value)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.1"), module)  # the namespace still lives


async def test_a_refusal_by_a_pending_record_names_no_index(aiohttp_client, tmp_path) -> None:
    """issue 12: "already yanked at index -1" when the first yank was not yet integrated."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, REF, wat_module("no_imports", tmp_path))
    yanks = [api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=i, reason="CVE")) for i in (1, 2)]
    results = await asyncio.gather(*yanks, return_exceptions=True)
    refused = [r for r in results if isinstance(r, RegistryError)]
    assert len(refused) == 1 and refused[0].status == 409
    assert "index -1" not in str(refused[0]) and "already yanked" in str(refused[0])


async def test_versions_are_immutable(aiohttp_client, tmp_path) -> None:
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    first = check_proof(await api.publish(ALICE, REF, module))
    again = check_proof(await api.publish(ALICE, REF, module))
    assert again == first  # the same statement again answers the original entry
    with pytest.raises(RegistryError) as e:
        await api.publish(ALICE, REF, wat_module("many_funcs", tmp_path))
    assert e.value.status == 409


async def test_yank(aiohttp_client, tmp_path) -> None:
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, REF, wat_module("no_imports", tmp_path))
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1, reason="CVE"))
    assert (await api.get_json(api.package_path(REF)))["yanked_at"] is not None
    with pytest.raises(RegistryError) as e:
        await api.act(ALICE, Action("yank", "acme", name="hello", version="9.9.9", issued=1))
    assert e.value.status == 404


async def _raw_publish(client, signer: Ed25519Signer, release: Release, module: bytes, sbom: bytes | None = None):  # type: ignore[no-untyped-def]
    env = sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer)
    form = aiohttp.FormData()
    form.add_field("signer", signer.vkey)
    form.add_field("envelope", env.to_json().decode())
    form.add_field("module", module, filename="m.wasm")
    if sbom is not None:
        form.add_field("sbom", sbom, filename="s.json")
    return await client.post("/api/v1/publish", data=form)


async def test_validation_failures_are_422(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    module = wat_module("imports_all_kinds", tmp_path)
    good = release_statement(REF, module, None, None)
    cases = {
        "imports differ": (Release(REF, good.module_sha256, good.imports[1:]), module, None),
        "extra import": (Release(REF, good.module_sha256, (*good.imports, Import("env", "x", "func"))), module, None),
        "digest differs": (Release(REF, "0" * 64, good.imports), module, None),
        "not wasm": (Release(REF, hashlib.sha256(b"nope").hexdigest(), ()), b"nope", None),
        "sbom missing": (Release(REF, good.module_sha256, good.imports, "0" * 64, "application/vnd.cyclonedx+json"), module, None),
        "sbom digest": (Release(REF, good.module_sha256, good.imports, "0" * 64, "application/vnd.cyclonedx+json"), module, CYCLONEDX),
        "sbom invalid": (
            Release(REF, good.module_sha256, good.imports, hashlib.sha256(b'{"bomFormat":"CycloneDX","specVersion":"1.5","version":"x"}').hexdigest(), "application/vnd.cyclonedx+json"),
            module, b'{"bomFormat":"CycloneDX","specVersion":"1.5","version":"x"}',
        ),
        "sbom not declared": (good, module, CYCLONEDX),
    }
    for why, (release, mod, sbom) in cases.items():
        r = await _raw_publish(client, ALICE, release, mod, sbom)
        assert r.status == 422, (why, await r.text())
    # a signature by another key than the named signer
    env = sign_envelope(INTOTO_PAYLOAD_TYPE, good.statement(), BOB)
    form = aiohttp.FormData()
    form.add_field("signer", ALICE.vkey)
    form.add_field("envelope", env.to_json().decode())
    form.add_field("module", module, filename="m.wasm")
    assert (await client.post("/api/v1/publish", data=form)).status == 403
    assert (await client.post("/api/v1/publish", data=b"x")).status == 400
    assert (await client.get("/api/v1/packages/acme/hello/1.0.0")).status == 404
    assert (await client.get("/api/v1/packages/ACME/hello/1.0.0")).status == 422
    assert (await client.get("/api/v1/packages/acme/hello/01.0.0")).status == 422


async def test_state_is_rebuilt_by_replaying_the_log(aiohttp_client, tmp_path) -> None:
    api, client, registry, store = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, REF, wat_module("no_imports", tmp_path))
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await api.publish(BOB, parse_package_ref("acme:hello@2.0.0"), wat_module("many_funcs", tmp_path))
    before = registry.state
    await client.close()
    store.close()
    again, _, store2 = build_registry(tmp_path)
    assert again.state == before and not again.rejected
    store2.close()
