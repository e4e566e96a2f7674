"""Resource bounds shared by every HTTP server we run (log, registry, witness, mirror, front-ends).

- ServerLimits: the server's bounds (header, body and write timeouts, concurrent connections),
  applied where a server starts (start_server / serve).
- GuardedProtocol wraps aiohttp's per-connection handler: beyond the connection cap it answers
  503 and closes; a connection that sends no complete request head within the header timeout is
  closed (aiohttp's keep-alive timeout, set to the same value, covers the wait between requests);
  a connection whose response writes stall (the client does not read) for the write timeout is
  aborted.
- Request bodies: a route takes no body unless it is registered with body_limit(n, handler);
  guard_request, run by every server's error middleware, refuses an announced length over the
  limit (413) and any Content-Encoding but gzip/deflate (415), caps reading at the limit *after*
  decoding (aiohttp >= 3.13.3 inflates in bounded steps under flow control; request.read() stops
  at the request's client_max_size), and ends a body that does not arrive within the body
  timeout with 408 and a closed connection.
- send_file streams a file (from disk, or a bucket) in chunks; each write waits under the write timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .errors import (
    BodyTimeoutError,
    MalformedError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)

logger = logging.getLogger("wasmlog.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ServerLimits:
    """Per-server bounds. Every value is per process (each front-end process has its own)."""

    header_timeout: float = 20.0  # a request head must arrive within this of connecting or of the last response
    body_timeout: float = 60.0  # a request body must arrive within this of its head
    write_timeout: float = 30.0  # a response write may wait this long for the client to read
    max_connections: int = 1024  # open connections; more are answered 503 and closed

    def handler_args(self) -> dict[str, Any]:
        """aiohttp RequestHandler arguments: keep-alive idle time is the header timeout."""
        return {"keepalive_timeout": self.header_timeout}

    def as_args(self) -> list[str]:
        """The command-line flags that give these limits (for child processes)."""
        return [
            "--header-timeout", str(self.header_timeout), "--body-timeout", str(self.body_timeout),
            "--write-timeout", str(self.write_timeout), "--max-connections", str(self.max_connections),
        ]


DEFAULT_LIMITS = ServerLimits()
LIMITS = web.AppKey("server_limits", ServerLimits)

# --- connections ---------------------------------------------------------------------------

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


class ConnectionCount:
    """The open connections of one server (shared by its sites)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.open = 0


class GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's request handler for one connection; see the module docstring."""

    def __init__(self, inner: asyncio.Protocol, count: ConnectionCount) -> None:
        self.inner, self.count, self.limits = inner, count, count.limits
        self.transport: asyncio.Transport | None = None
        self.counted = False
        self.head_seen = False
        self.tail = b""
        self.head_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        if self.count.open >= self.limits.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self.count.open += 1
        self.counted = True
        self.head_timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._abort)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.counted:
            return
        if not self.head_seen:  # only the first head: aiohttp's keep-alive timeout covers the next ones
            seen = self.tail + data
            if any(end in seen for end in _HEAD_ENDS):
                self.head_seen = True
                self._cancel("head_timer")
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        if self.counted:
            if self.write_timer is None:
                self.write_timer = asyncio.get_running_loop().call_later(self.limits.write_timeout, self._abort)
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
            self._cancel("write_timer")
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.counted:
            return
        self.counted = False
        self.count.open -= 1
        self._cancel("head_timer")
        self._cancel("write_timer")
        self.inner.connection_lost(exc)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class GuardedSite(web.BaseSite):
    """A TCP (host, port) or Unix-socket (path) site whose connections pass through GuardedProtocol."""

    def __init__(self, runner: web.BaseRunner, count: ConnectionCount, *, host: str | None = None, port: int = 0,
                 path: str | None = None, reuse_port: bool = False) -> None:
        super().__init__(runner)
        self.count, self.host, self.port, self.path, self.reuse_port = count, host, port, path, reuse_port

    @property
    def name(self) -> str:
        return f"http://unix:{self.path}:" if self.path else f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def factory() -> GuardedProtocol:
            return GuardedProtocol(server(), self.count)

        loop = asyncio.get_running_loop()
        if self.path:
            self._server = await loop.create_unix_server(factory, self.path)
        else:
            self._server = await loop.create_server(factory, self.host, self.port, reuse_port=self.reuse_port or None)
            sock: socket.socket = self._server.sockets[0]
            self.port = sock.getsockname()[1]


