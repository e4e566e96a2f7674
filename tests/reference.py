"""A naive, recursive RFC 6962 §2.1 implementation, for tests only.

It follows the RFC's definitions of MTH, PATH and PROOF/SUBPROOF literally,
sharing no code with tlog/, so that tlog's planned-and-folded proofs are
checked against the definition rather than against themselves. MTH is
memoized per (leaves, lo, hi) only to keep all-pairs tests fast.
"""

from __future__ import annotations

import functools
import hashlib


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@functools.cache
def _mth(leaves: tuple[bytes, ...], lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[lo]).digest()
    k = _k(n)
    return hashlib.sha256(b"\x01" + _mth(leaves, lo, lo + k) + _mth(leaves, lo + k, hi)).digest()


def mth(leaves: tuple[bytes, ...], lo: int = 0, hi: int | None = None) -> bytes:
    return _mth(leaves, lo, len(leaves) if hi is None else hi)


def path(m: int, leaves: tuple[bytes, ...], lo: int, hi: int) -> list[bytes]:
    """PATH(m, D[lo:hi]) with m relative to lo."""
    n = hi - lo
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return path(m, leaves, lo, lo + k) + [mth(leaves, lo + k, hi)]
    return path(m - k, leaves, lo + k, hi) + [mth(leaves, lo, lo + k)]


def subproof(m: int, leaves: tuple[bytes, ...], lo: int, hi: int, b: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if b else [mth(leaves, lo, hi)]
    k = _k(n)
    if m <= k:
        return subproof(m, leaves, lo, lo + k, b) + [mth(leaves, lo + k, hi)]
    return subproof(m - k, leaves, lo + k, hi, False) + [mth(leaves, lo, lo + k)]


def inclusion_proof(index: int, size: int, leaves: tuple[bytes, ...]) -> list[bytes]:
    return path(index, leaves, 0, size)


def consistency_proof(old: int, new: int, leaves: tuple[bytes, ...]) -> list[bytes]:
    return subproof(old, leaves, 0, new, True)
