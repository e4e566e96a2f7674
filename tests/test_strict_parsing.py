"""Strict parsing (issue 12): a repeated old line and duplicate JSON keys are refused, with the real servers."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import start_registry, wat_module

from registry.client import RegistryClient
from registry.dsse import ACTION_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, parse_package_ref
from tlog.checkpoint import parse_hash
from tlog.errors import MalformedError
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, b64encode
from tlog.storage.memory import MemoryLogStore
from tlog.witness_protocol import parse_add_checkpoint
from witness.loglist import parse_log_list
from witness.server import make_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/strict-log")
W_KEY = Ed25519Signer.generate("witness.example", ALG_COSIGNATURE_V1)
ALICE = Ed25519Signer.generate("alice")
_LOG = Log(MemoryLogStore(), LOG_KEY)
_LOG.integrate([b"a", b"b"])
NOTE = _LOG.published.note
HASH = b64encode(b"\x07" * 32)


def reference_head(lines: list[str]) -> tuple[int, tuple[bytes, ...]] | None:
    """A naive reading of an add-checkpoint head: exactly one `old N` (canonical decimal), first,
    then at most 63 canonical base64 hashes. None when it is not one."""
    if not lines or not lines[0].startswith("old ") or len(lines) > 64:
        return None
    n = lines[0][4:]
    if not n.isascii() or not n.isdigit() or (n != "0" and n.startswith("0")) or int(n) >= 2**63:
        return None
    hashes = []
    for line in lines[1:]:
        try:
            hashes.append(parse_hash(line))
        except MalformedError:
            return None
    return int(n), tuple(hashes)


OLD_LOOKING_HASH = "old" + "A" * 40 + "="  # a proof hash whose base64 starts with "old"
_LINE = st.sampled_from(["old 0", "old 1", "old 2", "old 01", "old", "old  1", HASH, OLD_LOOKING_HASH, b64encode(b"\x01" * 31), ""])


@settings(max_examples=300)
@given(st.lists(_LINE, min_size=1, max_size=6))
def test_add_checkpoint_head_matches_a_naive_reference(lines: list[str]) -> None:
    body = ("\n".join(lines) + "\n\n").encode() + NOTE
    want = reference_head(lines)
    if "" in lines:  # a blank line ends the head early: the rest is not a note
        want = None
    try:
        req, _ = parse_add_checkpoint(body)
    except MalformedError as e:
        assert want is None
        if reference_head(lines[:1]) is not None and any(line.startswith("old ") for line in lines[1:]) and "" not in lines:
            assert "repeated" in str(e), str(e)
        return
    assert (req.old_size, req.proof) == want


async def test_witness_refuses_a_repeated_old_line_as_such(aiohttp_client, tmp_path) -> None:
    logs = parse_log_list(f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 86400\ncontact ops@example.com\n")
    w = Witness(signer=W_KEY, logs=logs, state=WitnessState(str(tmp_path)), clock=lambda: 1_800_000_000)
    c = await aiohttp_client(make_app(w))
    for head in (b"old 0\nold 0\n\n", b"old 0\n" + HASH.encode() + b"\nold 0\n\n"):
        r = await c.post("/add-checkpoint", data=head + NOTE)
        assert r.status == 400 and "repeated" in await r.text()
    assert (await c.post("/add-checkpoint", data=b"old 0\n\n" + NOTE)).status == 200
    assert parse_add_checkpoint(b"old 1\n" + OLD_LOOKING_HASH.encode() + b"\n\n" + NOTE)[0].proof == (parse_hash(OLD_LOOKING_HASH),)


async def test_records_with_duplicate_json_keys_are_400(aiohttp_client, tmp_path) -> None:
    _, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    env = json.loads(sign_envelope(ACTION_PAYLOAD_TYPE, Action("key-grant", "acme", key=ALICE.vkey, issued=1).payload(), ALICE).to_json())
    good = json.dumps({"type": "key-grant", "signer": ALICE.vkey, "envelope": env})
    for body in (
        '{"type": "yank", ' + good[1:],  # the type twice: which one did the registry act on?
        good[:-1] + ', "signer": "' + ALICE.vkey + '"}',
        good.replace('"payloadType"', '"payloadType": "x", "payloadType"'),  # inside the envelope
    ):
        r = await client.post("/api/v1/records", data=body, headers={"Content-Type": "application/json"})
        assert r.status == 400 and "duplicate" in (await r.json())["message"], await r.text()
    assert (await client.post("/api/v1/records", data=good)).status == 200


async def test_a_repeated_old_parameter_is_400(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    path = api.package_path(parse_package_ref("acme:hello@1.0.0")) + "/tlog-proof"
    assert (await client.get(path + "?old=1")).status == 200
    r = await client.get(path + "?old=1&old=2")
    assert r.status == 400 and "one old parameter" in await r.text()


async def test_the_client_refuses_duplicate_keys_in_a_registry_answer(aiohttp_client) -> None:
    async def twice(_: web.Request) -> web.Response:
        return web.Response(body=b'{"proofs": [], "proofs": ["x"]}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/answer", twice)
    c = await aiohttp_client(app)
    api = RegistryClient(str(c.make_url("")), c.session)
    with pytest.raises(MalformedError, match="duplicate"):
        await api.get_json("/answer")
