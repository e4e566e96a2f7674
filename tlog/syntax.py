"""The lexical rules of the C2SP text formats, each written once as a regex fragment. Pure.

Every fast-path pattern (checkpoint, signed note, tlog-proof, registry statements) is built
from these fragments; each fragment is a self-contained group, safe to embed and to
``.encode()`` for matching bytes. Values are checked after the match where a fragment can
only bound the length (a decimal's magnitude, a key name's UTF-8 length).
"""

from __future__ import annotations

# Standard base64 (RFC 4648 §4) is canonical when padded and its pad bits are zero: the last
# digit before "=" carries 2 pad bits, before "==" 4 pad bits.
B64_DIGIT = "[A-Za-z0-9+/]"
ZERO_2_BITS = "AEIMQUYcgkosw048"  # the base64 digits whose low 2 bits are zero
ZERO_4_BITS = "AQgw"  # ... low 4 bits
CANONICAL_B64_TAIL = f"(?:[{ZERO_4_BITS}]==|[{ZERO_2_BITS}]=)"


def canonical_b64(n: int) -> str:
    """The canonical base64 of exactly n bytes (n > 0), and nothing else."""
    groups, rest = divmod(n, 3)
    if rest == 0:
        return f"(?:{B64_DIGIT}{{{4 * groups}}})"
    return f"(?:{B64_DIGIT}{{{4 * groups + rest}}}[{ZERO_2_BITS if rest == 2 else ZERO_4_BITS}]{'=' * (3 - rest)})"


# Base64 of any length whose pad bits are zero: canonical once its length is a multiple of 4
# (the caller checks the length; a regex cannot count modulo 4 cheaply).
CANONICAL_B64_UNSIZED = f"(?:{B64_DIGIT}*{CANONICAL_B64_TAIL}?)"


def decimal(max_digits: int | None = None) -> str:
    """An ASCII decimal with no sign and no leading zeros ("0" itself is fine), at most max_digits long."""
    more = "*" if max_digits is None else f"{{0,{max_digits - 1}}}"
    return f"(?:0|[1-9][0-9]{more})"  # [0-9], never \\d (which takes every Unicode digit)


def positive_decimal(max_digits: int) -> str:
    """decimal(max_digits) without 0."""
    return f"(?:[1-9][0-9]{{0,{max_digits - 1}}})"


U63_DECIMAL = decimal(19)  # up to 2**63 - 1 (tree sizes, indexes): the value is checked after the match


def lower_hex(n: int) -> str:
    """Exactly n lowercase hexadecimal digits."""
    return f"(?:[0-9a-f]{{{n}}})"


# A character of a note text line (c2sp.org/signed-note: no ASCII control characters; newline
# ends the line), and the control bytes that rule forbids in the UTF-8 of a whole text.
LINE_CHAR = r"[^\x00-\x1f]"
CONTROL_BYTES = bytes(c for c in range(0x20) if c != 0x0A)  # never part of a multi-byte UTF-8 sequence

# A key name in ASCII (c2sp.org/signed-note: no spaces, no "+"): printable ASCII but space and "+".
# Names are at most MAX_KEY_NAME bytes: checked after the match. Non-ASCII names have their own rule.
ASCII_KEY_NAME = r"(?:[\x21-\x2a\x2c-\x7e]+)"
