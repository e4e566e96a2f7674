"""Peered witnesses: an honest log's newer checkpoint is adopted; a log that forks is caught."""

from __future__ import annotations

import hashlib
import json

from helpers import free_port

from tlog.cosignature import CosignatureV1Verifier
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Ed25519Verifier, open_note
from tlog.policy import parse_policy
from tlog.sequencer import Sequencer
from tlog.server import make_app as make_log_app
from tlog.storage.memory import MemoryLogStore
from tlog.witness_protocol import AddCheckpoint
from witness.loglist import KnownLog
from witness.server import GOSSIP
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/forked")
VERIFIER = Ed25519Verifier(LOG_KEY.name, LOG_KEY.public_key)
W_KEYS = [Ed25519Signer.generate(f"peer{i}.example", ALG_COSIGNATURE_V1) for i in range(2)]
ORIGIN_HASH = hashlib.sha256(LOG_KEY.name.encode()).hexdigest()



async def serve_log(aiohttp_server, witness_index: int, witness_port: int):  # type: ignore[no-untyped-def]
    """A log (in memory) whose checkpoints only witness_index cosigns."""
    w = W_KEYS[witness_index]
    policy = parse_policy(f"log {LOG_KEY.vkey}\nwitness W {w.vkey} http://127.0.0.1:{witness_port}\nquorum W\n".encode())
    log = Log(MemoryLogStore(), LOG_KEY, witnessed=True)
    server = await aiohttp_server(make_log_app(Sequencer(log, interval=0.01, republish_interval=3600), witness_policy=policy))
    return server, log


async def serve_witness(aiohttp_server, tmp_path, i: int, port: int, log_url: str, peer_port: int):  # type: ignore[no-untyped-def]
    w = Witness(
        signer=W_KEYS[i], logs={LOG_KEY.name: KnownLog(LOG_KEY.name, VERIFIER, 86400, url=log_url)},
        state=WitnessState(str(tmp_path / f"w{i}")),
    )
    app = make_witness_app(w, peers=[f"http://127.0.0.1:{peer_port}"], gossip_interval=3600)
    return await aiohttp_server(app, port=port), app


async def test_two_forks_are_caught_within_two_gossip_rounds(aiohttp_server, aiohttp_client, tmp_path) -> None:
    wp = [free_port(), free_port()]
    log_a, _ = await serve_log(aiohttp_server, 0, wp[0])
    log_b, _ = await serve_log(aiohttp_server, 1, wp[1])
    w0, app0 = await serve_witness(aiohttp_server, tmp_path, 0, wp[0], str(log_a.make_url("")), wp[1])
    w1, app1 = await serve_witness(aiohttp_server, tmp_path, 1, wp[1], str(log_b.make_url("")), wp[0])
    a, b = await aiohttp_client(log_a), await aiohttp_client(log_b)
    for i in range(3):  # the log shows one history to witness 0 and another to witness 1
        assert (await a.post("/add", data=b"history A %d" % i)).status == 200
        assert (await b.post("/add", data=b"history B %d" % i)).status == 200
    found = set()
    for _ in range(2):
        for name, app in (("w0", app0), ("w1", app1)):
            outcomes = await app[GOSSIP].round()
            if "split view" in outcomes.values() or "frozen" in outcomes.values():
                found.add(name)
    assert found == {"w0", "w1"}
    for w in (w0, w1):
        c = await aiohttp_client(w)
        evidence = json.loads(await (await c.get("/evidence")).read())
        assert len(evidence) == 1 and evidence[0]["origin"] == LOG_KEY.name
        assert "wasmlog_witness_split_view_evidence 1.0" in await (await c.get("/metrics")).text()
        # both sides of the evidence are checkpoints the log signed
        for side in ("cosigned", "other"):
            open_note(evidence[0][side].encode(), [VERIFIER])
        # and the witness cosigns neither side any more
        note = evidence[0]["other"].encode()
        size = int(evidence[0]["other"].split("\n")[1])
        r = await c.post("/add-checkpoint", data=AddCheckpoint(size, (), note).encode())
        assert r.status == 422


async def test_a_witness_behind_adopts_a_peers_newer_checkpoint_with_a_tile_proof(aiohttp_server, aiohttp_client, tmp_path) -> None:
    wp = [free_port(), free_port()]
    log_server, log = await serve_log(aiohttp_server, 1, wp[1])  # only witness 1 is asked to cosign
    url = str(log_server.make_url(""))
    w0, app0 = await serve_witness(aiohttp_server, tmp_path, 0, wp[0], url, wp[1])
    await serve_witness(aiohttp_server, tmp_path, 1, wp[1], url, wp[0])
    c = await aiohttp_client(log_server)
    for i in range(300):
        assert (await c.post("/add", data=b"entry %d" % i)).status == 200
    outcomes = await app0[GOSSIP].round()
    assert list(outcomes.values()) == ["advanced"]
    got = await (await aiohttp_client(w0)).get(f"/{ORIGIN_HASH}/checkpoint")
    note, verified = open_note(await got.read(), [VERIFIER, CosignatureV1Verifier(W_KEYS[0].name, W_KEYS[0].public_key)])
    assert note.text.split("\n")[1] == "300" and {s.name for s in verified} == {LOG_KEY.name, W_KEYS[0].name}
    assert (await app0[GOSSIP].round()) == {(f"http://127.0.0.1:{wp[1]}", LOG_KEY.name): "same"}
