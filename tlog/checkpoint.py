"""c2sp.org/tlog-checkpoint v1.0.0: the checkpoint note body, parsed strictly."""

from __future__ import annotations

import binascii
import re
from typing import NamedTuple

from .errors import MalformedError, TooLargeError
from .hashes import HASH_SIZE
from .merkle import MAX_TREE_SIZE
from .note import b64decode_strict, b64encode, check_text
from .syntax import LINE_CHAR, U63_DECIMAL, canonical_b64

_DECIMAL = re.compile(U63_DECIMAL)
MAX_EXTENSION_LINES = 16
MAX_ORIGIN_BYTES = 255


def parse_decimal(s: str, what: str, limit: int = MAX_TREE_SIZE) -> int:
    """Parse an ASCII decimal with no sign and no leading zeros, at most limit. Raises MalformedError."""
    if not _DECIMAL.fullmatch(s) or int(s) > limit:
        raise MalformedError(f"malformed {what} {s[:32]!r}")
    return int(s)


HASH_B64 = canonical_b64(HASH_SIZE)  # 43 characters, the last carrying 4 bits and two zero pad bits, and "="
_CANONICAL_HASH_B64 = re.compile(HASH_B64)


def parse_hash(s: str, what: str = "hash") -> bytes:
    """Parse one canonical base64 SHA-256 hash. Raises MalformedError."""
    if _CANONICAL_HASH_B64.fullmatch(s):
        return binascii.a2b_base64(s)
    h = b64decode_strict(s, what)  # not canonical 32 bytes: raises with the precise reason
    if len(h) != HASH_SIZE:
        raise MalformedError(f"{what} is {len(h)} bytes, want {HASH_SIZE}")
    return h


def split_head(data: bytes, max_bytes: int, what: str) -> tuple[list[str], bytes]:
    """Split ``<ASCII lines>\n\n<signed checkpoint>`` (tlog-proof, tlog-witness bodies).

    Raises TooLargeError over max_bytes, MalformedError without the blank line or on non-ASCII.
    """
    if len(data) > max_bytes:
        raise TooLargeError(f"{what} of {len(data)} bytes is over {max_bytes}")
    head, sep, note = data.partition(b"\n\n")
    if not sep:
        raise MalformedError(f"{what} has no blank line before the checkpoint")
    try:
        return head.decode("ascii").split("\n"), note
    except UnicodeDecodeError:
        raise MalformedError(f"{what} head is not ASCII") from None


def is_valid_origin(origin: str) -> bool:
    """Whether an origin meets the spec's SHOULD (a schema-less URL: no spaces, no '+').

    We hold our own origins to this; parsing accepts any non-empty origin line.
    """
    return (
        0 < len(origin.encode()) <= MAX_ORIGIN_BYTES
        and "+" not in origin
        and not any(c.isspace() or c < " " for c in origin)
    )


class Checkpoint(NamedTuple):
    """A tree head: origin, tree size, root hash, and optional extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The checkpoint note text, ending in newline."""
        lines = [self.origin, str(self.size), b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines)


# A checkpoint in canonical form: origin, decimal size, canonical base64 root, extension lines.
# Four groups: origin, size, root, extension lines (each ending in newline).
CHECKPOINT_PATTERN = rf"({LINE_CHAR}+)\n({U63_DECIMAL})\n({HASH_B64})\n((?:{LINE_CHAR}+\n){{0,{MAX_EXTENSION_LINES}}})"
_CHECKPOINT = re.compile(CHECKPOINT_PATTERN)


def checkpoint_from_fields(origin: str, size: str | bytes, root: str | bytes, extensions: str) -> Checkpoint | None:
    """The checkpoint of fields CHECKPOINT_PATTERN matched, or None when the size or origin is out of bounds."""
    tree_size = int(size)
    # Up to MAX_ORIGIN_BYTES // 4 characters always fit in MAX_ORIGIN_BYTES of UTF-8: encode only longer ones.
    if tree_size > MAX_TREE_SIZE or (len(origin) > MAX_ORIGIN_BYTES // 4 and len(origin.encode()) > MAX_ORIGIN_BYTES):
        return None
    return Checkpoint(origin, tree_size, binascii.a2b_base64(root), tuple(extensions[:-1].split("\n")) if extensions else ())


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note text (not the signatures) that must re-encode to the same text.

    Raises MalformedError.
    """
    check_text(text)
    m = _CHECKPOINT.fullmatch(text)
    cp = None if m is None else checkpoint_from_fields(m[1], m[2], m[3], m[4])
    if cp is None:
        raise MalformedError(_checkpoint_fault(text))
    return cp


def _checkpoint_fault(text: str) -> str:
    """Why text is not a canonical checkpoint (for the error message)."""
    if not text.endswith("\n"):
        return "checkpoint does not end in newline"
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        return "checkpoint has fewer than 3 lines"
    if len(lines) > 3 + MAX_EXTENSION_LINES:
        return "checkpoint has too many extension lines"
    origin, size_s, root_s, *extensions = lines
    if not origin or len(origin.encode()) > MAX_ORIGIN_BYTES:
        return "malformed checkpoint origin"
    if any(not e for e in extensions):
        return "empty checkpoint extension line"
    try:
        parse_decimal(size_s, "tree size")
        parse_hash(root_s, "root hash")
    except MalformedError as e:
        return str(e)
    return "non-canonical checkpoint"
