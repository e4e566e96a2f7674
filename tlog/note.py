"""c2sp.org/signed-note v1.0.0: keys, key IDs, signing and strict opening of notes.

Verifier keys use the vkey text form ``<name>+<hex8 key ID>+<base64(type || key)>``;
private keys the ``PRIVATE+KEY+<name>+<hex8>+<base64(type || seed)>`` form of Go's
golang.org/x/mod/sumdb/note, so keys are interchangeable with Go tools.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import operator
import re
import struct
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import nacl.exceptions
import nacl.signing

from .errors import MalformedError, SignatureError, TooLargeError, UnverifiedNoteError
from .syntax import (
    ASCII_KEY_NAME,
    CANONICAL_B64_UNSIZED,
    CONTROL_BYTES,
    ZERO_2_BITS,
    ZERO_4_BITS,
    lower_hex,
)

ALG_ED25519 = 0x01  # c2sp.org/signed-note: signature type 0x01
ALG_COSIGNATURE_V1 = 0x04  # c2sp.org/tlog-cosignature: timestamped Ed25519
MAX_SIGNATURES = 100  # golang.org/x/mod/sumdb/note rejects notes with more
MIN_ACCEPTED_SIGNATURES = 16  # c2sp.org/signed-note: verifiers MUST accept at least 16
MAX_NOTE_BYTES = 1 << 20  # bounds a note with 100 post-quantum (~5 kB) signatures
MAX_KEY_NAME = 255  # matches the tlog-cosignature ML-DSA name<1..255> bound
SIGNATURE_PREFIX = "\u2014 "  # em dash, space
PRIVATE_KEY_PREFIX = "PRIVATE+KEY+"

_HEX8 = re.compile(lower_hex(8))


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648 §4) with padding."""
    return base64.b64encode(data).decode("ascii")


_ZERO_2_BITS = frozenset(ZERO_2_BITS.encode())
_ZERO_4_BITS = frozenset(ZERO_4_BITS.encode())


def b64decode_strict(s: str | bytes, what: str = "base64") -> bytes:
    """Decode standard base64 in canonical form only (padding, zero pad bits). Raises MalformedError."""
    try:
        raw = s.encode("ascii") if isinstance(s, str) else s
        data = binascii.a2b_base64(raw, strict_mode=True)  # alphabet, padding only at the end
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedError(f"malformed {what}") from None
    # One encoding per value: full padding and zero pad bits (what re-encoding would give).
    if len(raw) % 4 or (raw[-3] not in _ZERO_4_BITS if raw[-2:] == b"==" else raw[-1:] == b"=" and raw[-2] not in _ZERO_2_BITS):
        raise MalformedError(f"non-canonical {what}")
    return data


_ASCII_NAME = re.compile(ASCII_KEY_NAME)


def is_valid_key_name(name: str) -> bool:
    """c2sp.org/signed-note: non-empty, no Unicode spaces, no '+', valid text."""
    if name.isascii():
        return len(name) <= MAX_KEY_NAME and _ASCII_NAME.fullmatch(name) is not None
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= MAX_KEY_NAME
        and "+" not in name
        and not any(c.isspace() or unicodedata.category(c) in ("Zs", "Cc", "Cs") for c in name)
    )


OWN_KEY_NAME_RULE = "a key name is 1 to 255 printable ASCII characters, with no space and no '+'"


def is_own_key_name(name: str) -> bool:
    """Our policy for the keys we create and the keys registry records name: printable ASCII without
    space or '+' (so a name prints as itself: no look-alike or invisible characters). Stricter than
    is_valid_key_name, which notes from other implementations are still parsed by."""
    return len(name) <= MAX_KEY_NAME and _ASCII_NAME.fullmatch(name) is not None


