"""The log's HTTP API: c2sp.org/tlog-tiles reads, POST /add, and proof endpoints.

Handlers are thin: they parse, call the Log or Sequencer (blocking work in
worker threads), and raise; one middleware maps errors to statuses.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from .addipc import ForwardedError
from .checkpoint import parse_decimal
from .errors import (
    BodyTimeoutError,
    MalformedError,
    NotFoundError,
    ProofError,
    PushbackError,
    StorageFullError,
    StorageUnavailableError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)
from .httplimits import (
    body_limit,
    client_gone,
    close_after,
    guard_request,
    unread_encoded_body,
)
from .log import Log
from .metrics import LogMetrics, install
from .note import b64encode
from .policy import Policy
from .sequencer import Sequencer
from .tiles import CHECKPOINT_CACHE, ENTRIES, IMMUTABLE, MAX_ENTRY_SIZE, parse_tile_path
from .witnessing import DEFAULT_WITNESS_TIMEOUT, Cosigner, QuorumError

LOG = web.AppKey("log", Log)
SEQUENCER = web.AppKey("sequencer", Sequencer)
BUNDLE_CACHE = web.AppKey("bundle_cache", OrderedDict)
LOG_METRICS = web.AppKey("log_metrics", LogMetrics)
MAX_CHECKPOINT_AGE: web.AppKey[float | None] = web.AppKey("max_checkpoint_age")

logger = logging.getLogger("wasmlog.server")

RETRY_AFTER_SECONDS = 1
BUNDLE_CACHE_SIZE = 256

# Every TlogError maps to one status here (the order matters: subclasses first).
STATUS: list[tuple[type[TlogError], int]] = [
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (ProofError, 400),
    (NotFoundError, 404),
    (PushbackError, 503),
    (QuorumError, 503),  # the entry is durable; its checkpoint waits for witnesses
    (StorageFullError, 507),
    (StorageUnavailableError, 503),  # the shared database or bucket: nothing was acknowledged, retry
    (TlogError, 500),
]


def status_for(e: TlogError) -> int:
    if isinstance(e, ForwardedError):
        return e.forwarded_status  # already mapped by the sequencing process's table
    return next(status for cls, status in STATUS if isinstance(e, cls))


def error_response(e: TlogError) -> web.Response:
    status = status_for(e)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    return web.Response(status=status, text=f"{e}\n", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def errors_middleware_for(respond: Callable[[TlogError], web.Response]) -> Middleware:
    """A middleware turning every TlogError into respond(e): each server's one status table.

    It also applies the route's body limit and the body timeout (tlog/httplimits.py), so every
    server built on it bounds its request bodies. Any other exception is logged here and answered
    respond(TlogError("internal error")): no traceback reaches a client.
    """

    @web.middleware
    async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        timed_out: Callable[[], bool] = lambda: False
        try:
            async with guard_request(request) as (guarded, timed_out):
                response = await handler(guarded)
        except TlogError as e:
            response = respond(e)
            if response.status >= 500:
                logger.warning("%s %s: %s", request.method, request.path, e)
        except web.HTTPException as e:  # aiohttp's own (404, 405, ...) and handlers'
            if not unread_encoded_body(request):
                raise
            response = web.Response(status=e.status, body=e.body, content_type=e.content_type)
        except ConnectionError:
            if not client_gone(request):
                raise
            return web.Response(status=400)  # nobody reads it: the client went away
        except Exception:
            logger.exception("%s %s: unexpected error", request.method, request.path)
            response = respond(TlogError("internal error"))
        if timed_out() or (response.status >= 400 and unread_encoded_body(request)):
            return await close_after(request, response)  # no lingering: the rest could be a slow trickle or a bomb
        return response

    return errors_middleware


errors_middleware = errors_middleware_for(error_response)


def query_int(request: web.Request, name: str) -> int:
    values = request.query.getall(name, [])
    if len(values) != 1:
        raise MalformedError(f"want exactly one {name} parameter")
    return parse_decimal(values[0], name)


def hash_lines(hashes: list[bytes]) -> web.Response:
    return web.Response(text="".join(b64encode(h) + "\n" for h in hashes), content_type="text/plain")


async def get_checkpoint(request: web.Request) -> web.Response:
    note = request.app[LOG].published.note
    if not note:
        raise NotFoundError("no checkpoint is published yet (waiting for the witness quorum)")
    return web.Response(
        body=note,
        headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": CHECKPOINT_CACHE},
    )


async def get_tile(request: web.Request) -> web.Response:
    tile = parse_tile_path("tile/" + request.match_info["tail"])
    log = request.app[LOG]
    headers = {"Content-Type": "application/octet-stream", "Cache-Control": IMMUTABLE}
    if tile.level != ENTRIES:
        return web.Response(body=await asyncio.to_thread(log.read_tile, tile), headers=headers)
    # c2sp.org/tlog-tiles: entry bundles SHOULD be compressed; we gzip when the client accepts it.
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "")
    cache = request.app[BUNDLE_CACHE]
    key = (tile, gzip_ok)
    body = cache.get(key)
    if body is None:
        raw = await asyncio.to_thread(log.read_tile, tile)
        body = await asyncio.to_thread(gzip.compress, raw, 6, mtime=0) if gzip_ok else raw
        cache[key] = body
        if len(cache) > BUNDLE_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        log.check_tile(tile)  # a cached bundle is served only while its size is published
    if gzip_ok:
        headers["Content-Encoding"] = "gzip"
    headers["Vary"] = "Accept-Encoding"
    return web.Response(body=body, headers=headers)


ADD_BODY_LIMIT = MAX_ENTRY_SIZE + 1  # a body one byte over the entry limit is enough to answer 413 ourselves


async def read_entry(request: web.Request) -> bytes:
    """The body of POST /add (routed with body_limit(ADD_BODY_LIMIT)): 1 to MAX_ENTRY_SIZE bytes.
    Raises TooLargeError or MalformedError."""
    entry = await request.read()
    if len(entry) > MAX_ENTRY_SIZE:
        raise TooLargeError(f"entry over {MAX_ENTRY_SIZE} bytes")
    if not entry:
        raise MalformedError("empty entry")
    return entry


def proof_response(proof: bytes) -> web.Response:
    return web.Response(body=proof, headers={"Content-Type": "text/plain; charset=utf-8"})


async def post_add(request: web.Request) -> web.Response:
    return proof_response(await request.app[SEQUENCER].add(await read_entry(request)))


async def get_inclusion(request: web.Request) -> web.Response:
    index, size = query_int(request, "index"), query_int(request, "size")
    return hash_lines(await asyncio.to_thread(request.app[LOG].inclusion_proof, index, size))


async def get_consistency(request: web.Request) -> web.Response:
    old, new = query_int(request, "old"), query_int(request, "new")
    return hash_lines(await asyncio.to_thread(request.app[LOG].consistency_proof, old, new))


def add_routes(app: web.Application, *, writable: bool) -> None:
    app.router.add_routes(
        [
            web.get("/checkpoint", get_checkpoint),
            web.get("/tile/{tail:.+}", get_tile),
            web.get("/proof/inclusion", get_inclusion),
            web.get("/proof/consistency", get_consistency),
        ]
    )
    if writable:
        app.router.add_post("/add", body_limit(ADD_BODY_LIMIT, post_add))


async def get_healthz(request: web.Request) -> web.Response:
    """200 while the log publishes; 503 when a witnessed log's checkpoint is older than the bound."""
    log, metrics, bound = request.app[LOG], request.app[LOG_METRICS], request.app[MAX_CHECKPOINT_AGE]
    age = metrics.age()
    if log.witnessed and bound is not None and (age > bound or not log.published.note):
        return web.Response(status=503, text=f"checkpoint is {age:.0f}s old (bound {bound}s)\n")
    role = "integrating" if request.app[SEQUENCER].leading else "following the integrator"
    return web.Response(text=f"ok: size {log.published.checkpoint.size}, checkpoint {age:.0f}s old, {role}\n")


