"""c2sp.org/tlog-proof@v1: an offline proof that an entry is in a checkpointed tree.

    c2sp.org/tlog-proof@v1
    extra <base64>            (optional)
    index <decimal>
    <base64 hash>             (0 to 63 inclusion proof lines, leaf sibling first)

    <checkpoint note, verbatim, with its signatures and cosignatures>
"""

from __future__ import annotations

import binascii
import functools
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .checkpoint import (
    CHECKPOINT_PATTERN,
    HASH_B64,
    Checkpoint,
    checkpoint_from_fields,
    parse_checkpoint,
    parse_decimal,
    parse_hash,
    split_head,
)
from .errors import MalformedError, ProofError, TooLargeError
from .hashes import HASH_SIZE
from .merkle import MAX_PROOF_HASHES, MAX_TREE_SIZE, verify_inclusion
from .note import (
    ASCII_SIGNATURE_LINES,
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    Note,
    NoteSignature,
    Verifier,
    ascii_signatures,
    b64decode_strict,
    b64encode,
    open_note,
    parse_note,
)
from .syntax import U63_DECIMAL
from .tiles import MAX_ENTRY_SIZE

HEADER = "c2sp.org/tlog-proof@v1"
MAX_EXTRA_BYTES = MAX_ENTRY_SIZE + 1024  # wasmlog carries one log entry in extra
MAX_TLOG_PROOF_BYTES = MAX_NOTE_BYTES + 2 * MAX_EXTRA_BYTES


@dataclass(frozen=True)
class TlogProof:
    """The parts of a tlog-proof file; checkpoint is the signed note bytes, verbatim."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None
    # What parse_tlog_proof already read from checkpoint (not part of the value: compare=False).
    note: Note | None = field(default=None, compare=False, repr=False)
    parsed: Checkpoint | None = field(default=None, compare=False, repr=False)

    def encode(self, b64: Callable[[bytes], str] = b64encode) -> bytes:
        """The file's bytes; b64 may be a memoizing encoder when many proofs share hashes."""
        lines = [HEADER]
        if self.extra is not None:
            lines.append(f"extra {b64encode(self.extra)}")
        lines.append(f"index {self.index}")
        lines += [b64(h) for h in self.proof]
        return ("\n".join(lines) + "\n\n").encode() + self.checkpoint


# A canonical tlog-proof in one match: header, extra (checked after), index, canonical hash lines,
# then the checkpoint note (text as CHECKPOINT_PATTERN, one blank line, ASCII signature lines).
_CANONICAL_PROOF = re.compile((
    rf"{re.escape(HEADER)}\n(?:extra ([^\n]+)\n)?index ({U63_DECIMAL})\n((?:{HASH_B64}\n){{0,{MAX_PROOF_HASHES}}})\n"
    rf"(({CHECKPOINT_PATTERN})\n({ASCII_SIGNATURE_LINES}{{1,{MAX_SIGNATURES}}}))"
).encode())  # matched on the bytes: UTF-8 is checked where text can be non-ASCII (the checkpoint text)


