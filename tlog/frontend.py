"""HTTP front-end processes for ``wasmlog log serve --workers N`` (and the registry's).

The sequencing process listens on a private Unix socket only; N front-ends listen on the
public port (SO_REUSEPORT: the kernel spreads connections), forward entries over
tlog/addipc.py, and proxy every other request to the private socket, so every read reply,
status and header comes from the one process that owns the log. A front-end exits when the
sequencing process goes away.

The same supervision (supervised, exit_with_parent) runs the full-node processes of
`serve --workers N` on shared storage (wasmlog/common.py serve_nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web

from .addipc import AddClient, AddServer
from .httplimits import body_limit
from .server import ADD_BODY_LIMIT, errors_middleware, proof_response, read_entry

logger = logging.getLogger("wasmlog.frontend")

ADD_SOCKET = "add.sock"
HTTP_SOCKET = "http.sock"
ADD_CLIENT = web.AppKey("add_client", AddClient)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
# Hop-by-hop and framing headers are the proxy's own (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset(
    h.lower() for h in ("Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
                        "Upgrade", "Content-Length", "Host")
)
# request.read() returns the body decoded: it goes upstream without its Content-Encoding.
_NOT_FORWARDED = _HOP_BY_HOP | {"content-encoding"}
PROXY_BUFFER = 1 << 20  # upstream replies up to this size are sent whole; larger ones (blobs) are streamed
PROXY_CHUNK = 256 << 10


async def proxy(request: web.Request) -> web.StreamResponse:
    """Replay the request on the sequencing process's private socket; return its reply as it is.

    A request body is read within the route's limit (body_limit; none by default). A large
    reply is streamed through, so a front-end holds one chunk of it, not all of it."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
    body = await request.read() if request.body_exists else None
    async with request.app[UPSTREAM].request(request.method, request.rel_url, headers=headers, data=body) as r:
        out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_BY_HOP}
        if r.content_length is not None and r.content_length <= PROXY_BUFFER and request.method != "HEAD":  # a HEAD keeps its length
            return web.Response(status=r.status, body=await r.read(), headers=out)
        response = web.StreamResponse(status=r.status, headers=out)
        if r.content_length is not None:
            response.content_length = r.content_length
        await response.prepare(request)
        async for chunk in r.content.iter_chunked(PROXY_CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


def frontend_context(
    ipc_dir: str, clients: Mapping[web.AppKey[AddClient], str]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: connect each AddClient to its socket in ipc_dir and the upstream
    session to the private HTTP socket; SIGTERM this process when the sequencing process goes away."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        for key, name in clients.items():
            client = AddClient()
            await client.connect(os.path.join(ipc_dir, name))
            app[key] = client
        connector = aiohttp.UnixConnector(path=os.path.join(ipc_dir, HTTP_SOCKET))
        # auto_decompress off: gzip entry bundles pass through as the log encoded them.
        app[UPSTREAM] = aiohttp.ClientSession("http://log", connector=connector, auto_decompress=False)

        async def exit_with_upstream() -> None:
            await asyncio.wait([asyncio.ensure_future(app[k].closed.wait()) for k in clients], return_when="FIRST_COMPLETED")
            os.kill(os.getpid(), signal.SIGTERM)  # run_app shuts down cleanly

        watcher = asyncio.create_task(exit_with_upstream())
        yield
        watcher.cancel()
        await app[UPSTREAM].close()
        for key in clients:
            await app[key].close()

    return run


async def forward_add(request: web.Request) -> web.Response:
    return proof_response(await request.app[ADD_CLIENT].add(await read_entry(request)))


def make_frontend_app(ipc_dir: str) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app.cleanup_ctx.append(frontend_context(ipc_dir, {ADD_CLIENT: ADD_SOCKET}))
    app.router.add_post("/add", body_limit(ADD_BODY_LIMIT, forward_add))
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


SUPERVISE_INTERVAL = 1.0  # seconds between checks that every supervised process still runs (and that our parent does)
STOP_SECONDS = 10.0  # a supervised process gets this long after SIGTERM, then SIGKILL
RESTART_MAX_SECONDS = 60.0  # the longest wait before another is started in place of a process that keeps dying young


def restart_delay(previous: float, lived: float) -> float:
    """Seconds to wait before starting another process in place of one that lived `lived` seconds, the wait
    before it having been `previous`: none after a process that lived RESTART_MAX_SECONDS, else doubling from
    SUPERVISE_INTERVAL up to RESTART_MAX_SECONDS (a process that dies at start, its database away say, costs
    ~1 s of CPU to start: restarted every second, each such one took a core)."""
    if lived >= RESTART_MAX_SECONDS:
        return 0.0
    return min(max(2 * previous, SUPERVISE_INTERVAL), RESTART_MAX_SECONDS)


def supervised(command: list[str], count: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: run count processes of `python -m <command>`, start another when one dies
    (later and later while they keep dying young: restart_delay), and stop them all (SIGTERM, then SIGKILL
    after STOP_SECONDS) when the app stops."""

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", *command])

    async def run(app: web.Application) -> AsyncIterator[None]:
        procs = [spawn() for _ in range(count)]
        started = [time.monotonic()] * count
        delays = [0.0] * count
        due: list[float | None] = [None] * count  # when another process is started in place of a dead one

        async def supervise() -> None:
            while True:
                await asyncio.sleep(SUPERVISE_INTERVAL)
                now = time.monotonic()
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        continue
                    if due[i] is None:
                        delays[i] = restart_delay(delays[i], now - started[i])
                        due[i] = now + delays[i]
                        logger.warning("process %d (%s) exited with status %s; starting another in %.0f s",
                                       p.pid, " ".join(command[:3]), p.returncode, delays[i])
                    if now >= (due[i] or 0.0):
                        procs[i], started[i], due[i] = spawn(), now, None

        supervisor = asyncio.create_task(supervise(), name="supervisor")
        try:
            yield
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    await asyncio.to_thread(p.wait, STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    p.kill()

    return run


def front_ends(
    ipc_dir: str, command: list[str], count: int, servers: Mapping[str, Callable[[web.Application], AddServer]]
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context for the sequencing process: start each AddServer on its socket in ipc_dir,
    then the count front-end processes (supervised); stop them, then the servers, when the app stops."""
    processes = supervised(command, count)

    async def run(app: web.Application) -> AsyncIterator[None]:
        started = [await make(app).start(os.path.join(ipc_dir, name)) for name, make in servers.items()]
        try:
            async with contextlib.asynccontextmanager(processes)(app):
                yield
        finally:
            for server in started:
                server.close()

    return run


def exit_with_parent(parent: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context for a supervised process: SIGTERM itself once its parent (pid) is gone, so that
    no process outlives the one that started it, even a killed one."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        async def watch() -> None:
            while True:
                await asyncio.sleep(SUPERVISE_INTERVAL)
                if os.getppid() != parent:
                    break
            logger.warning("process %d that started this one is gone: stopping", parent)
            os.kill(os.getpid(), signal.SIGTERM)  # run_app shuts down cleanly

        watcher = asyncio.create_task(watch(), name="parent-watch")
        yield
        watcher.cancel()

    return run
