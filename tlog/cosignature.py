"""c2sp.org/tlog-cosignature v1: timestamped Ed25519 cosignatures (type 0x04)."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from .errors import MalformedError
from .note import ALG_COSIGNATURE_V1, Ed25519Signer, NoteSignature, format_vkey, key_id, parse_vkey

MAX_TIMESTAMP = 2**63 - 1  # c2sp.org/tlog-cosignature: the timestamp must fit in int64
TIMESTAMPED_SIGNATURE_SIZE = 8 + 64
_TIMESTAMP = struct.Struct(">Q")


_SIGNED_MESSAGE = b"cosignature/v1\ntime %d\n%s"  # % (timestamp, checkpoint body)


def signed_message(checkpoint_text: str | bytes, timestamp: int) -> bytes:
    """The bytes a v1 cosigner signs: label, time line, then the checkpoint body (text or its UTF-8)."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise MalformedError(f"cosignature timestamp {timestamp} out of range")
    body = checkpoint_text.encode() if isinstance(checkpoint_text, str) else checkpoint_text
    return _SIGNED_MESSAGE % (timestamp, body)


def cosignature_timestamp(signature: bytes) -> int:
    """The timestamp of a v1 timestamped_signature (72 bytes). Raises MalformedError."""
    if len(signature) != TIMESTAMPED_SIGNATURE_SIZE:
        raise MalformedError(f"cosignature is {len(signature)} bytes, want {TIMESTAMPED_SIGNATURE_SIZE}")
    (timestamp,) = _TIMESTAMP.unpack_from(signature)
    if timestamp > MAX_TIMESTAMP:
        raise MalformedError("cosignature timestamp out of range")
    return timestamp  # type: ignore[no-any-return]


def cosign(signer: Ed25519Signer, checkpoint_text: str, timestamp: int) -> NoteSignature:
    """Cosign a checkpoint body at timestamp (POSIX seconds) with a type 0x04 key."""
    if signer.alg != ALG_COSIGNATURE_V1:
        raise ValueError("cosigning needs a cosignature/v1 (type 0x04) key")
    sig = signer.sign(signed_message(checkpoint_text, timestamp))
    return NoteSignature(signer.name, signer.key_id, struct.pack(">Q", timestamp) + sig)


@dataclass(frozen=True)
class CosignatureV1Verifier:
    """A note Verifier for cosignature/v1 signatures by one witness key."""

    name: str
    public_key: bytes

    @functools.cached_property
    def key_id(self) -> int:
        return key_id(self.name, ALG_COSIGNATURE_V1, self.public_key)

    @functools.cached_property
    def _verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(self.public_key)

    @property
    def vkey(self) -> str:
        return format_vkey(self.name, ALG_COSIGNATURE_V1, self.public_key)

    def verify(self, text: bytes, signature: bytes) -> bool:
        return self.verified_timestamp(text, signature) is not None

    def verified_timestamp(self, text: bytes, signature: bytes) -> int | None:
        """The cosignature's timestamp if it is valid for the checkpoint text, else None."""
        try:
            timestamp = cosignature_timestamp(signature)
            # signed_message, without its range check: cosignature_timestamp made it
            self._verify_key.verify(_SIGNED_MESSAGE % (timestamp, text), signature[8:])
        except (MalformedError, nacl.exceptions.BadSignatureError):
            return None
        return timestamp


@functools.lru_cache(maxsize=4096)
def cosignature_verifier_from_vkey(vkey: str) -> CosignatureV1Verifier:
    """Parse a type 0x04 vkey. Raises MalformedError."""
    name, _, public_key = parse_vkey(vkey, alg=ALG_COSIGNATURE_V1)
    return CosignatureV1Verifier(name, public_key)
