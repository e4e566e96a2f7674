"""POST /add between HTTP front-end processes and the one process that sequences.

A front-end (``log serve --workers N``) parses HTTP and forwards each entry over a local
Unix stream socket; the sequencing process answers each with the status and body of
its HTTP reply. Frames (big-endian) are written in batches, one send per event-loop
turn, so the sequencing process pays a few microseconds per entry instead of HTTP:

    request:  uint32 id, uint32 length, entry bytes
    reply:    uint32 id, uint16 status, uint32 length, body bytes

Nothing is acknowledged by the front-end before the sequencing process replied, and that
process replies 200 only once the entry is durable (the Sequencer's contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import struct
from collections.abc import Callable

from .errors import MalformedError, TlogError, TooLargeError
from .tiles import MAX_ENTRY_SIZE

REQUEST = struct.Struct(">II")
REPLY = struct.Struct(">IHI")
MAX_REPLY_BODY = 1 << 20  # a tlog-proof: at most 63 hashes and a checkpoint note
READ_CHUNK = 1 << 20

logger = logging.getLogger("wasmlog.addipc")


class ForwardedError(TlogError):
    """The sequencing process's refusal of a forwarded entry, carried to a front-end process.

    forwarded_status is the status the sequencing process's table already decided (503 when it
    never answered); the front-end answers it as it is. body is that process's reply body (None
    if it never answered). This is transport between processes, not a domain error.
    """

    def __init__(self, forwarded_status: int, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.forwarded_status = forwarded_status
        self.body = body


def text_error_body(e: TlogError) -> bytes:
    return f"{e}\n".encode()


class _FrameWriter:
    """Collects frames and writes them with one transport write per event-loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._frames: list[bytes] = []

    def send(self, *parts: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.extend(parts)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if not self._writer.is_closing():
            self._writer.write(b"".join(frames))


async def _read_frames(reader: asyncio.StreamReader, header: struct.Struct, max_body: int,
                       on_frame: Callable[[tuple[int, ...], bytes], None]) -> None:
    """Call on_frame(header fields, body) for each frame until EOF. Raises MalformedError on a bad length."""
    buf = b""
    while True:
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            return
        buf = buf + chunk if buf else chunk
        pos = 0
        while len(buf) - pos >= header.size:
            fields = header.unpack_from(buf, pos)
            length = fields[-1]
            if length > max_body:
                raise MalformedError(f"IPC frame of {length} bytes is over {max_body}")
            end = pos + header.size + length
            if end > len(buf):
                break
            on_frame(fields, buf[pos + header.size : end])
            pos = end
        buf = buf[pos:]


Submit = Callable[[bytes], "asyncio.Future[bytes]"]


class AddServer:
    """In the sequencing process: answer each forwarded entry with what submit(entry) resolves to.

    submit returns a future (Sequencer.submit, or an application's check-and-queue) or raises
    a TlogError at once; errors become status_for(e) with error_body(e) as the reply body.
    """

    def __init__(self, submit: Submit, status_for: Callable[[TlogError], int],
                 error_body: Callable[[TlogError], bytes] = text_error_body) -> None:
        self.submit = submit
        self.status_for = status_for
        self.error_body = error_body
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, path: str) -> AddServer:
        self._server = await asyncio.start_unix_server(self._serve, path=path)
        return self

    def close(self) -> None:
        """Stop listening and drop every front-end connection (their waiting requests get 503)."""
        if self._server is not None:
            self._server.close()
        for writer in self._connections:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = _FrameWriter(writer)
        self._connections.add(writer)

        def reply(request_id: int, fut: asyncio.Future[bytes]) -> None:
            if fut.cancelled():
                status, body = 503, b"cancelled\n"
            elif (e := fut.exception()) is not None:
                err = e if isinstance(e, TlogError) else TlogError(f"integration failed: {e}")
                status, body = self.status_for(err), self.error_body(err)
            else:
                status, body = 200, fut.result()
            out.send(REPLY.pack(request_id, status, len(body)), body)

        def on_frame(fields: tuple[int, ...], entry: bytes) -> None:
            request_id = fields[0]
            try:
                if not entry:
                    raise MalformedError("empty entry")
                fut = self.submit(entry)
            except TlogError as e:
                body = self.error_body(e)
                out.send(REPLY.pack(request_id, self.status_for(e), len(body)), body)
                return
            fut.add_done_callback(functools.partial(reply, request_id))

        try:
            await _read_frames(reader, REQUEST, MAX_ENTRY_SIZE, on_frame)
        except (MalformedError, ConnectionError) as e:
            logger.warning("front-end connection dropped: %s", e)
        finally:
            self._connections.discard(writer)
            writer.close()


class AddClient:
    """In a front-end process: forward entries to the sequencing process."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._out: _FrameWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect, retrying while the sequencing process starts. Raises TlogError on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                break
            except OSError as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise TlogError(f"cannot reach the sequencing process at {path}: {e}") from None
                await asyncio.sleep(0.05)
        self._out = _FrameWriter(writer)
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader), name="add-ipc-reader")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        def on_frame(fields: tuple[int, ...], body: bytes) -> None:
            fut = self._waiting.pop(fields[0], None)
            if fut is not None and not fut.done():
                fut.set_result((fields[1], body))

        try:
            await _read_frames(reader, REPLY, MAX_REPLY_BODY, on_frame)
        except (MalformedError, ConnectionError) as e:
            logger.error("sequencing process connection failed: %s", e)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ForwardedError(503, "the sequencing process went away"))
            self._waiting.clear()
            self.closed.set()

    async def add(self, entry: bytes) -> bytes:
        """The tlog-proof for entry. Raises ForwardedError with the sequencing process's status."""
        if self._out is None or self.closed.is_set():
            raise ForwardedError(503, "not connected to the sequencing process")
        if len(entry) > MAX_ENTRY_SIZE:
            raise TooLargeError(f"entry over {MAX_ENTRY_SIZE} bytes")
        request_id = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = fut
        self._out.send(REQUEST.pack(request_id, len(entry)), entry)
        status, body = await fut
        if status != 200:
            raise ForwardedError(status, body.decode("utf-8", "replace").rstrip("\n"), body)
        return body

    async def close(self) -> None:
        if self._reader_task is not None:
            self._writer.close()
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
