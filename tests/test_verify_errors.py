"""The edge verifier's errors say what happened: a bad proof is never a fork, a bad registry never a bad proof."""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import re
import sys

import pytest
from aiohttp import web
from helpers import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify import (
    GOOD,
    LOG,
    MODULE,
    NOW,
    POLICY_TOML,
    _known,
    reason_of,
    release_entry,
    verify,
)

from edge.state import save_known
from edge.verify import REASONS, KnownCheckpoint, VerifyError
from edge.verify_cli import run_verify
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.storage.memory import MemoryLogStore

ROOT = pathlib.Path(__file__).resolve().parent.parent


def same_history_at(size: int) -> Log:
    """The log GOOD (size 3) came from, grown to size (>= 3)."""
    log = Log(MemoryLogStore(), LOG)
    log.integrate([b"first", b"second", release_entry()])
    for i in range(size - 3):
        log.integrate([b"later %d" % i])
    return log


NEWER = same_history_at(5)  # the edge node remembers size 5; GOOD is at size 3
PROOF_3_5 = NEWER.consistency_proof(3, 5)


def test_the_spec_table_lists_exactly_the_reason_codes() -> None:
    text = (ROOT / "spec" / "trust-policy.md").read_text()
    table = text.split("## The checks and their reason codes", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| `([a-z-]+)`", table, re.MULTILINE)
    assert sorted(codes) == sorted(REASONS) and len(codes) == len(set(codes))


def test_two_signed_checkpoints_of_one_size_with_different_roots_are_a_fork() -> None:
    forked = Log(MemoryLogStore(), LOG)
    forked.integrate([b"first", b"other", b"third"])
    with pytest.raises(VerifyError) as e:
        verify(GOOD, known=_known(forked))
    assert e.value.reason == "fork" and set(e.value.evidence) == {"known", "new"}


def test_a_well_formed_proof_that_fails_is_inconsistent_not_a_fork() -> None:
    wrong = [bytes(32)] * len(PROOF_3_5)  # the right shape, the wrong hashes
    with pytest.raises(VerifyError) as e:
        verify(GOOD, known=_known(NEWER), consistency=wrong)
    assert e.value.reason == "inconsistent" and set(e.value.evidence) == {"known", "new", "proof"}
    assert verify(GOOD, known=_known(NEWER), consistency=PROOF_3_5).known == _known(NEWER)  # another proof reconciles them


@pytest.mark.parametrize("proof", [[], PROOF_3_5[:-1], PROOF_3_5 + [bytes(32)], [h[:31] for h in PROOF_3_5], [b""]])
def test_a_proof_of_the_wrong_shape_is_consistency_malformed(proof: list[bytes]) -> None:
    with pytest.raises(VerifyError) as e:
        verify(GOOD, known=_known(NEWER), consistency=proof)
    assert e.value.reason == "consistency-malformed" and not e.value.evidence


def test_a_remembered_checkpoint_the_log_did_not_sign_convicts_nobody() -> None:
    impostor = Log(MemoryLogStore(), Ed25519Signer.generate(LOG.name))
    impostor.integrate([b"first", b"other", b"third"])  # same origin and size, another key, another root
    assert reason_of(proof=GOOD, known=_known(impostor)) == "state-invalid"
    genuine = _known(NEWER)
    swapped = KnownCheckpoint(genuine.checkpoint._replace(size=3), genuine.note)  # the parsed view lies about the note
    assert reason_of(proof=GOOD, known=swapped) == "state-invalid"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_no_mutated_or_garbage_consistency_proof_is_a_fork(data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from(["garbage", "flip", "drop", "add", "truncate"]))
    proof = list(PROOF_3_5)
    if choice == "garbage":
        proof = data.draw(st.lists(st.binary(max_size=40), max_size=8))
    elif choice == "flip":
        i = data.draw(st.integers(0, len(proof) - 1))
        j = data.draw(st.integers(0, 31))
        proof[i] = proof[i][:j] + bytes([proof[i][j] ^ (1 << data.draw(st.integers(0, 7)))]) + proof[i][j + 1 :]
    elif choice == "drop":
        proof.pop(data.draw(st.integers(0, len(proof) - 1)))
    elif choice == "add":
        proof.insert(data.draw(st.integers(0, len(proof))), data.draw(st.binary(min_size=32, max_size=32)))
    else:
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = proof[i][: data.draw(st.integers(0, 31))]
    if proof == PROOF_3_5:
        return
    with pytest.raises(VerifyError) as e:
        verify(GOOD, known=_known(NEWER), consistency=proof)
    assert e.value.reason in ("inconsistent", "consistency-malformed")


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=400) | st.lists(st.binary(max_size=40), max_size=8).map(lambda hs: "\n".join(base64.b64encode(h).decode() for h in hs)))
def test_no_consistency_file_is_a_fork(tmp_path_factory, text: str) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("edge")
    (d / "policy.toml").write_text(POLICY_TOML)
    (d / "m.wasm").write_bytes(MODULE)
    (d / "m.wasm.tlog-proof").write_bytes(GOOD)
    (d / "c.txt").write_text(text)
    save_known(d / "state", _known(NEWER))
    code, line = run_verify(policy_file=d / "policy.toml", module_file=d / "m.wasm", proof_file=d / "m.wasm.tlog-proof", sbom_file=None,
                            state_dir=d / "state", consistency_file=d / "c.txt", url=None, now=NOW, as_json=True)
    out = json.loads(line)
    assert code == 1 and out["reason"] in ("inconsistent", "consistency-malformed")
    kept = list((d / "state" / "evidence").glob("*.json")) if (d / "state" / "evidence").exists() else []
    assert len(kept) == (out["reason"] == "inconsistent")


