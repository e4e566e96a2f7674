"""HTTP front-end processes for ``wasmlog log serve --workers N``.

The sequencing process listens on the public port and on a private Unix socket; each
front-end listens on the same public port (SO_REUSEPORT: the kernel spreads connections),
forwards POST /add over tlog/addipc.py, and proxies every other request to the private
socket, so every reply, status and header comes from the one process that owns the log.
A front-end exits when the sequencing process goes away.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .addipc import AddClient
from .server import errors_middleware, proof_response, read_entry
from .tiles import MAX_ENTRY_SIZE

ADD_SOCKET = "add.sock"
HTTP_SOCKET = "http.sock"
ADD_CLIENT = web.AppKey("add_client", AddClient)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# Hop-by-hop and framing headers are the proxy's own (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
                        "Upgrade", "Content-Length", "Host")
)


async def forward_add(request: web.Request) -> web.Response:
    return proof_response(await request.app[ADD_CLIENT].add(await read_entry(request)))


async def proxy(request: web.Request) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    body = await request.read() if request.can_read_body else None
    async with request.app[UPSTREAM].request(request.method, request.rel_url, headers=headers, data=body) as r:
        data = await r.read()
        out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_BY_HOP}
        return web.Response(status=r.status, body=data, headers=out)


def make_frontend_app(ipc_dir: str) -> web.Application:
    async def connect(app: web.Application) -> AsyncIterator[None]:
        client = AddClient()
        await client.connect(os.path.join(ipc_dir, ADD_SOCKET))
        app[ADD_CLIENT] = client
        connector = aiohttp.UnixConnector(path=os.path.join(ipc_dir, HTTP_SOCKET))
        # auto_decompress off: gzip entry bundles pass through as the log encoded them.
        app[UPSTREAM] = aiohttp.ClientSession("http://log", connector=connector, auto_decompress=False)

        async def exit_with_upstream() -> None:
            await client.closed.wait()
            os.kill(os.getpid(), signal.SIGTERM)  # run_app shuts down cleanly

        watcher = asyncio.create_task(exit_with_upstream())
        yield
        watcher.cancel()
        await app[UPSTREAM].close()
        await client.close()

    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_ENTRY_SIZE + 1)
    app.cleanup_ctx.append(connect)
    app.router.add_post("/add", forward_add)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app
