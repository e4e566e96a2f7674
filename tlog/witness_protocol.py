"""c2sp.org/tlog-witness add-checkpoint request bodies: built by the log, parsed strictly by witnesses. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import parse_checkpoint, parse_decimal, parse_hash, split_head
from .errors import MalformedError
from .merkle import MAX_PROOF_HASHES
from .note import Note, b64encode, parse_note

MAX_REQUEST_BYTES = 64 << 10  # a checkpoint with many cosignatures and 63 proof lines fits


@dataclass(frozen=True)
class AddCheckpoint:
    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: bytes  # the signed note, verbatim

    def encode(self) -> bytes:
        lines = [f"old {self.old_size}", *(b64encode(h) for h in self.proof)]
        return ("\n".join(lines) + "\n\n").encode() + self.checkpoint


def parse_add_checkpoint(body: bytes) -> tuple[AddCheckpoint, Note]:
    """Parse ``old N``, up to 63 proof lines, a blank line and a signed checkpoint. Raises MalformedError.

    Exactly one old line, first: a repeated or misplaced old line is refused as such.
    """
    lines, note_bytes = split_head(body, MAX_REQUEST_BYTES, "add-checkpoint request")
    if not lines[0].startswith("old "):
        raise MalformedError("request does not start with an old line")
    old_size = parse_decimal(lines[0][4:], "old size")
    if any(line.startswith("old ") for line in lines[1:]):  # base64 has no space: never a hash
        raise MalformedError("the old line is repeated: a request has exactly one, first")
    if len(lines) - 1 > MAX_PROOF_HASHES:
        raise MalformedError(f"more than {MAX_PROOF_HASHES} proof lines")
    proof = tuple(parse_hash(h, "proof hash") for h in lines[1:])
    note = parse_note(note_bytes)
    parse_checkpoint(note.text)
    req = AddCheckpoint(old_size, proof, note_bytes)
    if req.encode() != body:
        raise MalformedError("non-canonical request")
    return req, note
