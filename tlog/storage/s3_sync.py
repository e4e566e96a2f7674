"""Requests to an S3-compatible bucket from worker threads, without boto3's client.

boto3's client spends ~1.6 ms of CPU on each request; this one sends what storage/s3_endpoint.py
signs over the standard library's http.client, HTTP/1.1 with connections kept alive in a pool
(thread-safe: each request in flight holds one connection; a connection goes back to the pool only
after its response was read whole). A kept-alive connection the server has closed is dropped before
use when it shows as readable, and if the server turns out to have closed it anyway (the request
meets a reset or no answer at all), the request is sent once more on a fresh connection, not counted
as a failed attempt. Connection failures and 5xx answers are retried (ATTEMPTS in all, BACKOFF
apart), as boto3's standard mode does; the timeout bounds the connect and every read. An error
answer's body is read at most ERROR_BODY_BYTES. An interim answer other than 100 Continue (102, 103:
http.client would return it as the answer), or an answer whose Content-Length is repeated or not a
number (it would read the body by the first one, or until the server closes), fails the attempt and closes its connection.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from email.message import Message

from ..errors import StorageUnavailableError
from .s3_endpoint import ATTEMPTS, BACKOFF, RETRY_STATUSES, S3Endpoint

ERROR_BODY_BYTES = 4096
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")  # S3's XML error (not parsed as XML: it is only shown)
_MESSAGE = re.compile(rb"<Message>([^<]{0,200})")
_LENGTH = re.compile(r"[0-9]{1,18}")


class ObjectStream:
    """An object's body being read from the bucket: read(n) returns at most n bytes (b"" at the end).
    Raises StorageUnavailableError if the connection fails, or ends, before the body does. The
    caller closes it; its connection is kept for another request only if the body was read whole."""

    def __init__(self, path: str, response: http.client.HTTPResponse, release: Callable[[bool], None]) -> None:
        self._path, self._response, self._release = path, response, release
        self._failed = False

    def read(self, n: int) -> bytes:
        try:
            chunk: bytes = self._response.read(n)
        except (OSError, http.client.HTTPException) as e:
            self._failed = True
            raise StorageUnavailableError(f"reading {self._path}: {type(e).__name__}: {e}") from None
        if not chunk and n > 0 and self._response.length:  # http.client returns b"" when the connection ends early
            self._failed = True
            raise StorageUnavailableError(f"reading {self._path}: the connection ended {self._response.length} bytes before the object")
        return chunk

    def close(self) -> None:
        release, self._release = self._release, lambda _: None
        release(not self._failed and self._response.isclosed())


class Answer:
    """A response: status, headers, body (read whole for a 2xx answer unless streamed, else at most
    ERROR_BODY_BYTES), and the stream of a streamed 2xx answer."""

    def __init__(self, status: int, headers: Message, body: bytes, stream: ObjectStream | None = None) -> None:
        self.status, self.headers, self.body, self.stream = status, headers, body, stream

    @property
    def code(self) -> str:
        """S3's error code (NoSuchBucket, AccessDenied, ...) in an error answer's body; "" if none."""
        found = _CODE.search(self.body)
        return found.group(1).decode() if found else ""

    def describe(self) -> str:
        """What the answer says, for an error message: its status, error code and message."""
        message = _MESSAGE.search(self.body)
        said = message.group(1).decode(errors="replace") if message else self.body[:200].decode(errors="replace")
        return f"HTTP {self.status} {self.code}: {said}".replace(" :", ":")


class SyncBucket:
    """Signed requests to one bucket (S3Endpoint) over a pool of kept-alive connections.

    connections: how many idle connections are kept (more may be open while more requests are in
    flight); timeout: seconds to connect, and between bytes read, before an attempt fails."""

    def __init__(self, endpoint: S3Endpoint, *, connections: int, timeout: float) -> None:
        self.endpoint = endpoint
        self._keep, self._timeout = connections, timeout
        self._tls = ssl.create_default_context(cafile=endpoint.ca_bundle) if endpoint.scheme == "https" else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None, stream: bool = False) -> Answer:
        """Send method on the object at path; the answer, whatever its status, once it is not a 5xx.
        stream: a 2xx answer's body is left to read from answer.stream (which the caller closes).
        Raises MalformedError for a bad path, StorageUnavailableError once every attempt failed."""
        url_path = self.endpoint.path(path)
        payload_sha256 = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF * 2 ** (attempt - 1))
            signed = self.endpoint.signed(method, url_path, headers or {}, payload_sha256)
            try:
                answer = self._exchange(method, url_path, body, signed, path if stream else None)
            except (OSError, http.client.HTTPException) as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            if answer.status not in RETRY_STATUSES:
                return answer
            failure = answer.describe()
        raise StorageUnavailableError(f"{method} {path} in the bucket: {failure} ({ATTEMPTS} attempts)")

    def _exchange(self, method: str, url_path: str, body: bytes, headers: dict[str, str], stream: str | None) -> Answer:
        """One attempt: the answer, its body read (or streamed). Raises OSError or HTTPException."""
        conn, reused = self._take()
        while True:
            try:
                conn.request(method, url_path, body=body if method in ("PUT", "POST") else None, headers=headers)
                response = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if not (reused and isinstance(e, ConnectionError)):
                    raise
                conn, reused = self._connect(), False  # a kept-alive connection the server had closed: once more on a fresh one
        if response.status < 200:  # http.client skips only 100 Continue: the final answer would still follow on this connection
            conn.close()
            raise http.client.HTTPException(f"an interim answer ({response.status} {response.reason}) where only the final one is read")
        lengths = response.headers.get_all("Content-Length", [])
        if len(lengths) > 1 or (lengths and not _LENGTH.fullmatch(lengths[0].strip())):  # RFC 9112 6.3: unrecoverable
            conn.close()  # (http.client would read by the first one, or until the server closes)
            raise http.client.HTTPException(f"an answer with the Content-Length {', '.join(lengths)[:60]!r}")
        ok = 200 <= response.status < 300
        if ok and stream is not None:
            return Answer(response.status, response.headers, b"", ObjectStream(stream, response, lambda whole: self._give(conn, whole)))
        try:
            data = response.read() if ok else response.read(ERROR_BODY_BYTES)
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        self._give(conn, response.isclosed())
        return Answer(response.status, response.headers, data)

    def _connect(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(self.endpoint.host, timeout=self._timeout, context=self._tls)
        return http.client.HTTPConnection(self.endpoint.host, timeout=self._timeout)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (the most recently used, and True) or a new one (and False)."""
        while True:
            with self._lock:
                if not self._idle:
                    return self._connect(), False
                conn = self._idle.pop()
            if conn.sock is None:  # the server said Connection: close; http.client opens a new one
                return conn, False
            if not _readable(conn.sock):
                return conn, True
            conn.close()  # idle yet readable: the server closed it (or sent what nobody asked for)

    def _give(self, conn: http.client.HTTPConnection, whole: bool) -> None:
        """Back to the pool if its response was read whole (else nothing else may be read from it)."""
        if whole:
            with self._lock:
                if not self._closed and len(self._idle) < self._keep:
                    self._idle.append(conn)
                    return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (and those given back later)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
