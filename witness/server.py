"""The witness's HTTP API: POST /add-checkpoint and GET /<hex sha256(origin)>/checkpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tlog.errors import MalformedError, TlogError

from .errors import Conflict, WitnessError
from tlog.witness_protocol import MAX_REQUEST_BYTES
from .witness import Witness

WITNESS = web.AppKey("witness", Witness)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Conflict as e:  # body= keeps the exact type; text= would add a charset
        return web.Response(status=409, body=f"{e.known_size}\n".encode(), headers={"Content-Type": "text/x.tlog.size"})
    except WitnessError as e:
        return web.Response(status=e.status, text=f"{e}\n")
    except (MalformedError, TlogError) as e:
        return web.Response(status=400, text=f"{e}\n")


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


def make_app(witness: Witness) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[errors_middleware])
    app[WITNESS] = witness
    app.router.add_post("/add-checkpoint", add_checkpoint)
    app.router.add_get("/{origin_hash:[0-9a-f]{64}}/checkpoint", get_checkpoint)
    return app