@pytest.mark.parametrize("missing", ["policy.toml", "m.wasm", "c.txt"])
def test_a_file_that_cannot_be_read_is_input_unreadable(tmp_path: pathlib.Path, missing: str) -> None:
    d = edge_dir(tmp_path)
    (d / "c.txt").write_text(GOOD_HASHES)
    (d / missing).unlink()
    code, line = run_verify(policy_file=d / "policy.toml", module_file=d / "m.wasm", proof_file=d / "m.wasm.tlog-proof", sbom_file=None,
                            state_dir=None, consistency_file=d / "c.txt", url=None, now=NOW, as_json=False)
    assert code == 2 and line.startswith("FAIL input-unreadable: cannot read") and missing in line


def edge_dir(tmp_path: pathlib.Path, known: KnownCheckpoint | None = None) -> pathlib.Path:
    (tmp_path / "policy.toml").write_text(POLICY_TOML)
    (tmp_path / "m.wasm").write_bytes(MODULE)
    (tmp_path / "m.wasm.tlog-proof").write_bytes(GOOD)
    if known is not None:
        save_known(tmp_path / "state", known)
    return tmp_path


async def verify_online(d: pathlib.Path, url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """`wasmlog verify --registry URL --json` in a subprocess (it runs its own event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wasmlog", "verify", "--policy", str(d / "policy.toml"), "--now", str(NOW), "--json",
        "--state", str(d / "state"), "--registry", url, str(d / "m.wasm"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    out, err = await proc.communicate()
    assert b"Traceback" not in err, err.decode()
    return proc.returncode or 0, json.loads(out)


@pytest.mark.parametrize("remembered", [False, True])
async def test_an_unreachable_registry_is_registry_unreachable(tmp_path: pathlib.Path, remembered: bool) -> None:
    code, out = await verify_online(edge_dir(tmp_path, _known(NEWER) if remembered else None), f"http://127.0.0.1:{free_port()}")
    assert code == 1 and out["reason"] == "registry-unreachable" and "unreachable" in out["message"]


def registry_answering(consistency: web.Response | None, actions: web.Response) -> web.Application:
    async def get_consistency(request: web.Request) -> web.Response:
        assert consistency is not None
        return consistency

    async def get_actions(request: web.Request) -> web.Response:
        return actions

    app = web.Application()
    app.router.add_get("/log/proof/consistency", get_consistency)
    app.router.add_get("/api/v1/namespaces/acme/actions", get_actions)
    return app


NO_ACTIONS = '{"proofs": [], "next": null}'
GOOD_HASHES = "".join(base64.b64encode(h).decode() + "\n" for h in PROOF_3_5)


@pytest.mark.parametrize(("consistency", "actions", "reason"), [
    (GOOD_HASHES, NO_ACTIONS, None),
    ("oops", NO_ACTIONS, "consistency-malformed"),
    (base64.b64encode(bytes(32)).decode() + "\n", NO_ACTIONS, "consistency-malformed"),
    ("".join(base64.b64encode(bytes(32)).decode() + "\n" for _ in PROOF_3_5), NO_ACTIONS, "inconsistent"),
    (GOOD_HASHES, "not json", "registry-error"),
    (GOOD_HASHES, '{"proofs": [1], "next": null}', "registry-error"),
    (GOOD_HASHES, '{"other": []}', "registry-error"),
    (GOOD_HASHES, '{"proofs": ["not a tlog-proof"], "next": null}', "registry-error"),  # a record that does not verify
    (None, NO_ACTIONS, "registry-error"),  # the consistency route answers 500
])
async def test_a_registry_answering_badly_is_named(aiohttp_server, tmp_path, consistency, actions, reason) -> None:  # type: ignore[no-untyped-def]
    c = web.Response(status=500, text="boom") if consistency is None else web.Response(text=consistency)
    server = await aiohttp_server(registry_answering(c, web.Response(text=actions, content_type="application/json")))
    d = edge_dir(tmp_path, _known(NEWER))
    code, out = await verify_online(d, str(server.make_url("")))
    if reason is None:
        assert code == 0 and out["ok"]
        return
    assert code == 1 and out["reason"] == reason, out
    kept = list((d / "state" / "evidence").glob("*.json")) if (d / "state" / "evidence").exists() else []
    assert len(kept) == (reason == "inconsistent")
    if kept:
        evidence = json.loads(kept[0].read_text())
        assert evidence["reason"] == "inconsistent" and evidence["known"] == NEWER.published.note.decode()
        assert evidence["new"] in GOOD.decode() and len(evidence["proof"]) == len(PROOF_3_5)


async def test_a_registry_answering_not_http_is_a_registry_error(tmp_path: pathlib.Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        code, out = await verify_online(edge_dir(tmp_path, _known(NEWER)), f"http://127.0.0.1:{port}")
    assert code == 1 and out["reason"] == "registry-error"
