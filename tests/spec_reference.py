"""Naive line-by-line readings of the C2SP text formats, for tests only.

Written from the specs (c2sp.org/signed-note, tlog-checkpoint, tlog-proof) with canonical
base64 decided by re-encoding, sharing no code with tlog's parsers: the differential tests
check tlog's one-match fast paths and its line-by-line fallbacks against these. Each
reader returns plain tuples, or None for input the spec (with wasmlog's bounds) refuses;
wasmlog's size bounds raise TooLarge where the reader meets them, in reading order.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata

MAX_KEY_NAME_BYTES = 255  # c2sp.org/tlog-cosignature: name<1..255>
MAX_ORIGIN_BYTES = 255
MAX_EXTENSION_LINES = 16  # wasmlog's bound on checkpoint extension lines
MAX_INDEX = 2**63 - 1
MAX_PROOF_HASHES = 63  # a tree of at most 2**63 entries needs no more
MAX_SIGNATURES = 100  # wasmlog's (and Go's) bound on signatures per note
MAX_NOTE_BYTES = 1 << 20
HASH_SIZE = 32


class TooLarge(Exception):
    """Input over one of wasmlog's size bounds."""


def canonical_b64(s: str) -> bytes | None:
    """s is canonical when it is the standard padded encoding of what it decodes to."""
    try:
        data = base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        return None
    return data if base64.b64encode(data).decode() == s else None


def decimal(s: str, limit: int) -> int | None:
    """An ASCII decimal with no sign and no leading zeros, at most limit."""
    if not s.isascii() or not s.isdigit() or str(int(s)) != s or int(s) > limit:
        return None
    return int(s)


def _has_control(s: str) -> bool:
    return any(c < " " and c != "\n" for c in s)


def note(data: bytes, min_signature: int = 5) -> tuple[str, list[tuple[str, int, bytes]]] | None:
    """(text, [(key name, key ID, signature)]) of a signed note."""
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _has_control(s) or not s.endswith("\n") or "\n\n" not in s:
        return None
    split = s.rfind("\n\n")
    text, block = s[: split + 1], s[split + 2 :]
    if not block:
        return None
    sigs = []
    for line in block[:-1].split("\n"):
        if not line.startswith("\u2014 ") or " " not in line[2:]:
            return None
        name, b64 = line[2:].split(" ", 1)
        if not name or "+" in name or any(c.isspace() or unicodedata.category(c) == "Cc" for c in name) or len(name.encode()) > MAX_KEY_NAME_BYTES:
            return None
        raw = canonical_b64(b64)
        if raw is None or len(raw) < min_signature:
            return None
        sigs.append((name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, sigs


def checkpoint(text: str) -> tuple[str, int, bytes, tuple[str, ...]] | None:
    """(origin, tree size, root hash, extension lines) of a checkpoint note text."""
    if _has_control(text) or not text.endswith("\n"):
        return None
    lines = text[:-1].split("\n")
    if not 3 <= len(lines) <= 3 + MAX_EXTENSION_LINES or not lines[0] or len(lines[0].encode()) > MAX_ORIGIN_BYTES or not all(lines[3:]):
        return None
    size, root = decimal(lines[1], MAX_INDEX), canonical_b64(lines[2])
    if size is None or root is None or len(root) != HASH_SIZE:
        return None
    return lines[0], size, root, tuple(lines[3:])


def tlog_proof(data: bytes, max_bytes: int, max_extra_b64: int) -> tuple[
    tuple[int, tuple[bytes, ...], bytes, bytes | None], tuple[str, list[tuple[str, int, bytes]]], tuple[str, int, bytes, tuple[str, ...]]
] | None:
    """((index, proof, checkpoint note bytes, extra), note, checkpoint) of a c2sp.org/tlog-proof@v1 file.

    The head ends at the first empty line; the signed checkpoint follows verbatim.
    """
    if len(data) > max_bytes:
        raise TooLarge
    if b"\n\n" not in data:
        return None
    head_bytes, note_bytes = data.split(b"\n\n", 1)
    try:
        lines = head_bytes.decode("ascii").split("\n")
    except UnicodeDecodeError:
        return None
    if lines.pop(0) != "c2sp.org/tlog-proof@v1":
        return None
    extra = None
    if lines and lines[0].startswith("extra "):
        if len(lines[0]) - len("extra ") > max_extra_b64:
            raise TooLarge
        extra = canonical_b64(lines.pop(0)[len("extra ") :])
        if not extra:  # not canonical, or empty
            return None
    if not lines or not lines[0].startswith("index "):
        return None
    index = decimal(lines.pop(0)[len("index ") :], MAX_INDEX)
    if index is None or len(lines) > MAX_PROOF_HASHES:
        return None
    proof = [canonical_b64(line) for line in lines]
    if any(h is None or len(h) != HASH_SIZE for h in proof):
        return None
    if len(note_bytes) > MAX_NOTE_BYTES:
        raise TooLarge
    try:  # the signature count bound applies once the note splits into text and signatures
        s = note_bytes.decode("utf-8")
        if not _has_control(s) and s.endswith("\n") and "\n\n" in s and s[s.rfind("\n\n") + 2 :].count("\n") > MAX_SIGNATURES:
            raise TooLarge
    except UnicodeDecodeError:
        return None
    signed = note(note_bytes)
    fields = None if signed is None else checkpoint(signed[0])
    if signed is None or fields is None:
        return None
    return (index, tuple(h for h in proof if h is not None), note_bytes, extra), signed, fields
