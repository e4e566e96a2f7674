"""The witness's HTTP API: POST /add-checkpoint and GET /<hex sha256(origin)>/checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from tlog.errors import (
    BodyTimeoutError,
    MalformedError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)
from tlog.httplimits import body_limit
from tlog.metrics import install
from tlog.server import errors_middleware_for
from tlog.witness_protocol import MAX_REQUEST_BYTES

from .errors import Conflict, WitnessError
from .gossip import DEFAULT_GOSSIP_INTERVAL, Gossip
from .witness import Witness

WITNESS = web.AppKey("witness", Witness)
GOSSIP = web.AppKey("gossip", Gossip)


# Errors that are not WitnessErrors (those carry their c2sp.org/tlog-witness status); subclasses first.
STATUS: list[tuple[type[TlogError], int]] = [
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (TlogError, 500),
]


def witness_error_response(e: TlogError) -> web.Response:
    """c2sp.org/tlog-witness statuses (witness/errors.py); malformed input is 400."""
    if isinstance(e, Conflict):  # body= keeps the exact type; text= would add a charset
        return web.Response(status=409, body=f"{e.known_size}\n".encode(), headers={"Content-Type": "text/x.tlog.size"})
    status = e.status if isinstance(e, WitnessError) else next(status for cls, status in STATUS if isinstance(e, cls))
    return web.Response(status=status, text=f"{e}\n")


async def add_checkpoint(request: web.Request) -> web.Response:
    cosignature = await request.app[WITNESS].add_checkpoint(await request.read())
    return web.Response(body=cosignature, headers={"Content-Type": "text/plain; charset=utf-8"})


async def get_checkpoint(request: web.Request) -> web.Response:
    witness = request.app[WITNESS]
    origin = witness.by_origin_hash.get(request.match_info["origin_hash"])
    note = None if origin is None else witness.state.cosigned_checkpoint(origin)
    if note is None:
        raise web.HTTPNotFound(text="no cosigned checkpoint for that log\n")
    return web.Response(body=note, headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "public, max-age=60"})


async def get_evidence(request: web.Request) -> web.Response:
    records = await asyncio.to_thread(request.app[WITNESS].state.evidence)
    return web.Response(body=b"[" + b",".join(records) + b"]", content_type="application/json")


def make_app(
    witness: Witness, *, peers: Sequence[str] = (), gossip_interval: float = DEFAULT_GOSSIP_INTERVAL
) -> web.Application:
    """The witness app; with peers, a gossip task runs while the app runs."""

    async def run_gossip(app: web.Application) -> AsyncIterator[None]:
        if not peers:
            yield
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            gossip = Gossip(witness, list(peers), session, interval=gossip_interval)
            app[GOSSIP] = gossip
            task = asyncio.create_task(gossip.run(), name="gossip")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = web.Application(middlewares=[errors_middleware_for(witness_error_response)])  # body limits are per route
    app[WITNESS] = witness
    app.cleanup_ctx.append(run_gossip)
    registry = install(app, "wasmlog_witness")
    Gauge("wasmlog_witness_split_view_evidence", "Split-view evidence records held", registry=registry).set_function(
        lambda: len(witness.state.evidence())
    )
    Gauge("wasmlog_witness_known_logs", "Logs in the log list", registry=registry).set_function(lambda: len(witness.logs))
    app.router.add_post("/add-checkpoint", body_limit(MAX_REQUEST_BYTES, add_checkpoint))
    app.router.add_get("/{origin_hash:[0-9a-f]{64}}/checkpoint", get_checkpoint)
    app.router.add_get("/evidence", get_evidence)
    return app
