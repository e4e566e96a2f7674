"""GET /api/v1/namespaces/{ns}/actions in pages (issue 12: 400 yanks answered 637 KB at once)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from registry_helpers import REGISTRY_KEY, start_registry, wat_module

from registry.client import RegistryClient
from registry.record import Action, decode_entry, parse_package_ref
from registry.server import ACTIONS_PAGE, MAX_ACTIONS_PAGE
from tlog.errors import MalformedError
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof

ALICE = Ed25519Signer.generate("alice")


async def revoke_many(api: RegistryClient, n: int) -> None:
    """n key revocations in acme (each after its grant), submitted concurrently."""
    keys = [Ed25519Signer.generate(f"k{i}") for i in range(n)]
    await asyncio.gather(*(api.act(ALICE, Action("key-grant", "acme", key=k.vkey, issued=1)) for k in keys))
    await asyncio.gather(*(api.act(ALICE, Action("key-revocation", "acme", key=k.vkey, issued=1)) for k in keys))


def index_of(proof: bytes | str) -> int:
    return parse_tlog_proof(proof.encode() if isinstance(proof, str) else proof).index


async def test_actions_come_in_pages_with_a_cursor(aiohttp_client, tmp_path) -> None:
    api, client, registry, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), module)
    await revoke_many(api, 5)
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1))
    ns = registry.namespace("acme")
    want = sorted([*ns.revoked.values(), ns.releases["hello@1.0.0"].yanked_at])
    assert len(want) == 6
    path = "/api/v1/namespaces/acme/actions"
    got, after = [], None
    while True:
        page = await api.get_json(path + "?limit=4" + ("" if after is None else f"&after={after}"))
        assert page.keys() == {"proofs", "next"} and len(page["proofs"]) <= 4
        got += [index_of(p) for p in page["proofs"]]
        if page["next"] is None:
            break
        assert page["next"] == got[-1]
        after = page["next"]
    assert got == want
    whole = await api.get_json(path)  # the default page holds them all
    assert [index_of(p) for p in whole["proofs"]] == want and whole["next"] is None
    assert (await api.get_json(path + f"?after={want[-1]}")) == {"proofs": [], "next": None}
    for q in ("limit=0", f"limit={MAX_ACTIONS_PAGE + 1}", "after=-1", "after=01", "limit=2&limit=3", "after=x"):
        r = await client.get(path + "?" + q)
        assert r.status == 400, q
    proofs = await api.actions("acme", limit=2)
    assert [index_of(p) for p in proofs] == want
    assert all(decode_entry(parse_tlog_proof(p).extra or b"").type in ("key-revocation", "yank") for p in proofs)


async def test_verifier_follows_every_page_online(aiohttp_client, tmp_path) -> None:
    """The yank that matters is on the second page: a verifier reading only the first would pass."""
    api, _, _, _ = await start_registry(aiohttp_client, tmp_path)
    module = wat_module("no_imports", tmp_path)
    ref = parse_package_ref("acme:hello@1.0.0")
    proof = await api.publish(ALICE, ref, module)
    await revoke_many(api, ACTIONS_PAGE)
    (tmp_path / "m.wasm").write_bytes(module)
    (tmp_path / "m.wasm.tlog-proof").write_bytes(proof)
    (tmp_path / "policy.toml").write_text(f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nquorum none\n"""\n')
    args = [sys.executable, "-m", "wasmlog", "verify", "--policy", str(tmp_path / "policy.toml"), "--registry", api.url, str(tmp_path / "m.wasm")]

    async def verify() -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await p.communicate()
        return p.returncode or 0, out.decode() + err.decode()

    code, out = await verify()
    assert code == 0, out
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1))
    code, out = await verify()
    assert code == 1 and "FAIL yanked" in out, out


async def test_the_client_refuses_a_cursor_that_does_not_move(aiohttp_client) -> None:
    from aiohttp import web

    async def stuck(request: web.Request) -> web.Response:
        return web.json_response({"proofs": ["x"], "next": int(request.query.get("after", "5"))})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/acme/actions", stuck)
    c = await aiohttp_client(app)
    with pytest.raises(MalformedError, match="later index"):
        await RegistryClient(str(c.make_url("")), c.session).actions("acme")
