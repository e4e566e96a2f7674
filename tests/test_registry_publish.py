"""POST /api/v1/publish under abuse, over real HTTP with the real registry app: checks ordered by
cost (nothing costly before the signature and the signer's grant), the strict CBOR body, SBOM
limits, and every malformed body a 4xx."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib

import cbor2
import pytest
from registry_helpers import (
    CYCLONEDX,
    NOT_WASM,
    big_cyclonedx,
    release_envelope,
    start_registry,
    wat_module,
)

from registry.client import RegistryClient, RegistryError
from registry.record import parse_package_ref
from registry.sbom import MAX_SBOM_COMPONENTS
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
SPDX = "application/spdx+json"
def wrong_typed_spdx() -> bytes:
    return json.dumps({
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": "hello",
        "documentNamespace": "https://example.com/hello", "creationInfo": {"created": "2024-01-01T00:00:00Z", "creators": ["Tool: t"]},
        "packages": {"not": "a list"},
    }).encode()


async def refused(api: RegistryClient, signer: str, env: bytes, module: bytes, sbom: bytes | None) -> tuple[int, str]:
    with pytest.raises(RegistryError) as e:
        await api.publish_signed(signer, env, module, sbom)
    return e.value.status, str(e.value)


async def test_an_unauthorized_publish_costs_no_wasm_parse_and_no_sbom_validation(aiohttp_client, tmp_path: pathlib.Path) -> None:
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    ref = parse_package_ref("acme:hello@1.0.0")
    sbom = big_cyclonedx()  # over the components limit, and 30 s of validation before the limits existed
    forged = release_envelope(BOB, ref, NOT_WASM, sbom)  # Bob's signature, Alice named as the signer
    no_signature = json.loads(forged)
    no_signature["signatures"][0]["sig"] = "AAAA"
    cases = {
        "forged": (ALICE.vkey, forged),
        "garbage signature": (ALICE.vkey, json.dumps(no_signature).encode()),
        "ungranted signer": (BOB.vkey, release_envelope(BOB, ref, NOT_WASM, sbom)),
        "unclaimed namespace": (BOB.vkey, release_envelope(BOB, parse_package_ref("other:hello@1.0.0"), NOT_WASM, sbom)),
    }
    for why, (signer, env) in cases.items():
        # The module is not wasm and the SBOM over its limits: either check, if it ran first, would answer 422.
        status, message = await refused(api, signer, env, NOT_WASM, sbom)
        assert status == 403, (why, message)
    assert registry.sbom_pool.validations == 0
    assert not (tmp_path / "blobs" / "sha256" / hashlib.sha256(sbom).hexdigest()).exists()

    # Authorized: the module is checked before the SBOM, the SBOM's limits before its validation.
    status, message = await refused(api, ALICE.vkey, release_envelope(ALICE, ref, NOT_WASM, CYCLONEDX), NOT_WASM, CYCLONEDX)
    assert status == 422 and "SBOM" not in message
    module = wat_module("imports_all_kinds", tmp_path)
    status, message = await refused(api, ALICE.vkey, release_envelope(ALICE, ref, module, sbom), module, sbom)
    assert status == 422 and f"more than {MAX_SBOM_COMPONENTS} components (the limit)" in message
    assert registry.sbom_pool.validations == 0

    signed = release_envelope(ALICE, ref, module, CYCLONEDX)
    first = await api.publish_signed(ALICE.vkey, signed, module, CYCLONEDX)
    assert registry.sbom_pool.validations == 1  # the counter does count
    # Anyone may replay the public release: it costs the digests only, no validation.
    assert await api.publish_signed(ALICE.vkey, signed, module, CYCLONEDX) == first
    assert registry.sbom_pool.validations == 1
    status, message = await refused(api, ALICE.vkey, signed, module, CYCLONEDX + b" ")  # a replay with other bytes
    assert status == 422 and "SHA-256" in message


async def test_wrong_typed_spdx_is_422(aiohttp_client, tmp_path: pathlib.Path) -> None:
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    module = wat_module("no_imports", tmp_path)
    sbom = wrong_typed_spdx()
    status, message = await refused(api, ALICE.vkey, release_envelope(ALICE, parse_package_ref("acme:hello@1.0.0"), module, sbom, SPDX), module, sbom)
    assert status == 422 and "invalid SPDX SBOM" in message
    assert registry.sbom_pool.validations == 1


@pytest.mark.parametrize("sent", ["content-length", "chunked"])
async def test_cbor_tag_bombs_and_other_shapes_are_400_and_the_server_keeps_answering(aiohttp_client, tmp_path: pathlib.Path,
                                                                                      sent: str) -> None:
    """Small bodies with a Content-Length are read at once and decoded from memory, chunked ones as they
    arrive (registry/publish_reader.py): both are refused alike."""
    _, client, _, _ = await start_registry(aiohttp_client, tmp_path)

    async def chunks(body: bytes):  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    async def post(body: bytes) -> tuple[int, str]:
        data = body if sent == "content-length" else chunks(body)
        r = await client.post("/api/v1/publish", data=data, headers={"Content-Type": "application/cbor"})
        return r.status, await r.text()

    bomb = cbor2.dumps(cbor2.CBORTag(36, "Content-Type: text/plain\n\n" + "x" * 2_400_000))
    status, message = await post(bomb)
    assert status == 400 and "tags" in message
    assert (await client.get("/log/checkpoint")).status == 200
    for body in (
        b"\xa1\x66signer" + bomb,  # a tag as a part's value
        cbor2.dumps({"signer": {"nested": b"x"}}),
        cbor2.dumps({"signer": "text"}),
        cbor2.dumps({"signer": b"a", "envelope": b"{}", "module": b"m"}) + b"\x00",
        b"\xa2\x66signer\x41x\x66signer\x41y",  # a repeated part
        cbor2.dumps({"envelope": b"{}", "signer": b"x", "module": b"m"}),  # out of order
        b"\xbf\x66signer\x41x\xff",  # an indefinite-length map
        cbor2.dumps({"signer": b"x" * 100})[:-1],  # ends early
        b"",
    ):
        status, message = await post(body)
        assert status == 400, (body[:20], message)
    # A part declared over its limit is refused from its head, before any of it is sent.
    status, message = await post(b"\xa1\x66signer\x5b" + (1 << 40).to_bytes(8, "big"))
    assert status == 413 and "signer" in message
    assert (await client.get("/log/checkpoint")).status == 200


async def test_a_tag_bomb_is_refused_from_its_first_bytes(aiohttp_client, tmp_path: pathlib.Path) -> None:
    """The body is refused before the rest of it is sent: the server decodes nothing past the tag's head."""
    _, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    bomb = cbor2.dumps(cbor2.CBORTag(36, "x" * 2_400_000))
    answered = asyncio.Event()

    async def body():  # type: ignore[no-untyped-def]
        yield bomb[:64]
        await answered.wait()  # the rest only once the server has answered
        yield bomb[64:]

    r = await asyncio.wait_for(client.post("/api/v1/publish", data=body(), headers={"Content-Type": "application/cbor"}), 60)
    answered.set()
    assert r.status == 400 and "tags" in (await r.json())["message"]
    assert (await client.get("/log/checkpoint")).status == 200


