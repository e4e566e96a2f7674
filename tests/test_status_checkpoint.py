"""A status proof's checkpoint against the one the node trusts (spec/trust-policy.md "The status proof's
checkpoint"), and `wasmlog verify --registry` fetching the status proof online.

Real registries over loopback HTTP (one of them a fork signed with the same log key), real keys; the CLI
as a real process against a registry whose witnesses cosign at the test's clock."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from registry_helpers import start_registry, wat_module
from test_status import (
    ALICE,
    BOB,
    CAROL,
    NOW,
    POLICY,
    REF,
    fetch,
    other_log_registry,
    published,
    run_wasmlog,
)
from witnessed_helpers import Clock, start_witnessed_registry, trust_policy

from edge.verify import KnownCheckpoint, Verified, VerifyError, verify_module
from registry.record import Action
from registry.status_proof import StatusProof
from tlog.proof_file import parse_tlog_proof


def known_of(proof: bytes) -> KnownCheckpoint:
    """The checkpoint of a tlog-proof, as a node that accepted it remembers it."""
    tp = parse_tlog_proof(proof)
    assert tp.parsed is not None
    return KnownCheckpoint(tp.parsed, tp.checkpoint)


def verify(module: bytes, proof: bytes, status: StatusProof, **kw: Any) -> Verified:
    return verify_module(module=module, proof=proof, policy=POLICY, now=NOW, status_proof=status, **kw)


def refused(module: bytes, proof: bytes, status: StatusProof, **kw: Any) -> VerifyError:
    with pytest.raises(VerifyError) as e:
        verify(module, proof, status, **kw)
    return e.value


async def test_a_status_proof_older_than_the_trusted_checkpoint_is_a_rollback(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof_old, status_old = await fetch(api)
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=1))
    proof_new, status_new = await fetch(api)
    old, new = known_of(proof_old).checkpoint.size, known_of(proof_new).checkpoint.size
    assert old < new
    verify(module, proof_new, status_new)
    verify(module, proof_old, status_old)
    # older than the module's own tlog-proof
    e = refused(module, proof_new, status_old)
    assert e.reason == "status-rollback" and f"(size {old})" in str(e) and f"(size {new})" in str(e)
    # older than the remembered checkpoint (the tlog-proof, as old, is shown consistent with it)
    known, consistency = known_of(proof_new), registry.log.consistency_proof(old, new)
    verified = verify(module, proof_old, status_new, known=known, consistency=consistency)
    assert verified.known == known
    assert refused(module, proof_old, status_old, known=known, consistency=consistency).reason == "status-rollback"
    # of another log, whatever its size
    other_api = await other_log_registry(aiohttp_client, tmp_path)
    await other_api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await other_api.publish(ALICE, REF, module)
    _, other = await fetch(other_api)
    assert refused(module, proof_old, other, known=known, consistency=consistency).reason == "status-other-log"


async def test_a_status_proof_of_the_same_size_with_another_root_is_a_fork(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A second registry signing with the same log key: the same records, then one that differs."""
    api, _, module = await published(aiohttp_client, tmp_path)
    fork_api, _, fork_registry, _ = await start_registry(aiohttp_client, tmp_path / "fork")
    await fork_api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await fork_api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await fork_api.publish(BOB, REF, module)
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=1))
    await fork_api.act(CAROL, Action("key-grant", "other", key=CAROL.vkey, issued=1))  # another record, same size
    proof, status = await fetch(api)
    _, forked = await fetch(fork_api)
    assert known_of(proof).checkpoint.size == fork_registry.log.published.checkpoint.size
    verify(module, proof, status)
    e = refused(module, proof, forked)
    assert e.reason == "fork" and set(e.evidence) == {"known", "new"} and "status proof" in str(e)
    assert e.evidence["known"] == known_of(proof).note and e.evidence["new"] == forked.checkpoint


async def test_a_newer_status_proof_checkpoint_is_checked_for_consistency(aiohttp_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof, _ = await fetch(api)
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=1))
    _, status = await fetch(api)
    old = known_of(proof).checkpoint.size
    new = registry.log.published.checkpoint.size
    good = registry.log.consistency_proof(old, new)
    # offline without remembered state: both checkpoints carry the quorum
    verified = verify(module, proof, status)
    assert verified.status is not None and verified.status.checkpoint.size == new and verified.checkpoint.size == old
    verify(module, proof, status, status_consistency=good)
    assert refused(module, proof, status, status_consistency=good[1:]).reason == "consistency-malformed"
    e = refused(module, proof, status, status_consistency=[bytes(32)] * len(good))
    assert e.reason == "inconsistent" and e.evidence["new"] == status.checkpoint
    # a node that remembers a checkpoint needs the proof; the status proof never moves what it remembers
    known = known_of(proof)
    e = refused(module, proof, status, known=known)
    assert e.reason == "consistency-required" and "status proof" in str(e)
    assert verify(module, proof, status, known=known, status_consistency=good).known == known


async def test_verify_online_fetches_the_status_proof_and_its_consistency(aiohttp_client, aiohttp_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(float(NOW))
    api, _ = await start_witnessed_registry(aiohttp_client, aiohttp_server, tmp_path, clock)
    await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await api.publish(ALICE, REF, wat_module("no_imports", tmp_path))
    old_dir, new_dir, state = tmp_path / "old", tmp_path / "new", tmp_path / "state"
    assert (await run_wasmlog("fetch", "--registry", api.url, "--out", str(old_dir), str(REF)))[0] == 0
    wasm = old_dir / "acme_hello_1.0.0.wasm"
    status_file = wasm.with_name(wasm.name + ".status-proof")
    old_status = status_file.read_bytes()
    status_file.unlink()
    policy = tmp_path / "policy.toml"
    policy.write_text(trust_policy("require_status = true"))

    async def verify_cli(*args: str, module: pathlib.Path = wasm) -> tuple[int, dict[str, Any]]:
        code, out = await run_wasmlog("verify", "--policy", str(policy), "--json", "--now", str(NOW + 10), *args, str(module))
        return code, json.loads(out)

    code, out = await verify_cli()
    assert (code, out["reason"]) == (1, "status-missing")
    code, out = await verify_cli("--registry", api.url)  # fetched online
    assert code == 0 and out["status"]["cosigned"] == NOW, out
    clock.now = NOW + 5
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))  # the log grows
    code, out = await verify_cli("--registry", api.url, "--state", str(state))
    assert code == 0 and out["status"]["cosigned"] == NOW + 5 and out["status"]["tree_size"] > out["tree_size"], out
    # offline, with the remembered checkpoint (the old tlog-proof's) and a newer status proof: its consistency is required
    assert (await run_wasmlog("fetch", "--registry", api.url, "--out", str(new_dir), str(REF)))[0] == 0
    new_status = new_dir / "acme_hello_1.0.0.wasm.status-proof"
    code, out = await verify_cli("--state", str(state), "--status", str(new_status))
    assert (code, out["reason"]) == (1, "consistency-required") and "status proof" in out["message"], out
    # once the node trusts the newer checkpoint, the old status proof is a rollback
    code, out = await verify_cli("--registry", api.url, "--state", str(state), module=new_dir / "acme_hello_1.0.0.wasm")
    assert code == 0, out
    status_file.write_bytes(old_status)
    code, out = await verify_cli("--registry", api.url, "--state", str(state))
    assert (code, out["reason"]) == (1, "status-rollback"), out

