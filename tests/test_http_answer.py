"""tlog/http_answer.py against the standard library's own HTTP/1.1 answer reader (http.client), as the reference."""

from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.http_answer import MAX_HEAD, MalformedAnswerError, parse_answer

_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "connection"))
_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, mode: str) -> io.BytesIO:
        return self._file


def reference(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """What http.client reads from data: status, headers (lowercased, repeats joined), body."""
    answer = http.client.HTTPResponse(_Socket(data))  # type: ignore[arg-type]
    answer.begin()
    headers: dict[str, str] = {}
    for name, value in answer.getheaders():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return answer.status, headers, answer.read()


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """An answer's bytes (with an optional interim 100 first), and its body."""
    status = draw(st.sampled_from([200, 201, 403, 404, 412, 500, 503]))
    headers = draw(st.lists(st.tuples(_names, _values), max_size=6))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked"]))
    head = [f"HTTP/1.1 {status} Whatever"] + [f"{n}: {v}" for n, v in headers]
    if framing == "length":
        head.append(f"Content-Length: {len(body)}")
        payload = body
    else:
        head.append("Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" if draw(st.booleans()) else b""
    return interim + ("\r\n".join(head) + "\r\n\r\n").encode() + payload, body


@settings(max_examples=300)
@given(answers(), st.data())
def test_an_answer_read_in_any_pieces_is_what_http_client_reads(answer: tuple[bytes, bytes], data: st.DataObject) -> None:
    raw, body = answer
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_answer(raw[:cut], max_body=1 << 20) is None  # incomplete: wait for more
    with pytest.raises(MalformedAnswerError):
        parse_answer(raw[:cut], max_body=1 << 20, at_eof=True)  # and closed there: an error, not a short answer
    parsed = parse_answer(raw + b"HTTP/1.1 200 OK\r\n", max_body=1 << 20)  # what follows is not part of it
    assert parsed is not None
    status, headers, ref_body = reference(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n"):] if raw.startswith(b"HTTP/1.1 100") else raw)
    assert (parsed.status, parsed.body, parsed.used) == (status, ref_body, len(raw))
    assert parsed.body == body
    assert parsed.headers == headers
    assert parsed.keep_alive


def test_a_body_framed_by_the_close_ends_there_and_the_connection_is_not_kept() -> None:
    raw = b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nall of it"
    assert parse_answer(raw, max_body=100) is None
    answer = parse_answer(raw, max_body=100, at_eof=True)
    assert answer is not None and answer.body == b"all of it" and not answer.keep_alive
    assert reference(raw)[2] == b"all of it"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_close_or_http_1_0_is_not_kept_alive(raw: bytes) -> None:
    answer = parse_answer(raw, max_body=10)
    assert answer is not None and not answer.keep_alive


def test_no_body_for_head_204_and_304_whatever_the_length_says() -> None:
    for raw, head_only in [(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True), (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", False)]:
        answer = parse_answer(raw, max_body=10, head_only=head_only)
        assert answer is not None and answer.body == b"" and answer.used == len(raw)


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",  # over max_body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n",  # 16 > max_body
])
def test_malformed_or_oversized_answers_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedAnswerError):
        parse_answer(raw, max_body=10)


def test_a_head_that_never_ends_is_refused_at_its_bound() -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1)
    with pytest.raises(MalformedAnswerError, match="longer than"):
        parse_answer(raw, max_body=10)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab",  # Latin-1 superscript two: str.isdigit() says yes, int() says no
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",  # two framings (RFC 9112 6.3: an error)
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # not asked for: what follows is not HTTP/1.1
])
def test_answers_framed_ambiguously_or_switching_protocols_are_refused(raw: bytes) -> None:
    with pytest.raises(MalformedAnswerError):
        parse_answer(raw, max_body=10)


def test_interim_answers_are_bounded_in_all() -> None:
    storm = b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD // 25 + 1)  # each one small, together past the head's bound
    with pytest.raises(MalformedAnswerError, match="interim"):
        parse_answer(storm, max_body=10)
    assert parse_answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 3 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", max_body=10) is not None


def test_chunked_trailers_are_bounded_in_all() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1)
    with pytest.raises(MalformedAnswerError, match="trailer"):
        parse_answer(raw, max_body=10)


def test_chunk_framing_is_bounded_so_a_body_is_not_reparsed_forever() -> None:
    """A body of 1-byte chunks with long extensions would otherwise hold ~1000 received bytes per body byte,
    and every new piece received would walk all the chunks again."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    with pytest.raises(MalformedAnswerError, match="framing"):
        parse_answer(head + (b"1;" + b"e" * 1000 + b"\r\nx\r\n") * 100, max_body=1 << 20)
    with pytest.raises(MalformedAnswerError, match="framing"):
        parse_answer(head + b"1\r\nx\r\n" * 100_000, max_body=1 << 20)
    usual = head + b"".join(b"1000\r\n" + b"x" * 0x1000 + b"\r\n" for _ in range(256)) + b"0\r\n\r\n"  # 1 MiB in 4 KiB chunks
    answer = parse_answer(usual, max_body=1 << 20)
    assert answer is not None and len(answer.body) == 1 << 20



_PIECES = [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 101 Up\r\n", b"HTTP/1.1 103 Hints\r\n", b"HTTP/1.0 204 \r\n", b"Content-Length: ",
           b"Transfer-Encoding: chunked", b"Connection: close", b"\r\n", b"\n", b"\r\n\r\n", b"5", b"00", b"a;ext=1", b" ", b":",
           b"\t", b"x" * 20, b"0\r\n\r\n"]
_LATIN_1 = st.one_of(st.text("0123456789\xb2\xb3\xb9\xbc ,+-", max_size=4),  # digits and what str.isdigit() also takes
                     st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=3))


@settings(max_examples=1000)
@given(st.lists(st.sampled_from(_PIECES), max_size=10), _LATIN_1, st.lists(st.sampled_from(_PIECES), max_size=6), st.booleans(), st.booleans())
def test_any_bytes_give_an_answer_none_or_malformed_answer_error(before: list[bytes], length: str, after: list[bytes], at_eof: bool,
                                                                 head_only: bool) -> None:
    """Nothing else escapes the reader (a ValueError inside data_received left its request waiting for its timeout)."""
    raw = b"".join(before) + b"HTTP/1.1 200 OK\r\nContent-Length: " + length.encode("latin-1") + b"\r\n\r\n" + b"".join(after)
    try:
        answer = parse_answer(raw, max_body=64, at_eof=at_eof, head_only=head_only)
    except MalformedAnswerError:
        return
    assert answer is None or (200 <= answer.status <= 999 and answer.used <= len(raw) and len(answer.body) <= 64)