def key_id(name: str, alg: int, public_key: bytes) -> int:
    """SHA-256(name || 0x0A || alg || public key)[:4] as a big-endian uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def format_vkey(name: str, alg: int, public_key: bytes) -> str:
    """The vkey text form ``name+hex8+base64(alg || public key)``."""
    return f"{name}+{key_id(name, alg, public_key):08x}+{b64encode(bytes([alg]) + public_key)}"


class Verifier(Protocol):
    """A key that checks note signatures: identified by (name, key_id)."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, text: bytes, signature: bytes) -> bool:
        """Return whether signature (without the 4-byte key ID) is valid for the note text."""
        ...


class Signer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def sign(self, text: bytes) -> bytes:
        """Return the signature of the note text (without the 4-byte key ID)."""
        ...


def _parse_key_fields(text: str, prefix: str, what: str) -> tuple[str, int, int, bytes]:
    if not text.startswith(prefix):
        raise MalformedError(f"malformed {what}")
    parts = text[len(prefix) :].split("+")
    # the name has no '+', the key ID none either, base64 may contain '+': rejoin the tail
    if len(parts) < 3:
        raise MalformedError(f"malformed {what}")
    name, hex_id, b64 = parts[0], parts[1], "+".join(parts[2:])
    if not is_valid_key_name(name) or not _HEX8.fullmatch(hex_id):
        raise MalformedError(f"malformed {what}")
    raw = b64decode_strict(b64, what)
    if len(raw) < 1:
        raise MalformedError(f"malformed {what}")
    return name, int(hex_id, 16), raw[0], raw[1:]


@dataclass(frozen=True)
class Ed25519Verifier:
    """An Ed25519 note verifier (type 0x01)."""

    name: str
    public_key: bytes
    alg: int = ALG_ED25519

    @functools.cached_property
    def key_id(self) -> int:
        return key_id(self.name, self.alg, self.public_key)

    @property
    def vkey(self) -> str:
        return format_vkey(self.name, self.alg, self.public_key)

    @functools.cached_property
    def key_id_hex(self) -> str:
        """The key ID as 8 lowercase hex digits (DSSE keyids, vkeys)."""
        return f"{self.key_id:08x}"

    @functools.cached_property
    def _verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(self.public_key)

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._verify_key.verify(text, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


@functools.lru_cache(maxsize=4096)
def parse_vkey(vkey: str, *, alg: int = ALG_ED25519) -> tuple[str, int, bytes]:
    """Parse a vkey of the given type into (name, key_id, public key). Raises MalformedError.

    Memoized (keys are immutable text): a verifier sees the same few keys again and again.
    """
    name, kid, got_alg, public_key = _parse_key_fields(vkey, "", "verifier key")
    if got_alg != alg:
        raise MalformedError(f"verifier key type 0x{got_alg:02x}, want 0x{alg:02x}")
    if len(public_key) != 32:
        raise MalformedError("verifier key has the wrong length")
    if key_id(name, alg, public_key) != kid:
        raise MalformedError("verifier key ID does not match the key")
    return name, kid, public_key


@functools.lru_cache(maxsize=4096)
def verifier_from_vkey(vkey: str) -> Ed25519Verifier:
    """Parse an Ed25519 (type 0x01) vkey. Raises MalformedError. Memoized: the result is immutable."""
    name, _, public_key = parse_vkey(vkey)
    return Ed25519Verifier(name, public_key)


@dataclass(frozen=True, repr=False)
class Ed25519Signer:
    """An Ed25519 key pair. alg is 0x01 for note signatures, 0x04 for cosigners (same key form)."""

    name: str
    seed: bytes
    alg: int = ALG_ED25519

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name) or len(self.seed) != 32:
            raise MalformedError("invalid key name or seed")
        object.__setattr__(self, "_sk", nacl.signing.SigningKey(self.seed))

    def __repr__(self) -> str:
        return f"Ed25519Signer({self.name!r}, alg=0x{self.alg:02x})"

    @classmethod
    def generate(cls, name: str, alg: int = ALG_ED25519) -> Ed25519Signer:
        return cls(name, bytes(nacl.signing.SigningKey.generate()), alg)

    @property
    def public_key(self) -> bytes:
        return bytes(self._sk.verify_key)  # type: ignore[attr-defined]

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.alg, self.public_key)

    @property
    def vkey(self) -> str:
        return format_vkey(self.name, self.alg, self.public_key)

    @property
    def private_key(self) -> str:
        return f"{PRIVATE_KEY_PREFIX}{self.name}+{self.key_id:08x}+{b64encode(bytes([self.alg]) + self.seed)}"

    def sign(self, text: bytes) -> bytes:
        return self._sk.sign(text).signature  # type: ignore[attr-defined,no-any-return]


