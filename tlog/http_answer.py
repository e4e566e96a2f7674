"""An HTTP/1.1 answer (RFC 9112) read from the bytes a connection received so far. Pure.

parse_answer(received) returns None while the answer is incomplete, and an Answer once its head and
its whole body are there: the body framed by Transfer-Encoding: chunked, by Content-Length, or (with
neither) by the end of the connection (at_eof). Interim 1xx answers before the final one are skipped.
Strict and bounded: a head (or the interim answers before it, or a chunked body's trailers) over
MAX_HEAD bytes, a body over max_body, a chunked body's framing (size lines, CRLFs) over
MAX_HEAD + max_body // 64 bytes, a malformed status line, header, length or chunk, both
Content-Length and Transfer-Encoding, or a 101 (no upgrade is ever asked for) is
MalformedAnswerError. Trailers of a chunked body are read and dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TlogError

MAX_HEAD = 16 << 10  # status line and headers
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:;[^\r\n]*)?")
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # field content: no control characters but tab
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit() also takes "\xb2", which int() refuses)


class MalformedAnswerError(TlogError):
    """The server's answer is not HTTP/1.1 this client reads (or exceeds its bounds)."""


@dataclass(frozen=True)
class Answer:
    """A complete answer: status, headers (names lowercased; a repeated header's values joined with ", "),
    body, used: how many of the received bytes it took, and keep_alive (the connection may carry another request)."""

    status: int
    headers: dict[str, str]
    body: bytes
    used: int
    keep_alive: bool


def _head(received: bytes | bytearray, start: int) -> tuple[int, int, dict[str, str], int] | None:
    """(minor version, status, headers, end of the head) of the answer at start, or None if incomplete."""
    end = received.find(b"\r\n\r\n", start, start + MAX_HEAD + 4)
    if end < 0:
        if len(received) - start > MAX_HEAD:
            raise MalformedAnswerError(f"answer head longer than {MAX_HEAD} bytes")
        return None
    lines = bytes(received[start:end]).split(b"\r\n")
    status = _STATUS.fullmatch(lines[0])
    if status is None:
        raise MalformedAnswerError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise MalformedAnswerError(f"malformed header line {line[:80]!r}")
        key, text = name.decode().lower(), value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(status[1]), int(status[2]), headers, end + 4


def _chunked(received: bytes | bytearray, start: int, max_body: int) -> tuple[bytes, int] | None:
    """The body of a chunked answer at start and where it ends, or None if incomplete."""
    pieces: list[bytes] = []
    size, at = 0, start
    max_framing = MAX_HEAD + max_body // 64  # size lines and CRLFs: each walk of the chunks received stays short
    while True:
        if at - start - size > max_framing:
            raise MalformedAnswerError(f"chunked framing longer than {max_framing} bytes")
        eol = received.find(b"\r\n", at, at + 1024)
        if eol < 0:
            if len(received) - at > 1024:
                raise MalformedAnswerError("chunk size line longer than 1024 bytes")
            return None
        match = _CHUNK_SIZE.fullmatch(received, at, eol)
        if match is None:
            raise MalformedAnswerError(f"malformed chunk size line {bytes(received[at:eol])[:80]!r}")
        n = int(match[1], 16)
        if n == 0:
            break
        size += n
        if size > max_body:
            raise MalformedAnswerError(f"answer body longer than {max_body} bytes")
        if len(received) < eol + 2 + n + 2:
            return None
        if received[eol + 2 + n : eol + 4 + n] != b"\r\n":
            raise MalformedAnswerError("chunk not followed by CRLF")
        pieces.append(bytes(received[eol + 2 : eol + 2 + n]))
        at = eol + 4 + n
    at = trailer = eol + 2
    while True:  # trailer fields, up to an empty line
        eol = received.find(b"\r\n", at, trailer + MAX_HEAD)
        if eol < 0:
            if len(received) - trailer > MAX_HEAD:
                raise MalformedAnswerError(f"chunked trailer longer than {MAX_HEAD} bytes")
            return None
        if eol == at:
            return b"".join(pieces), eol + 2
        at = eol + 2


def parse_answer(received: bytes | bytearray, *, max_body: int, at_eof: bool = False, head_only: bool = False) -> Answer | None:
    """The first final answer in received, or None if more bytes are needed. at_eof: the connection was
    closed after these bytes (ends a body framed by the close; an incomplete answer then is an error).
    head_only: the answer to a HEAD request (no body, whatever its headers say). Raises MalformedAnswerError."""
    start = 0
    while True:
        head = _head(received, start)
        if head is None:
            if at_eof:
                raise MalformedAnswerError("the connection closed before a whole answer head")
            return None
        minor, status, headers, body_at = head
        if status >= 200:
            break
        if status == 101:
            raise MalformedAnswerError("101 Switching Protocols, though no upgrade was asked for")
        if body_at > MAX_HEAD:
            raise MalformedAnswerError(f"interim (1xx) answers longer than {MAX_HEAD} bytes in all")
        start = body_at  # an interim answer (100 Continue, 103 Early Hints): the final one follows
    keep_alive = minor == 1 and "close" not in headers.get("connection", "").lower()
    if head_only or status in (204, 304):
        return Answer(status, headers, b"", body_at, keep_alive)
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise MalformedAnswerError("both Transfer-Encoding and Content-Length (RFC 9112 6.3: a smuggling attempt)")
        if headers["transfer-encoding"].lower() != "chunked":
            raise MalformedAnswerError(f"unsupported Transfer-Encoding {headers['transfer-encoding'][:40]!r}")
        chunked = _chunked(received, body_at, max_body)
        if chunked is None:
            if at_eof:
                raise MalformedAnswerError("the connection closed inside a chunked body")
            return None
        return Answer(status, headers, chunked[0], chunked[1], keep_alive)
    if "content-length" in headers:
        length = headers["content-length"]
        if not _LENGTH.fullmatch(length):
            raise MalformedAnswerError(f"malformed Content-Length {length[:40]!r}")
        n = int(length)
        if n > max_body:
            raise MalformedAnswerError(f"answer body longer than {max_body} bytes")
        if len(received) < body_at + n:
            if at_eof:
                raise MalformedAnswerError(f"the connection closed after {len(received) - body_at} of {n} body bytes")
            return None
        return Answer(status, headers, bytes(received[body_at : body_at + n]), body_at + n, keep_alive)
    if len(received) - body_at > max_body:  # framed by the connection's end
        raise MalformedAnswerError(f"answer body longer than {max_body} bytes")
    if not at_eof:
        return None
    return Answer(status, headers, bytes(received[body_at:]), len(received), False)