@contextlib.contextmanager
def claimed_port(host: str | None, port: int) -> Iterator[None]:
    """For the first process of a group that will share (host, port) with SO_REUSEPORT, around all
    of the group's serving: raise OSError(EADDRINUSE) when anyone else has the port bound (a bind
    without SO_REUSEPORT fails, as a lone server's would), else hold the port until the block ends.

    Without this, a second group (same user, SO_REUSEPORT too) would silently share the port. The
    port is held by sockets bound with SO_REUSEPORT, without SO_REUSEADDR and not listening: they
    take no connections, let the group's own listeners bind, and make this check fail for any
    other group. Connections of an earlier run in TIME_WAIT do not count (the probe sets
    SO_REUSEADDR, as servers do); if they keep a claim from binding, the probe is all there is."""
    with contextlib.ExitStack() as claims:
        for family, kind, proto, _, addr in set(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
            with socket.socket(family, kind, proto) as probe:
                _v6only(probe)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(addr)
                except OSError as e:
                    if e.errno == errno.EADDRNOTAVAIL:
                        continue  # as create_server: a family not enabled here is not served either
                    if e.errno != errno.EADDRINUSE:
                        raise
                    raise OSError(errno.EADDRINUSE, f"{host or '*'}:{port} is already in use by another process"
                                  " (another server or --workers group?): stop it or choose another --listen") from None
            claim = claims.enter_context(socket.socket(family, kind, proto))
            _v6only(claim)
            claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with contextlib.suppress(OSError):
                claim.bind(addr)
        yield


def _v6only(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET6:  # as asyncio's create_server: IPv4 is bound on its own
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


async def start_server(app: web.Application, limits: ServerLimits, host: str | None = None, port: int | None = None, *,
                       path: str | None = None, reuse_port: bool = False) -> tuple[web.AppRunner, list[GuardedSite]]:
    """Start app on (host, port) when port is given (0: any free port, read it from the returned
    site) and on the Unix socket path when given, under limits. The caller cleans up the runner."""
    app[LIMITS] = limits
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **limits.handler_args())
    await runner.setup()
    count = ConnectionCount(limits)
    sites = []
    if port is not None:
        sites.append(GuardedSite(runner, count, host=host, port=port, reuse_port=reuse_port))
    if path is not None:
        sites.append(GuardedSite(runner, count, path=path))
    try:
        for site in sites:
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, sites


async def serve(app: web.Application, limits: ServerLimits, host: str | None, port: int | None, *,
                path: str | None = None, reuse_port: bool = False) -> None:
    """Serve app until SIGINT or SIGTERM, then shut down cleanly (the app's cleanup contexts run)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, _ = await start_server(app, limits, host, port, path=path, reuse_port=reuse_port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# --- request bodies ------------------------------------------------------------------------

NO_BODY = 0
DECODABLE = frozenset({"identity", "gzip", "x-gzip", "deflate"})
_MAX_BODY = "wasmlog_max_body"
_COMPRESSED = "wasmlog_compressed_body"


def body_limit(max_bytes: int, handler: Handler, *, compressed: bool = True) -> Handler:
    """handler, accepting a request body of up to max_bytes (after Content-Encoding decoding).

    compressed=False refuses gzip/deflate bodies (415): for routes with large limits, where a
    small compressed body could make the server decode and buffer max_bytes."""
    if max_bytes <= 0:
        raise ValueError("a body limit is positive (routes take no body unless given one)")

    @functools.wraps(handler)
    async def limited(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    setattr(limited, _MAX_BODY, max_bytes)
    setattr(limited, _COMPRESSED, compressed)
    return limited


def route_body_limit(request: web.Request) -> tuple[int, bool]:
    """The route's body limit and whether it takes compressed bodies."""
    handler = request.match_info.handler
    return int(getattr(handler, _MAX_BODY, NO_BODY)), bool(getattr(handler, _COMPRESSED, False))


def content_encoding(request: web.Request) -> str:
    return request.headers.get("Content-Encoding", "identity").strip().lower()


def _encoded_bound(limit: int) -> int:
    """The most bytes a gzip/deflate encoding of limit bytes can take (stored blocks: 5 bytes per 16 KiB)."""
    return limit + 5 * (limit // 16384 + 1) + 64


@contextlib.asynccontextmanager
async def guard_request(request: web.Request) -> AsyncIterator[tuple[web.Request, Callable[[], bool]]]:
    """Check the request body against its route's limit and arm the body timeout.

    Yields the request to hand on (reads capped at the limit) and a function telling whether
    the body timed out. Raises TooLargeError, UnsupportedEncodingError, and turns aiohttp's
    body errors (bad chunking or encoding, a read over the limit) into our typed errors.
    """
    if request.match_info.http_exception is not None or not request.body_exists:
        yield request, lambda: False
        return
    limit, compressed = route_body_limit(request)
    encoding = content_encoding(request)
    if encoding not in DECODABLE:
        raise UnsupportedEncodingError(f"Content-Encoding {encoding[:40]!r} is not accepted (gzip or deflate only)")
    if encoding != "identity" and limit != NO_BODY and not compressed:
        raise UnsupportedEncodingError(f"{request.path} takes no compressed body (Content-Encoding {encoding})")
    if limit == NO_BODY:
        raise TooLargeError(f"{request.method} {request.path} takes no request body")
    announced = request.content_length
    if announced is not None and announced > (limit if encoding == "identity" else _encoded_bound(limit)):
        raise TooLargeError(f"request body of {announced} bytes is over this route's {limit}")
    if announced is not None and announced <= request.client_max_size and encoding == "identity" and request.content.is_eof():
        yield request, lambda: False  # the whole body is here, within the limit: nothing to cap or time
        return
    limits = request.config_dict.get(LIMITS, DEFAULT_LIMITS)
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        if not request.content.is_eof():
            timed_out = True
            request.content.set_exception(BodyTimeoutError(f"request body not received within {limits.body_timeout:g}s"))

    timer = asyncio.get_running_loop().call_later(limits.body_timeout, expire)
    try:
        yield request.clone(client_max_size=limit), lambda: timed_out
    except web.HTTPRequestEntityTooLarge:
        raise TooLargeError(f"request body is over this route's {limit} bytes (after decoding)") from None
    except (RequestPayloadError, HttpProcessingError) as e:
        raise MalformedError("request body: " + " ".join(str(getattr(e, "message", None) or e).split())) from None
    finally:
        timer.cancel()


async def close_after(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send response, then close the connection without reading the rest of the request body."""
    response.force_close()
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response


def unread_encoded_body(request: web.Request) -> bool:
    """A compressed body not read to its end: answer and close rather than linger, which would inflate it."""
    return content_encoding(request) != "identity" and not request.content.is_eof()


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- files ---------------------------------------------------------------------------------

FILE_CHUNK = 256 << 10


class SizedReader(Protocol):
    """What send_file streams: size bytes, read(n) at most n at a time (blocking; b"" at the end)."""

    @property
    def size(self) -> int: ...

    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


async def send_file(request: web.Request, f: SizedReader, headers: dict[str, str], *, status: int = 200) -> web.StreamResponse:
    """Stream f (closed here) in FILE_CHUNK pieces, read in a worker thread: memory per download stays
    one chunk plus the transport's buffer, and a client that stops reading is cut off by the write timeout.
    A read that fails once the head is sent (the status is said) cuts the connection: the client sees a
    short body, never a whole one."""
    try:
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = f.size
        await response.prepare(request)
        if request.method != "HEAD":
            while chunk := await _read_or_cut(request, f):
                await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        f.close()


async def _read_or_cut(request: web.Request, f: SizedReader) -> bytes:
    try:
        return await asyncio.to_thread(f.read, FILE_CHUNK)
    except (TlogError, OSError) as e:
        logger.warning("%s %s: reading the body failed after its head was sent: %s", request.method, request.path, e)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(f"the body could not be read: {e}") from e