def parse_private_key(text: str, *, alg: int = ALG_ED25519) -> Ed25519Signer:
    """Parse ``PRIVATE+KEY+name+hex8+base64(alg || seed)``. Raises MalformedError."""
    name, kid, got_alg, seed = _parse_key_fields(text, PRIVATE_KEY_PREFIX, "private key")
    if got_alg != alg:
        raise MalformedError(f"private key type 0x{got_alg:02x}, want 0x{alg:02x}")
    if len(seed) != 32:
        raise MalformedError("private key has the wrong length")
    signer = Ed25519Signer(name, seed, alg)
    if signer.key_id != kid:
        raise MalformedError("private key ID does not match the key")
    return signer


class NoteSignature(NamedTuple):
    """One signature line: key name, key ID and the signature bytes after the ID.

    A NamedTuple (immutable, and cheaper to build than a frozen dataclass: a verifier
    parses several per module).
    """

    name: str
    key_id: int
    signature: bytes

    def line(self) -> str:
        return f"{SIGNATURE_PREFIX}{self.name} {b64encode(struct.pack('>I', self.key_id) + self.signature)}\n"


class Note(NamedTuple):
    """A note's text (ending in newline) and its signatures, in order."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def encode(self) -> bytes:
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode()



def check_text(text: str | bytes) -> None:
    """Reject ASCII control characters other than newline (c2sp.org/signed-note). Raises MalformedError.

    text may be a str or its UTF-8 encoding.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(raw.translate(None, CONTROL_BYTES)) != len(raw):
        raise MalformedError("note has a control character")


# Signature lines with ASCII key names and base64 whose last digit before the padding has zero
# pad bits (canonical once its length is a multiple of 4): the common case, matched at once.
ASCII_SIGNATURE_LINES = rf"(?:{SIGNATURE_PREFIX}{ASCII_KEY_NAME} {CANONICAL_B64_UNSIZED}\n)"  # names up to MAX_KEY_NAME: checked after
_ASCII_SIGNATURE_BLOCK = re.compile(ASCII_SIGNATURE_LINES + "+")
_KEY_ID = struct.Struct(">I")


def ascii_signatures(block: bytes) -> tuple[NoteSignature, ...] | None:
    """The signatures of a block (UTF-8) ASCII_SIGNATURE_LINES matched, or None if a base64 length is
    not canonical or a key name is too long (the line-by-line parser then decides).

    Raises MalformedError for a signature too short to hold a key ID.
    """
    words = block[:-1].replace(b"\n", b" ").split(b" ")  # em dash, name, base64, em dash, ...
    names, encoded = list(map(bytes.decode, words[1::3])), words[2::3]
    if any(map(_LOW_2_BITS, map(len, encoded))) or max(map(len, names)) > MAX_KEY_NAME:  # base64 length not a multiple of 4
        return None
    raw = list(map(binascii.a2b_base64, encoded))
    if min(map(len, raw)) < 5:
        raise MalformedError("note signature is too short")
    # Key ID and signature of each, split by C-level maps (a verifier parses a note per module).
    key_ids = map(_FIRST, map(_KEY_ID.unpack_from, raw))
    return tuple(map(NoteSignature, names, key_ids, map(_AFTER_KEY_ID, raw)))


