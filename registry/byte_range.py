"""Single byte ranges of a blob (RFC 9110 section 14): the Range and If-Range headers, read strictly.

Only one well-formed byte range is honoured: `bytes=A-B`, `bytes=A-` or `bytes=-N` (the unit in any
case, decimal numbers of at most MAX_DIGITS digits, nothing else in the header). Any other Range
header (several ranges, another unit, spaces, a last position before the first, a header given twice
or over MAX_HEADER characters) is ignored, and the whole blob is served, as RFC 9110 allows.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from tlog.errors import TlogError

MAX_HEADER = 64  # characters of a Range header read at all; a single range with MAX_DIGITS-digit numbers fits
MAX_DIGITS = 18  # a position or suffix length (under 10**18: far past any blob)
_SPEC = re.compile(r"bytes=(?:([0-9]{1,%d})-([0-9]{0,%d})|-([0-9]{1,%d}))" % (MAX_DIGITS, MAX_DIGITS, MAX_DIGITS), re.IGNORECASE | re.ASCII)  # noqa: UP031 - braces are the regex's


class RangeNotSatisfiable(TlogError):
    """A single byte range that selects none of the blob's size bytes (answered with `Content-Range: bytes */size`)."""

    def __init__(self, header: str, size: int) -> None:
        super().__init__(f"Range {header!r} selects none of the blob's {size} bytes")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, stop) of a blob of size bytes (0 <= start < stop <= size)."""

    start: int
    stop: int
    size: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self) -> str:
        """The Content-Range header of a 206 answer carrying this range."""
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


def parse_range(headers: list[str], size: int) -> ByteRange | None:
    """The byte range that the request's Range headers (every value given) ask of a blob of size bytes,
    or None to serve it whole (no header, or one ignored: see the module docstring; a blob of no bytes
    is always served whole). Raises RangeNotSatisfiable for a well-formed range past the blob's end
    (a first position at or past size, or a suffix of length 0)."""
    if len(headers) != 1 or size <= 0 or len(headers[0]) > MAX_HEADER:
        return None
    header = headers[0]
    m = _SPEC.fullmatch(header)
    if m is None:
        return None
    first, last, suffix = m.groups()
    if suffix is not None:
        if int(suffix) == 0:
            raise RangeNotSatisfiable(header, size)
        return ByteRange(max(0, size - int(suffix)), size, size)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid (RFC 9110 14.1.1): the header is ignored
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    return ByteRange(start, size if not last else min(int(last) + 1, size), size)


def blob_etag(digest: str) -> str:
    """The strong ETag of the blob with this SHA-256 (hex): its content fixes it."""
    return f'"sha256:{digest}"'


def repr_digest(digest: str) -> str:
    """The Repr-Digest header (RFC 9530) of the blob with this SHA-256 (hex), whole or a range of it."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"


def range_applies(if_range: list[str], etag: str) -> bool:
    """Whether a Range is honoured under the request's If-Range headers (every value given): with none,
    yes; with exactly one, only if it is the blob's ETag, compared strongly (a date, a weak or another
    tag: no, the whole blob is served)."""
    return not if_range or (len(if_range) == 1 and if_range[0] == etag)
