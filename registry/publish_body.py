"""The CBOR body of ``POST /api/v1/publish``, read strictly and in bounded steps. Pure.

The body is exactly one CBOR map of definite length whose keys are the text strings
``signer``, ``envelope``, ``module``, ``sbom`` in that order (the last ones may be left out:
the server requires the first three), whose values are definite-length byte strings within
each part's limit; every head is in its shortest form and nothing follows the map. Anything
else (tags, indefinite lengths, other types, nesting, repeated, skipped or reordered keys,
trailing bytes) is refused. The order lets a
server refuse a publish from its signer and envelope before it reads the module.

The decoder is sans-I/O: a generator that yields how many bytes it needs next and is sent
exactly that many, filling a dict of parts as it goes. One decoder thus serves a body in
memory (decode_publish_body) and a stream (the server reads each part straight into its own
buffer, and stops after the envelope to check it), and a part's declared length is checked
against its limit before any of it is read.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping

from tlog.errors import MalformedError, TooLargeError

# A decoder yields how many bytes it needs and is sent exactly that many; it returns the parts.
Decoder = Generator[int, bytes, dict[str, bytes]]

_BYTES, _TEXT, _MAP, _TAG = 2, 3, 5, 6
_MAJOR_NAMES = {0: "an integer", 1: "an integer", 2: "a byte string", 3: "a text string", 4: "an array",
                5: "a map", 6: "a tag", 7: "a simple value or float"}
MAX_KEY_BYTES = 16  # longer than any part name
ENDS_EARLY = "the CBOR publish body ends early"
TRAILING = "bytes after the CBOR publish map"


def _head() -> Generator[int, bytes, tuple[int, int]]:
    """(major type, argument) of one CBOR head in its shortest form, definite length."""
    (initial,) = yield 1
    major, info = initial >> 5, initial & 0x1F
    if major == _TAG:
        raise MalformedError("CBOR tags are not accepted in a publish body")
    if info < 24:
        return major, info
    if info > 27:  # 28-30 are reserved, 31 is an indefinite length (or "break")
        raise MalformedError("indefinite lengths and reserved CBOR heads are not accepted in a publish body")
    width = 1 << (info - 24)
    n = int.from_bytes((yield width), "big")
    if n < (24 if width == 1 else 1 << (4 * width)):  # it would fit in a shorter head
        raise MalformedError("a CBOR head in the publish body is not in its shortest form")
    return major, n


def _expect(major: int, want: int, what: str) -> None:
    if major != want:
        raise MalformedError(f"{what} must be {_MAJOR_NAMES[want]}, not {_MAJOR_NAMES[major]}")


def check_part_order(limits: Mapping[str, int], parts: dict[str, bytes], name: object) -> str:
    """Return name if it is the next part after those read so far: the parts come exactly in the
    order of limits, none skipped (only the last ones may be missing). Raises MalformedError."""
    order = list(limits)
    expected = order[len(parts)] if len(parts) < len(order) else None
    if expected is None or name != expected:
        raise MalformedError(f"expected {'no more parts' if expected is None else 'the part ' + expected} here, "
                             f"not {str(name)[:40]!r} (the parts are {', '.join(order)}, in that order)")
    return expected


def publish_body_decoder(limits: Mapping[str, int], parts: dict[str, bytes] | None = None) -> Decoder:
    """Decode one publish map whose parts are named by limits (name -> byte limit, in their order),
    adding each part to parts as soon as it is read. Raises MalformedError, or TooLargeError for a
    part declared over its limit.
    """
    parts = {} if parts is None else parts
    major, count = yield from _head()
    _expect(major, _MAP, "a CBOR publish body")
    if count > len(limits):
        raise MalformedError(f"a CBOR publish body has at most {len(limits)} entries, not {count}")
    for _ in range(count):
        major, n = yield from _head()
        _expect(major, _TEXT, "a publish body's key")
        if n > MAX_KEY_BYTES:
            raise MalformedError(f"unexpected part name of {n} bytes")
        raw = yield n
        name = check_part_order(limits, parts, raw.decode("ascii", "replace"))
        major, n = yield from _head()
        _expect(major, _BYTES, f"part {name}")
        if n > limits[name]:
            raise TooLargeError(f"part {name} is over {limits[name]} bytes")
        parts[name] = (yield n) if n else b""
    return parts


def decode_publish_body(data: bytes, limits: Mapping[str, int]) -> dict[str, bytes]:
    """The parts of a publish body held in memory. Raises MalformedError (TooLargeError)."""
    decoder = publish_body_decoder(limits)
    pos = 0
    try:
        n = next(decoder)
        while True:
            if pos + n > len(data):
                raise MalformedError(ENDS_EARLY)
            chunk, pos = data[pos : pos + n], pos + n
            n = decoder.send(chunk)
    except StopIteration as done:
        parts: dict[str, bytes] = done.value
    if pos != len(data):
        raise MalformedError(TRAILING)
    return parts