def parse_tlog_proof(data: bytes) -> TlogProof:
    """Parse a tlog-proof strictly: it must re-encode to exactly data. Raises MalformedError.

    Every head line is consumed by a canonical-only parser (the exact header, canonical
    base64 and decimals) and the checkpoint is the verbatim rest, so accepting the lines
    one by one is accepting exactly the bytes TlogProof.encode writes. The common case
    (ASCII head and signature lines) is read in one match; anything else, line by line.
    """
    if len(data) > MAX_TLOG_PROOF_BYTES:
        raise TooLargeError(f"tlog-proof of {len(data)} bytes is over {MAX_TLOG_PROOF_BYTES}")
    m = _CANONICAL_PROOF.fullmatch(data)
    if m is not None:
        extra_b64, index_digits, hash_lines, checkpoint, text_utf8, origin, size, root, extensions, signature_lines = m.groups()
        try:
            text = text_utf8.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        # origin and extensions are whole lines of that valid UTF-8 text
        cp = None if text is None else checkpoint_from_fields(origin.decode(), size, root, extensions.decode())
        signatures = ascii_signatures(signature_lines)
        index = int(index_digits)
        if text is not None and cp is not None and signatures is not None and index <= MAX_TREE_SIZE and len(checkpoint) <= MAX_NOTE_BYTES:
            # Canonical hash lines end in a digit with two zero pad bits and "=": read with the
            # digit "A" instead (and no newline), each line is 33 bytes, the last one zero, and
            # all decode at once.
            joined = binascii.a2b_base64(hash_lines.translate(_PAD_AS_A, b"\n"))
            proof = _hash_lines_layout(len(joined) // (HASH_SIZE + 1)).unpack(joined)
            extra = None if extra_b64 is None else _extra(extra_b64)
            return TlogProof(index, proof, checkpoint, extra, note=Note(text, signatures), parsed=cp)
    index, proof, extra, checkpoint = _parse_head_by_lines(data)
    note = parse_note(checkpoint)
    return TlogProof(index, proof, checkpoint, extra, note=note, parsed=parse_checkpoint(note.text))


_PAD_AS_A = bytes.maketrans(b"=", b"A")


@functools.lru_cache(maxsize=MAX_PROOF_HASHES + 1)
def _hash_lines_layout(count: int) -> struct.Struct:
    """count hashes of HASH_SIZE bytes, each followed by one byte to skip."""
    return struct.Struct(f"{HASH_SIZE}sx" * count)


def _extra(b64: str | bytes) -> bytes:
    if len(b64) > (MAX_EXTRA_BYTES + 2) // 3 * 4:
        raise TooLargeError("tlog-proof extra data is too large")
    extra = b64decode_strict(b64, "tlog-proof extra data")
    if not extra:
        raise MalformedError("empty tlog-proof extra line")
    return extra


def _parse_head_by_lines(data: bytes) -> tuple[int, tuple[bytes, ...], bytes | None, bytes]:
    """The head line by line, for the precise reason a head is refused (and any the regex did not take)."""
    lines, checkpoint = split_head(data, MAX_TLOG_PROOF_BYTES, "tlog-proof")
    if lines[0] != HEADER:
        raise MalformedError(f"tlog-proof does not start with {HEADER}")
    i = 1
    extra = None
    if i < len(lines) and lines[i].startswith("extra "):
        extra = _extra(lines[i][6:])
        i += 1
    if i >= len(lines) or not lines[i].startswith("index "):
        raise MalformedError("tlog-proof has no index line")
    index = parse_decimal(lines[i][6:], "tlog-proof index")
    hashes = lines[i + 1 :]
    if len(hashes) > MAX_PROOF_HASHES:
        raise MalformedError(f"tlog-proof has more than {MAX_PROOF_HASHES} proof hashes")
    return index, tuple(parse_hash(h, "tlog-proof hash") for h in hashes), extra, checkpoint


def verify_tlog_proof(
    tp: TlogProof, leaf: bytes, log_verifier: Verifier, *, origin: str | None = None, extra_verifiers: Sequence[Verifier] = ()
) -> tuple[Checkpoint, Note, list[NoteSignature]]:
    """Check the log signature, the origin and the inclusion of leaf (steps 2 and 4 of c2sp.org/tlog-proof).

    origin defaults to the log key's name. extra_verifiers (witnesses) are
    checked too: a known witness key whose signature fails rejects the proof.
    Returns the checkpoint, the note and every signature that verified;
    quorum and freshness are the caller's policy. Raises TlogError.
    """
    note, verified = open_note(tp.checkpoint, [log_verifier, *extra_verifiers])
    if not any(s.name == log_verifier.name and s.key_id == log_verifier.key_id for s in verified):
        raise ProofError("checkpoint is not signed by the log")
    cp = parse_checkpoint(note.text)
    want = log_verifier.name if origin is None else origin
    if cp.origin != want:
        raise ProofError(f"checkpoint origin {cp.origin!r}, want {want!r}")
    if tp.index >= cp.size:
        raise ProofError(f"index {tp.index} is beyond the checkpoint size {cp.size}")
    verify_inclusion(tp.index, cp.size, leaf, tp.proof, cp.root_hash)
    return cp, note, verified
