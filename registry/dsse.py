"""DSSE v1 envelopes (secure-systems-lab/dsse) signed with Ed25519 note keys. Pure.

The signature covers PAE(payloadType, payload): the exact payload bytes, so no
JSON canonicalization is needed.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import NamedTuple

from tlog.errors import MalformedError, TooLargeError
from tlog.note import Ed25519Signer, Ed25519Verifier, b64encode

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
ACTION_PAYLOAD_TYPE = "application/vnd.wasmlog.action+json"
PAYLOAD_TYPES = frozenset({INTOTO_PAYLOAD_TYPE, ACTION_PAYLOAD_TYPE})
MAX_ENVELOPE_BYTES = 48 << 10  # the log entry that carries it must stay under 65,535 bytes
MAX_SIGNATURES = 16


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSEv1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class Signature(NamedTuple):
    keyid: str  # a hint only: never trusted
    sig: bytes


class Envelope(NamedTuple):
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        """The DSSE JSON envelope (standard base64), with a fixed key order."""
        obj = {
            "payload": b64encode(self.payload),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": b64encode(s.sig)} for s in self.signatures],
        }
        return json.dumps(obj, separators=(",", ":")).encode()

    def verified_by(self, verifier: Ed25519Verifier) -> bool:
        """Whether any signature verifies with this key (keyids are not consulted)."""
        message = pae(self.payload_type, self.payload)
        return any(verifier.verify(message, s.sig) for s in self.signatures)


def sign_envelope(payload_type: str, payload: bytes, signer: Ed25519Signer) -> Envelope:
    sig = signer.sign(pae(payload_type, payload))
    return Envelope(payload_type, payload, (Signature(f"{signer.key_id:08x}", sig),))


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _DuplicateKey
    return d


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)  # stateless: shared
_scan_value = _STRICT_JSON.scan_once  # type: ignore[attr-defined]  # the decoder's documented-in-code scanner, absent from typeshed


def strict_json(data: bytes, what: str) -> object:
    """Parse JSON that is UTF-8, with no duplicate keys and no NaN/Infinity. Raises MalformedError."""
    try:
        text = data.decode("utf-8")
        try:
            value, end = _scan_value(text, 0)  # the common case: no whitespace around the value
            if end == len(text):
                return value
        except StopIteration:
            pass
        return _STRICT_JSON.decode(text)
    except _DuplicateKey:
        raise MalformedError(f"{what}: duplicate JSON key") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise MalformedError(f"{what}: not valid JSON ({e})") from None


def _b64_any(s: object, what: str) -> bytes:
    """DSSE verifiers MUST accept standard and URL-safe base64 (padding as sent)."""
    if not isinstance(s, str):
        raise MalformedError(f"{what} is not a string")
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s.encode("ascii"))
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise MalformedError(f"{what} is not base64") from None


def parse_envelope(data: bytes) -> Envelope:
    """Parse a DSSE JSON envelope with a payload type we accept. Raises MalformedError."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise TooLargeError(f"envelope of {len(data)} bytes is over {MAX_ENVELOPE_BYTES}")
    obj = strict_json(data, "DSSE envelope")
    if not isinstance(obj, dict) or set(obj) != {"payload", "payloadType", "signatures"}:
        raise MalformedError("DSSE envelope must have exactly payload, payloadType and signatures")
    if obj["payloadType"] not in PAYLOAD_TYPES:
        raise MalformedError(f"unsupported payloadType {str(obj['payloadType'])[:80]!r}")
    sigs = obj["signatures"]
    if not isinstance(sigs, list) or not 1 <= len(sigs) <= MAX_SIGNATURES:
        raise MalformedError(f"DSSE envelope needs 1 to {MAX_SIGNATURES} signatures")
    signatures = []
    for s in sigs:
        if not isinstance(s, dict) or not {"sig"} <= set(s) <= {"sig", "keyid"}:
            raise MalformedError("malformed DSSE signature")
        keyid = s.get("keyid", "")
        if not isinstance(keyid, str) or len(keyid) > 256:
            raise MalformedError("malformed DSSE keyid")
        signatures.append(Signature(keyid, _b64_any(s["sig"], "DSSE signature")))
    return Envelope(str(obj["payloadType"]), _b64_any(obj["payload"], "DSSE payload"), tuple(signatures))
