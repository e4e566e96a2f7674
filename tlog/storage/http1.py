"""Kept-alive HTTP/1.1 connections to one origin, for small requests from the event loop.

A bucket write is one signed PUT with a small answer, and a registry makes one per publish. aiohttp's
client spends ~0.2 ms of CPU per such request on its own machinery (request and response objects,
URL building, payload registry, tracing hooks, timers), as much as the rest of the PUT; this sends the
request as one writev and reads the answer with the pure tlog/http_answer.py. It does only what the
bucket clients need: one request at a time per connection (no pipelining), answers up to a bound held
in memory, http or https, no redirects, no cookies, no proxies. A kept-alive connection the server
closed meanwhile is replaced by a new one once, before any byte of an answer came (requests sent
through it must be idempotent: the bucket's are).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from ..http_answer import Answer, MalformedAnswerError, parse_answer

CONNECT_TIMEOUT = 10.0  # seconds to connect
TIMEOUT = 60.0  # seconds for a whole request and its answer


class StaleConnectionError(ConnectionError):
    """The connection closed before any byte of an answer came."""


class _Connection(asyncio.Protocol):
    """One connection carrying one request at a time."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.head_only = False
        self.closed = False
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self.received += data
        self._answered(at_eof=False)

    def eof_received(self) -> bool:
        self._ended()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._ended()

    def _ended(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            if not self.received:
                self.waiter.set_exception(StaleConnectionError("the connection closed before an answer"))
            else:
                self._answered(at_eof=True)

    def _answered(self, at_eof: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            if self.received and self.transport is not None:  # bytes nobody asked for: never reuse this connection
                self.transport.close()
            return
        try:
            answer = parse_answer(self.received, max_body=self.max_body, at_eof=at_eof, head_only=self.head_only)
        except MalformedAnswerError as e:  # the connection is of no further use
            waiter.set_exception(e)
            self.close()
            return
        if answer is not None:
            del self.received[: answer.used]
            self.reusable = answer.keep_alive and not self.received and not at_eof
            waiter.set_result(answer)

    async def exchange(self, head: bytes, body: bytes, head_only: bool, deadline: float) -> Answer:
        """Send a request and wait for its answer until deadline (the loop's time): TimeoutError then."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self.waiter = waiter
        self.head_only, self.reusable = head_only, False
        self.transport.writelines([head, body]) if body else self.transport.write(head)
        timer = loop.call_at(deadline, self._expire)  # one timer handle: cheaper than asyncio.timeout per request
        try:
            return await waiter
        finally:
            timer.cancel()

    def _expire(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TimeoutError("no whole answer in time"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Origin:
    """Requests to one origin (scheme://host[:port]), at most `connections` at once, each answer read
    whole (at most max_body bytes). Raises OSError for connection failures, TimeoutError, and
    MalformedAnswerError for an answer this cannot read."""

    def __init__(self, origin: str, *, connections: int, max_body: int = 1 << 20, timeout: float = TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, cafile: str | None = None) -> None:
        """cafile: the CA certificates an https origin is verified with (None: the system's)."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin[:100]!r}")
        self.host, self.port, self.authority = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), parts.netloc
        self._ssl = ssl.create_default_context(cafile=cafile) if parts.scheme == "https" else None
        self.max_body, self.timeout, self.connect_timeout = max_body, timeout, connect_timeout
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_Connection] = []

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(min(deadline, loop.time() + self.connect_timeout)):
            _, conn = await loop.create_connection(lambda: _Connection(self.max_body), self.host, self.port, ssl=self._ssl)
        return conn

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> Answer:
        """Send one request (target: the path, already encoded; headers without Content-Length; Host is the
        origin's unless given) and read its answer."""
        lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
        if "Host" not in headers:
            lines.insert(1, f"Host: {self.authority}")
        if body or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body)}")
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("a request line or header contains a line break")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with self._slots:
            while True:
                conn = self._take_idle()
                reused = conn is not None
                conn = conn or await self._connect(deadline)
                try:
                    answer = await conn.exchange(head, body, method == "HEAD", deadline)
                except StaleConnectionError:
                    conn.close()
                    if reused:
                        continue  # the server closed it while it was idle: once more on a new connection
                    raise
                except BaseException:
                    conn.close()
                    raise
                if conn.reusable:
                    self._idle.append(conn)
                else:
                    conn.close()
                return answer

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def close(self) -> None:
        """Close the idle connections (those in use close when their request ends)."""
        while self._idle:
            self._idle.pop().close()
