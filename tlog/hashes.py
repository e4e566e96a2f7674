"""RFC 9162 §2.1 (RFC 6962) Merkle tree hashing with SHA-256."""

from __future__ import annotations

import hashlib

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162 §2.1.1: MTH({}) = SHA-256()

_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """Return SHA-256(0x00 || entry), the hash of one log entry."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return SHA-256(0x01 || left || right), the hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()
