"""The witness's HTTP API: POST /add-checkpoint, GET /<hex sha256(origin)>/checkpoint, /evidence, /healthz."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import Counter, Gauge

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

from .errors import (
    BadProof,
    BadRequest,
    Conflict,
    Forbidden,
    Frozen,
    TooManyRequests,
    UnknownOrigin,
)
from .gossip import DEFAULT_GOSSIP_INTERVAL, DEFAULT_UNHEALTHY_AFTER, Gossip
from .ratelimit import client_key
from .witness import Witness

WITNESS = web.AppKey("witness", Witness)
GOSSIP = web.AppKey("gossip", Gossip)


# Every error maps to one status here, and only here (c2sp.org/tlog-witness for the witness's own
# refusals; malformed input is 400); subclasses come before their bases.
STATUS: list[tuple[type[TlogError], int]] = [
    (BadRequest, 400),
    (Forbidden, 403),
    (UnknownOrigin, 404),
    (Conflict, 409),
    (BadProof, 422),
    (Frozen, 422),
    (TooManyRequests, 429),
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (TlogError, 500),
]


def witness_status(e: TlogError) -> int:
    return next(status for cls, status in STATUS if isinstance(e, cls))


def witness_error_response(e: TlogError) -> web.Response:
    if isinstance(e, Conflict):  # the latest cosigned size; body= keeps the exact type (text= would add a charset)
        return web.Response(status=witness_status(e), body=f"{e.known_size}\n".encode(), headers={"Content-Type": "text/x.tlog.size"})
    return web.Response(status=witness_status(e), text=f"{e}\n")


@dataclass(frozen=True)
class RequestMetrics:
    refused: Counter  # by status: charged to the client, never to the log's qpd
    rate_limited: Counter  # by scope: "log" (its qpd) or "client" (its refused requests)


METRICS = web.AppKey("witness_request_metrics", RequestMetrics)


async def add_checkpoint(request: web.Request) -> web.Response:
    metrics, witness, client = request.app[METRICS], request.app[WITNESS], client_key(request.remote)
    try:
        cosignature = await witness.add_checkpoint(await request.read(), client)
    except TooManyRequests as e:
        metrics.rate_limited.labels(e.scope).inc()
        raise
    except TlogError as e:
        metrics.refused.labels(str(witness_status(e))).inc()
        raise
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


async def get_healthz(request: web.Request) -> web.Response:
    """200; 503 naming every gossip peer that failed too many rounds in a row."""
    gossip = request.app.get(GOSSIP)
    failing = gossip.unhealthy_peers() if gossip is not None else {}
    if failing:
        lines = "".join(f"gossip peer {p} failed {h.failed_rounds} rounds in a row: {h.last_error}\n" for p, h in failing.items())
        return web.Response(status=503, text=lines)
    return web.Response(text=f"ok: {len(request.app[WITNESS].logs)} logs\n")


def make_app(
    witness: Witness, *, peers: Sequence[str] = (), gossip_interval: float = DEFAULT_GOSSIP_INTERVAL,
    gossip_unhealthy_after: int = DEFAULT_UNHEALTHY_AFTER,
) -> web.Application:
    """The witness app; with peers, a gossip task runs while the app runs."""

    async def run_gossip(app: web.Application) -> AsyncIterator[None]:
        if not peers:
            yield
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            gossip = Gossip(witness, list(peers), session, interval=gossip_interval, unhealthy_after=gossip_unhealthy_after, registry=registry)
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
    Gauge("wasmlog_witness_refusal_clients", "Clients whose refused requests are being counted", registry=registry).set_function(
        lambda: len(witness.refusals)
    )
    app[METRICS] = RequestMetrics(
        Counter("wasmlog_witness_refused_requests", "add-checkpoint requests refused, by status", ["status"], registry=registry),
        Counter("wasmlog_witness_rate_limited_requests", "add-checkpoint requests answered 429, by scope (log qpd or client)", ["scope"],
                registry=registry),
    )
    app.router.add_post("/add-checkpoint", body_limit(MAX_REQUEST_BYTES, add_checkpoint))
    app.router.add_get("/{origin_hash:[0-9a-f]{64}}/checkpoint", get_checkpoint)
    app.router.add_get("/evidence", get_evidence)
    app.router.add_get("/healthz", get_healthz)
    return app