_LOW_2_BITS = (3).__and__
_FIRST = operator.itemgetter(0)
_AFTER_KEY_ID = operator.itemgetter(slice(4, None))


def parse_note(data: bytes) -> Note:
    """Split a signed note into text and signature lines, strictly (c2sp.org/signed-note).

    The result re-encodes to exactly data. Raises MalformedError or TooLargeError.
    """
    if len(data) > MAX_NOTE_BYTES:
        raise TooLargeError(f"note of {len(data)} bytes is over {MAX_NOTE_BYTES}")
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedError("note is not valid UTF-8") from None
    check_text(data)
    split = s.rfind("\n\n")
    if split < 0 or not s.endswith("\n"):
        raise MalformedError("note has no signatures")
    text, sig_block = s[: split + 1], s[split + 2 :]
    if sig_block.count("\n") > MAX_SIGNATURES:
        raise TooLargeError(f"note has more than {MAX_SIGNATURES} signatures")
    if _ASCII_SIGNATURE_BLOCK.fullmatch(sig_block):
        signatures = ascii_signatures(data[data.rfind(b"\n\n") + 2 :])  # the same block, as bytes
        if signatures is not None:
            return Note(text, signatures)
    if not sig_block:
        raise MalformedError("note has no signatures")
    # Line by line: Unicode key names, and the precise reason for a rejection.
    return Note(text, tuple(_parse_signature_line(line) for line in sig_block[:-1].split("\n")))


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_PREFIX):
        raise MalformedError("malformed note signature line")
    name, sep, b64 = line[2:].partition(" ")
    if not sep or not is_valid_key_name(name):
        raise MalformedError("malformed note signature line")
    return _signature(name, b64decode_strict(b64, "note signature"))


def _signature(name: str, raw: bytes) -> NoteSignature:
    if len(raw) < 5:
        raise MalformedError("note signature is too short")
    return NoteSignature(name, _KEY_ID.unpack_from(raw)[0], raw[4:])


def sign_note(text: str, signers: Iterable[Signer]) -> bytes:
    """Sign text (which must end in newline and contain no blank final line) with each signer."""
    if not text.endswith("\n") or text.endswith("\n\n") or text == "\n":
        raise MalformedError("note text must end in exactly one newline")
    check_text(text)
    raw = text.encode()
    sigs = tuple(NoteSignature(s.name, s.key_id, s.sign(raw)) for s in signers)
    return Note(text, sigs).encode()


def open_note(data: bytes, verifiers: Sequence[Verifier]) -> tuple[Note, list[NoteSignature]]:
    """Parse a note and verify it: return the note and the signatures that verified.

    Signatures from unknown (name, key ID) pairs are ignored. Raises
    SignatureError if a known key's signature fails (c2sp.org/signed-note
    SHOULD reject the whole note), UnverifiedNoteError if no known key signed.
    """
    note = parse_note(data)
    return note, verify_note(note, verifiers)


def verify_note(note: Note, verifiers: Sequence[Verifier]) -> list[NoteSignature]:
    """Verify an already parsed note (see open_note); return the signatures that verified."""
    known = {(v.name, v.key_id): v for v in verifiers}
    raw = note.text.encode()
    verified: list[NoteSignature] = []
    seen: set[tuple[int, bytes]] = set()
    for sig in note.signatures:
        v = known.get((sig.name, sig.key_id))
        if v is None:
            continue
        if not v.verify(raw, sig.signature):
            raise SignatureError(f"invalid signature by {sig.name}+{sig.key_id:08x}")
        if (sig.key_id, sig.name.encode()) not in seen:  # count a key once however often it signs
            seen.add((sig.key_id, sig.name.encode()))
            verified.append(sig)
    if not verified:
        raise UnverifiedNoteError("note has no signature from a known key")
    return verified