def multipart(parts: dict[str, bytes], boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body of these parts, in this order."""
    out = b""
    for name, data in parts.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("content_type", ["application/cbor", "multipart/form-data; boundary=b0undary"])
async def test_an_unauthorized_publish_is_refused_before_its_module_is_sent(aiohttp_client, tmp_path: pathlib.Path, content_type: str) -> None:
    """The server answers from the signer and the envelope: the module is sent only after the answer."""
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    module = b"\x00asm\x01\x00\x00\x00" + b"\x00" * (4 << 20)  # 4 MiB
    ref = parse_package_ref("acme:hello@1.0.0")
    for signer, env in ((ALICE, release_envelope(BOB, ref, module, None)), (BOB, release_envelope(BOB, ref, module, None))):
        parts = {"signer": signer.vkey.encode(), "envelope": env, "module": module}
        body = cbor2.dumps(parts) if content_type == "application/cbor" else multipart(parts)
        # Everything up to the module's bytes; aiohttp's multipart reader looks ahead for the next
        # delimiter by up to two 64 KiB chunks, so a multipart body gets those as well.
        start = body.index(module) + (0 if content_type == "application/cbor" else 128 << 10)
        answered = asyncio.Event()

        async def stream(body: bytes = body, start: int = start, answered: asyncio.Event = answered):  # type: ignore[no-untyped-def]
            yield body[:start]
            await answered.wait()
            yield body[start:]

        r = await asyncio.wait_for(client.post("/api/v1/publish", data=stream(), headers={"Content-Type": content_type}), 60)
        answered.set()
        assert r.status == 403, await r.text()
        r.close()


async def test_broken_multipart_bodies_are_400(aiohttp_client, tmp_path: pathlib.Path) -> None:
    _, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    disposition = b'Content-Disposition: form-data; name="signer"\r\n'
    cases = {
        "no boundary": ("multipart/form-data", b"--x\r\n"),
        "no starting boundary": ("multipart/form-data; boundary=x", b"garbage"),
        "empty": ("multipart/form-data; boundary=x", b""),
        "unterminated part": ("multipart/form-data; boundary=x", b"--x\r\n" + disposition + b"\r\nabc"),
        "bad part header": ("multipart/form-data; boundary=x", b"--x\r\nNoColonHeader\r\n\r\nabc\r\n--x--\r\n"),
        "boundary over 70 characters": ("multipart/form-data; boundary=" + "x" * 100, b"--" + b"x" * 100 + b"\r\n"),
        "unnamed part": ("multipart/form-data; boundary=x", b"--x\r\n\r\nabc\r\n--x--\r\n"),
    }
    for why, (content_type, body) in cases.items():
        r = await client.post("/api/v1/publish", data=body, headers={"Content-Type": content_type})
        assert r.status == 400, (why, await r.text())
        assert (await r.json())["error"] == "MalformedError"


async def test_an_sbom_past_its_validation_budget_is_422_and_the_next_one_validates(aiohttp_client, tmp_path: pathlib.Path) -> None:
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path)
    await api.claim_if_unclaimed(ALICE, "acme")
    module = wat_module("no_imports", tmp_path)
    budget = registry.sbom_pool.budget
    registry.sbom_pool.budget = 1e-9  # no validation is this fast
    ref = parse_package_ref("acme:hello@1.0.0")
    status, message = await refused(api, ALICE.vkey, release_envelope(ALICE, ref, module, CYCLONEDX), module, CYCLONEDX)
    assert status == 422 and "budget" in message
    assert (tmp_path / "blobs" / "sha256").exists() and not any((tmp_path / "blobs" / "sha256").iterdir())
    registry.sbom_pool.budget = budget  # the killed validator is replaced
    await api.publish_signed(ALICE.vkey, release_envelope(ALICE, ref, module, CYCLONEDX), module, CYCLONEDX)
    assert registry.sbom_pool.validations == 2
