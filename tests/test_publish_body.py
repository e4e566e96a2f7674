"""The CBOR publish body decoder against cbor2 (the reference) on valid bodies, and refusing everything else."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.publish_body import decode_publish_body, publish_body_decoder
from tlog.errors import MalformedError, TooLargeError

LIMITS = {"signer": 64, "envelope": 256, "module": 1024, "sbom": 512}
NAMES = list(LIMITS)


def head(major: int, n: int) -> bytes:
    """A CBOR head in its shortest form."""
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 24:
            return bytes([major << 5 | n])
        if n < 1 << (8 * width):
            return bytes([major << 5 | info]) + n.to_bytes(width, "big")
    raise ValueError(n)


parts_st = st.dictionaries(st.sampled_from(NAMES), st.binary(max_size=300), max_size=4)


def in_order(parts: dict[str, bytes]) -> dict[str, bytes]:
    """The first len(parts) names, in order, with parts' values."""
    values = list(parts.values())
    return dict(zip(NAMES, values, strict=False))


@settings(max_examples=300, deadline=None)
@given(parts=parts_st)
def test_what_cbor2_encodes_is_read_back(parts: dict[str, bytes]) -> None:
    """Reference: cbor2's encoding of the same map; read back exactly when its keys are the first names in order."""
    body = cbor2.dumps(parts)
    over = next((k for k, v in parts.items() if len(v) > LIMITS[k]), None)
    ordered = list(parts) == NAMES[: len(parts)]
    if ordered and over is None:
        assert decode_publish_body(body, LIMITS) == cbor2.loads(body) == parts
        return
    with pytest.raises(MalformedError) as e:
        decode_publish_body(body, LIMITS)
    if ordered:
        assert isinstance(e.value, TooLargeError) and over in str(e.value)
    elif over is None:
        assert "in that order" in str(e.value)


@settings(max_examples=100, deadline=None)
@given(parts=parts_st)
def test_parts_are_handed_over_as_soon_as_each_is_read(parts: dict[str, bytes]) -> None:
    """A driver sees each part in the dict before it sends the bytes of the next head."""
    parts = {k: v[: LIMITS[k]] for k, v in in_order(parts).items()}
    body = cbor2.dumps(parts)
    seen: dict[str, bytes] = {}
    decoder = publish_body_decoder(LIMITS, seen)
    pos, n = 0, next(decoder)
    try:
        while True:
            chunk, pos, before = body[pos : pos + n], pos + n, len(seen)
            n = decoder.send(chunk)
            assert list(seen) == list(parts)[: len(seen)] and all(parts[k] == v for k, v in seen.items())
            if len(seen) > before:  # a part was just read: not a byte of the next one yet
                assert pos == len(cbor2.dumps(seen))
    except StopIteration:
        pass
    assert seen == parts and pos == len(body)


def _mutate(body: bytes, edit: tuple[str, int, int]) -> bytes:
    kind, at, value = edit
    at = at % (len(body) + 1)
    if kind == "flip" and body:
        at %= len(body)
        return body[:at] + bytes([body[at] ^ (value or 1)]) + body[at + 1 :]
    if kind == "insert":
        return body[:at] + bytes([value]) + body[at:]
    if kind == "delete" and body:
        return body[:at] + body[at + 1 :]
    return body[:at]  # truncate


@settings(max_examples=1500, deadline=None)
@given(parts=parts_st, edit=st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 2000), st.integers(0, 255)))
def test_any_body_is_read_as_cbor2_reads_it_or_refused(parts: dict[str, bytes], edit: tuple[str, int, int]) -> None:
    """Near-valid bodies: whatever the decoder accepts, cbor2 decodes to the same map, and its
    shortest encoding is the body itself; everything else is MalformedError (or TooLargeError)."""
    body = _mutate(cbor2.dumps(in_order(parts)), edit)
    try:
        got = decode_publish_body(body, LIMITS)
    except MalformedError:
        return
    assert cbor2.loads(body) == got
    assert cbor2.dumps(got) == body  # the same map in the same key order, every head in its shortest form
    assert set(got) <= set(NAMES) and all(type(v) is bytes and len(v) <= LIMITS[k] for k, v in got.items())


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_are_refused_or_read_as_cbor2_reads_them(data: bytes) -> None:
    try:
        got = decode_publish_body(data, LIMITS)
    except MalformedError:
        return
    assert cbor2.loads(data) == got


