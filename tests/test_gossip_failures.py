"""Gossip peers that cannot be reached or answer garbage are logged, counted, and named by /healthz."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from helpers import free_port

from tlog.note import ALG_COSIGNATURE_V1, MAX_NOTE_BYTES, Ed25519Signer, Ed25519Verifier
from witness.loglist import KnownLog
from witness.server import GOSSIP
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/gossiped")
W_KEY = Ed25519Signer.generate("w.example", ALG_COSIGNATURE_V1)


async def first_round_done(app: web.Application) -> None:
    """Wait (polling, with a deadline) until the gossip task's own first round has finished."""
    async with asyncio.timeout(30):
        while GOSSIP not in app or app[GOSSIP].rounds < 1:
            await asyncio.sleep(0.01)


async def garbage_peer(aiohttp_server, answer: dict[str, str]):  # type: ignore[no-untyped-def]
    """A peer that answers 200 with answer["body"] to every request, or 404 once answer["body"] is empty."""

    async def any_path(request: web.Request) -> web.Response:
        if not answer["body"]:
            raise web.HTTPNotFound()
        return web.Response(text=answer["body"])

    app = web.Application()
    app.router.add_get("/{tail:.*}", any_path)
    return await aiohttp_server(app)


async def test_unreachable_and_garbage_peers_are_logged_counted_and_unhealthy(aiohttp_server, aiohttp_client, tmp_path, caplog) -> None:
    answer = {"body": "this is not a checkpoint\n"}
    garbage = str((await garbage_peer(aiohttp_server, answer)).make_url("")).rstrip("/")
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    w = Witness(signer=W_KEY, logs={LOG_KEY.name: KnownLog(LOG_KEY.name, Ed25519Verifier(LOG_KEY.name, LOG_KEY.public_key), 86400)},
                state=WitnessState(str(tmp_path / "w")))
    app = make_witness_app(w, peers=[nobody, garbage], gossip_interval=3600, gossip_unhealthy_after=3)
    caplog.set_level(logging.INFO, logger="wasmlog.gossip")
    c = await aiohttp_client(app)
    await first_round_done(app)  # the task's round at start: failed round 1 of each peer

    outcomes = await app[GOSSIP].round()  # failed round 2
    assert outcomes[(nobody, LOG_KEY.name)].startswith("failed: unreachable")
    assert outcomes[(garbage, LOG_KEY.name)].startswith("rejected")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    noted = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    # An unreachable peer is noted, not warned about, while it is under the threshold (a network starting up) ...
    assert any(nobody in m and "unreachable" in m and "Connect" in m for m in noted), noted
    assert not any(nobody in m for m in warned), warned
    assert any(garbage in m and "rejected" in m for m in warned), warned  # ... garbage is warned about at once
    assert all(len(m) < 1000 for m in warned + noted)  # a peer's garbage is quoted, bounded
    assert (await c.get("/healthz")).status == 200  # two failed rounds are under the threshold

    caplog.clear()
    await app[GOSSIP].round()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(nobody in m and "unreachable" in m for m in warned), warned  # ... and warned about once it stays down
    r = await c.get("/healthz")
    text = await r.text()
    assert r.status == 503 and nobody in text and garbage in text and "3 rounds" in text
    metrics = await (await c.get("/metrics")).text()
    assert f'wasmlog_witness_gossip_fetches_total{{outcome="unreachable",peer="{nobody}"}} 3.0' in metrics
    assert f'wasmlog_witness_gossip_fetches_total{{outcome="bad-response",peer="{garbage}"}} 3.0' in metrics
    assert f'wasmlog_witness_gossip_peer_failed_rounds{{peer="{nobody}"}} 3.0' in metrics

    answer["body"] = "x" * (MAX_NOTE_BYTES + 1)  # over the note bound: garbage too
    assert (await app[GOSSIP].round())[(garbage, LOG_KEY.name)].startswith("failed: bad-response")
    answer["body"] = ""  # the garbage peer now answers 404 (it has no checkpoint): healthy again
    await app[GOSSIP].round()
    text = await (await c.get("/healthz")).text()
    assert nobody in text and garbage not in text
    assert f'outcome="not-found",peer="{garbage}"' in await (await c.get("/metrics")).text()


async def test_a_peer_answering_not_http_is_a_bad_response(aiohttp_client, tmp_path) -> None:
    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x01garbage\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    async with server:
        peer = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        w = Witness(signer=W_KEY, logs={LOG_KEY.name: KnownLog(LOG_KEY.name, Ed25519Verifier(LOG_KEY.name, LOG_KEY.public_key), 86400)},
                    state=WitnessState(str(tmp_path / "w")))
        app = make_witness_app(w, peers=[peer], gossip_interval=3600, gossip_unhealthy_after=2)
        c = await aiohttp_client(app)
        await first_round_done(app)
        assert (await app[GOSSIP].round())[(peer, LOG_KEY.name)].startswith("failed: bad-response")
        r = await c.get("/healthz")
        assert r.status == 503 and peer in await r.text()
