"""A witness keeps split-view evidence (and freezes the log) only for what proves two histories, never for a bad proof."""

from __future__ import annotations

import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.client import TileClient
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.sequencer import Sequencer
from tlog.server import make_app as make_log_app
from tlog.storage.memory import MemoryLogStore
from tlog.witness_protocol import AddCheckpoint
from witness.errors import BadProof, SplitViewProof
from witness.loglist import parse_log_list
from witness.rules import Tree, check_update
from witness.server import make_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/evidence")
W_KEY = Ed25519Signer.generate("witness.example", ALG_COSIGNATURE_V1)
NOW = 1_800_000_000


def history(name: bytes, size: int) -> Log:
    log = Log(MemoryLogStore(), LOG_KEY)
    log.integrate([name + b" %d" % i for i in range(size)])
    return log


def grown(log: Log, size: int) -> Log:
    log.integrate([b"more %d" % i for i in range(size - log.published.checkpoint.size)])
    return log


def witness(tmp_path) -> Witness:  # type: ignore[no-untyped-def]
    logs = parse_log_list(f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 86400\n")
    return Witness(signer=W_KEY, logs=logs, state=WitnessState(str(tmp_path / "w")), clock=lambda: NOW)


def add(old: int, proof: list[bytes], log: Log) -> bytes:
    return AddCheckpoint(old, tuple(proof), log.published.note).encode()


A5 = grown(history(b"a", 3), 5)
PROOF = A5.consistency_proof(3, 5)
A3_ROOT, A5_ROOT = history(b"a", 3).published.checkpoint.root_hash, A5.published.checkpoint.root_hash


@settings(max_examples=300, deadline=None)
@given(proof=st.lists(st.binary(max_size=40), max_size=6) | st.lists(st.binary(min_size=32, max_size=32), min_size=len(PROOF), max_size=len(PROOF)))
def test_no_garbage_proof_between_honest_trees_is_a_split_view(proof: list[bytes]) -> None:
    if proof == PROOF:
        return
    with pytest.raises(BadProof) as e:
        check_update(Tree(3, A3_ROOT), 3, proof, Tree(5, A5_ROOT))
    assert not isinstance(e.value, SplitViewProof)


async def test_bad_proofs_are_422_and_leave_no_evidence(aiohttp_client, tmp_path) -> None:
    c = await aiohttp_client(make_app(witness(tmp_path)))
    assert (await c.post("/add-checkpoint", data=add(0, [], history(b"a", 3)))).status == 200
    flipped = [bytes([PROOF[0][0] ^ 1]) + PROOF[0][1:], *PROOF[1:]]
    for bad in (flipped, PROOF[:-1], [*PROOF, bytes(32)], [bytes(32)] * len(PROOF), list(reversed(PROOF))):
        r = await c.post("/add-checkpoint", data=add(3, bad, A5))
        assert r.status == 422, await r.text()
    assert json.loads(await (await c.get("/evidence")).read()) == []
    assert (await c.post("/add-checkpoint", data=add(3, PROOF, A5))).status == 200  # not frozen


async def test_a_forked_logs_own_proof_is_evidence_and_freezes(aiohttp_client, tmp_path) -> None:
    c = await aiohttp_client(make_app(witness(tmp_path)))
    assert (await c.post("/add-checkpoint", data=add(0, [], history(b"a", 3)))).status == 200
    b5 = history(b"b", 5)  # the same key signs another history
    r = await c.post("/add-checkpoint", data=add(3, b5.consistency_proof(3, 5), b5))
    assert r.status == 422 and "evidence" in await r.text()
    evidence = json.loads(await (await c.get("/evidence")).read())
    assert len(evidence) == 1 and evidence[0]["other"] == b5.published.note.decode() and len(evidence[0]["proof"]) == len(PROOF)
    assert (await c.post("/add-checkpoint", data=add(3, PROOF, A5))).status == 422  # frozen: not even the honest side


async def tile_server(aiohttp_server, log: Log) -> str:  # type: ignore[no-untyped-def]
    server = await aiohttp_server(make_log_app(Sequencer(log, interval=0.01, republish_interval=3600)))
    return str(server.make_url(""))


@pytest.mark.parametrize("old", [3, 4])  # 4: a power of two, where the proof omits the old root
async def test_gossip_with_wrong_tiles_is_unverifiable_not_evidence(aiohttp_server, tmp_path, old: int) -> None:
    w = witness(tmp_path)
    honest = history(b"a", old)
    assert await w.observe(honest.published.note, None) == "advanced"
    newer = grown(history(b"a", old), 8)
    wrong_tiles = await tile_server(aiohttp_server, history(b"c", 8))  # tiles of another tree
    async with aiohttp.ClientSession() as session:
        outcome = await w.observe(newer.published.note, TileClient(wrong_tiles, session))
        assert outcome.startswith("unverifiable: the tiles' consistency proof fails"), outcome
        assert w.state.evidence() == [] and not w.state.is_frozen(LOG_KEY.name)
        right_tiles = await tile_server(aiohttp_server, newer)
        assert await w.observe(newer.published.note, TileClient(right_tiles, session)) == "advanced"


@pytest.mark.parametrize("old", [3, 4])
async def test_gossip_of_a_fork_proven_by_its_own_tiles_is_evidence(aiohttp_server, tmp_path, old: int) -> None:
    w = witness(tmp_path)
    assert await w.observe(history(b"a", old).published.note, None) == "advanced"
    other = history(b"b", 8)
    async with aiohttp.ClientSession() as session:
        outcome = await w.observe(other.published.note, TileClient(await tile_server(aiohttp_server, other), session))
    assert outcome == "split view"
    (record,) = [json.loads(e) for e in w.state.evidence()]
    assert record["other"] == other.published.note.decode() and record["reason"].startswith("inconsistent")
    assert w.state.is_frozen(LOG_KEY.name)