def test_every_other_shape_is_refused() -> None:
    signer = head(3, 6) + b"signer"
    cases = {
        "tag 36 (MIME) around the map": b"\xd8\x24" + cbor2.dumps({"signer": b"x"}),
        "tag 36 around a text of 2 MB": cbor2.dumps(cbor2.CBORTag(36, "x" * 2_000_000)),
        "tagged value": b"\xa1" + signer + b"\xd8\x40" + head(2, 1) + b"x",
        "bignum tag as a value": b"\xa1" + signer + b"\xc2" + head(2, 1) + b"\x01",
        "an array": cbor2.dumps([b"x"]),
        "text value": cbor2.dumps({"signer": "x"}),
        "nested map value": cbor2.dumps({"signer": {"signer": b"x"}}),
        "byte-string key": cbor2.dumps({b"signer": b"x"}),
        "unknown key": cbor2.dumps({"signers": b"x"}),
        "long key": cbor2.dumps({"m" * 100: b"x"}),
        "duplicate key": b"\xa2" + signer + head(2, 1) + b"x" + signer + head(2, 1) + b"y",
        "keys out of order": cbor2.dumps({"signer": b"s", "module": b"x", "envelope": b"{}"}),
        "a key skipped": cbor2.dumps({"signer": b"s", "module": b"x"}),
        "no signer": cbor2.dumps({"envelope": b"{}", "module": b"x"}),
        "more entries than parts": head(5, 5) + signer + head(2, 1) + b"x",
        "a map head that promises 2^64-1 entries": b"\xbb" + b"\xff" * 8,
        "indefinite map": b"\xbf" + signer + head(2, 1) + b"x" + b"\xff",
        "indefinite byte string": b"\xa1" + signer + b"\x5f" + head(2, 1) + b"x" + b"\xff",
        "non-shortest map head": b"\xb8\x01" + signer + head(2, 1) + b"x",
        "non-shortest length": b"\xa1" + signer + b"\x59\x00\x01" + b"x",
        "reserved head": b"\xa1" + signer + b"\x5c",
        "trailing bytes": cbor2.dumps({"signer": b"x"}) + b"\x00",
        "two maps": cbor2.dumps({"signer": b"x"}) * 2,
        "truncated part": cbor2.dumps({"signer": b"xyz"})[:-1],
        "empty body": b"",
        "deep nesting": b"\x81" * 10_000,
        "invalid UTF-8 key": b"\xa1" + head(3, 2) + b"\xff\xfe" + head(2, 1) + b"x",
    }
    for why, body in cases.items():
        with pytest.raises(MalformedError) as e:
            decode_publish_body(body, LIMITS)
        assert not isinstance(e.value, TooLargeError), why


def test_a_part_over_its_limit_is_refused_from_its_head_alone() -> None:
    """The decoder asks for the bytes of a part only once its declared length is within its limit."""
    decoder = publish_body_decoder(LIMITS)
    asked = [next(decoder)]
    for chunk in (b"\xa1", head(3, 6)[:1], b"signer", b"\x5a", (1 << 30).to_bytes(4, "big")):
        try:
            asked.append(decoder.send(chunk))
        except TooLargeError as e:
            assert "signer" in str(e)
            break
    else:
        pytest.fail("a 1 GiB signer was not refused")
    assert max(asked) <= 8  # never asked for more than a head's bytes
