"""tlog/storage/http1.py against real TCP servers on loopback that answer well, slowly, in pieces, or not at all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from tlog.http_answer import MalformedAnswerError
from tlog.storage.http1 import Origin, StaleConnectionError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """(head, body) of the next request, or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length)


async def serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A server calling handler(reader, writer, connection number); returns it, its origin and the connections seen."""
    seen: list[int] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        try:
            await handler(reader, writer, seen[-1])
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    while (request := await read_request(reader)) is not None:
        head, body = request
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head) + len(body), head + body))
        await writer.drain()


async def test_requests_share_kept_alive_connections_within_the_bound() -> None:
    server, origin, seen = await serve(echo_forever)
    http = Origin(origin, connections=3)
    try:
        answers = await asyncio.gather(*(http.request("PUT", f"/b/k{i}", {"X-I": str(i)}, b"body%d" % i) for i in range(40)))
    finally:
        http.close()
        server.close()
    for i, answer in enumerate(answers):
        assert answer.status == 200
        assert answer.body.startswith(b"PUT /b/k%d HTTP/1.1\r\n" % i) and answer.body.endswith(b"\r\n\r\nbody%d" % i)
        assert b"\r\nHost: 127.0.0.1:%s\r\n" % origin.rsplit(":", 1)[1].encode() in answer.body
        assert b"X-I: %d\r\n" % i in answer.body and b"Content-Length: %d\r\n" % len(b"body%d" % i) in answer.body
    assert 1 <= len(seen) <= 3


async def test_an_idle_connection_the_server_dropped_is_replaced_once() -> None:
    async def one_answer_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n%02d" % n)
        await writer.drain()
        await read_request(reader)  # the next request on this connection is never answered: dropped

    server, origin, seen = await serve(one_answer_then_drop)
    http = Origin(origin, connections=1)
    try:
        assert (await http.request("PUT", "/a", {}, b"1")).body == b"00"
        assert (await http.request("PUT", "/a", {}, b"2")).body == b"01"  # on a new connection
    finally:
        http.close()
        server.close()
    assert seen == [0, 1]


async def test_a_new_connection_closed_before_any_answer_is_an_error() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)

    server, origin, seen = await serve(drop)
    http = Origin(origin, connections=1)
    try:
        with pytest.raises(StaleConnectionError):
            await http.request("PUT", "/a", {}, b"x")
    finally:
        http.close()
        server.close()
    assert seen == [0]


async def test_an_answer_arriving_byte_by_byte_is_read_whole() -> None:
    raw = b"HTTP/1.1 412 Precondition Failed\r\nTransfer-Encoding: chunked\r\nETag: \"e\"\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        for i in range(len(raw)):
            writer.write(raw[i : i + 1])
            await writer.drain()
        await read_request(reader)

    server, origin, _ = await serve(trickle)
    http = Origin(origin, connections=1)
    try:
        answer = await http.request("PUT", "/a", {}, b"x")
    finally:
        http.close()
        server.close()
    assert (answer.status, answer.body, answer.headers["etag"]) == (412, b"hello!", '"e"')


async def test_a_silent_server_times_out_and_a_garbled_one_is_malformed() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await reader.read()

    for handler, error in ((silent, TimeoutError), (garbled, MalformedAnswerError)):
        server, origin, _ = await serve(handler)
        http = Origin(origin, connections=1, timeout=0.5)
        try:
            with pytest.raises(error):
                await http.request("PUT", "/a", {}, b"x")
        finally:
            http.close()
            server.close()


async def test_a_header_with_a_line_break_is_never_sent() -> None:
    http = Origin("http://127.0.0.1:9", connections=1)
    with pytest.raises(ValueError, match="line break"):
        await http.request("PUT", "/a", {"X": "a\r\nInjected: yes"}, b"x")


async def test_an_unreadable_length_fails_the_request_at_once() -> None:
    """Content-Length "\xb2" once made the answer reader raise ValueError inside data_received: the request then
    waited for its whole timeout and failed as a TimeoutError, not as the malformed answer it was."""
    async def odd_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab")
        await reader.read()

    server, origin, _ = await serve(odd_length)
    http = Origin(origin, connections=1, timeout=3)
    try:
        with pytest.raises(MalformedAnswerError, match="Content-Length"):
            await http.request("PUT", "/a", {}, b"x")
    finally:
        http.close()
        server.close()


@pytest.mark.parametrize("give_up", ["cancel", "timeout"])
async def test_an_answer_arriving_after_its_request_was_cancelled_or_timed_out_is_never_the_next_ones(give_up: str) -> None:
    """The connection of a cancelled (or timed-out) request is closed, not pooled: the late answer the server
    sends on it afterwards cannot be read as the answer to the next request, and the bound is given back."""
    got_first, late = asyncio.Event(), asyncio.Event()

    async def late_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            line = request[0].split(b"\r\n")[0]
            if n == 0:
                got_first.set()
                await late.wait()
            with contextlib.suppress(ConnectionError):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
                await writer.drain()

    server, origin, seen = await serve(late_first)
    http = Origin(origin, connections=1, timeout=1 if give_up == "timeout" else 60)
    try:
        first = asyncio.ensure_future(http.request("PUT", "/first", {}, b"x"))
        await got_first.wait()
        if give_up == "cancel":
            first.cancel()
        with pytest.raises(asyncio.CancelledError if give_up == "cancel" else TimeoutError):
            await first
        late.set()  # the server answers the first request now, on its connection
        second = await asyncio.wait_for(http.request("PUT", "/second", {}, b"y"), 10)  # the one slot is free again
    finally:
        http.close()
        server.close()
    assert second.body == b"PUT /second HTTP/1.1" and len(seen) == 2