def make_app(
    sequencer: Sequencer, *, witness_policy: Policy | None = None, witness_timeout: float = DEFAULT_WITNESS_TIMEOUT,
    writable: bool = True, max_checkpoint_age: float | None = None,
) -> web.Application:
    """The log app. The sequencer runs while the app runs; the caller owns the log's store.

    With a witness policy, checkpoints are published only once its quorum cosigned them.
    writable=False leaves out POST /add (an application, like the registry, appends instead).
    """
    if witness_policy is not None and not sequencer.log.witnessed:
        raise TlogError("a witnessed log needs Log(witnessed=True)")

    async def run_sequencer(app: web.Application) -> AsyncIterator[None]:
        if witness_policy is None:
            async with sequencer.running():
                yield
            return
        timeout = aiohttp.ClientTimeout(total=witness_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sequencer.cosigner = Cosigner(witness_policy, session, timeout=witness_timeout)
            sequencer.cosigner.on_result = metrics.witness_result
            async with sequencer.running():
                yield

    app = web.Application(middlewares=[errors_middleware])  # body limits are per route (body_limit)
    app[LOG] = sequencer.log
    app[SEQUENCER] = sequencer
    app[BUNDLE_CACHE] = OrderedDict()
    app[MAX_CHECKPOINT_AGE] = max_checkpoint_age
    metrics = LogMetrics(install(app, "wasmlog_log"))
    metrics.entries.set_function(lambda: sequencer.log.integrated.checkpoint.size)
    metrics.published_size.set_function(lambda: sequencer.log.published.checkpoint.size)
    metrics.checkpoint_age.set_function(metrics.age)
    app[LOG_METRICS] = metrics
    sequencer.observer = metrics
    app.cleanup_ctx.append(run_sequencer)
    add_routes(app, writable=writable)
    app.router.add_get("/healthz", get_healthz)
    return app
