"""The verifiable index's authenticated map: a compressed sparse Merkle tree. Pure.

Keys are 256-bit hashes (key_hash). A subtree holding no key hashes to EMPTY; a subtree
holding exactly one key hashes to that key's leaf, wherever it sits; any other subtree is
split on the next bit of the key hashes (0 left, 1 right):

    EMPTY         = 32 zero bytes
    leaf(kh, vh)  = SHA-256(0x10 || kh || vh)
    node(l, r)    = SHA-256(0x11 || l || r)

So the tree's shape, and its root, is a function of the set of (key hash, value hash) pairs
only, and a key sits at depth ~log2(n): a proof is the siblings from the root down to where
the key's path ends (O(log n) hashes), plus, for an absent key whose path ends at another
key's leaf, that leaf's key and value hashes. The trie is persistent: set() shares every
subtree it does not touch, so an update costs O(log n) hashes and the old map stays valid.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeGuard, Union, cast

from tlog.errors import ProofError

HASH_SIZE = 32
EMPTY = bytes(HASH_SIZE)
MAX_DEPTH = 256  # a proof has at most one sibling per key bit
_LEAF = b"\x10"
_NODE = b"\x11"
_sha256 = hashlib.sha256


class MapProofError(ProofError):
    """A map proof that does not show the claimed value (or absence) under the map root."""


def key_hash(key: str) -> bytes:
    """Where a key sits in the map."""
    return _sha256(b"wasmlog-index-key\x00" + key.encode()).digest()


def leaf_hash(kh: bytes, vh: bytes) -> bytes:
    return _sha256(_LEAF + kh + vh).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(_NODE + left + right).digest()


def bit(kh: bytes, depth: int) -> int:
    return (kh[depth >> 3] >> (7 - (depth & 7))) & 1


# A subtree is None (no key), a leaf (leaf hash, key hash, value hash, payload) or a node (node
# hash, left, right): plain tuples, which the garbage collector stops tracking once it has seen
# them, payloads included if they are tuples of atoms (a map of 10^5 keys as objects, or beside a
# second map of its payloads, is otherwise what every full collection walks). The payload is the
# caller's, unhashed (the index keeps each key and its history there).
Leaf: TypeAlias = tuple[bytes, bytes, bytes, Any]
Node: TypeAlias = tuple[bytes, "Tree", "Tree"]
Tree: TypeAlias = Union[Leaf, Node, None]  # noqa: UP007 (a recursive alias: "|" cannot take the forward reference)


def _is_leaf(t: Leaf | Node) -> TypeGuard[Leaf]:
    return type(t[1]) is bytes


def _children(t: Leaf | Node) -> tuple[Tree, Tree]:
    """A node's (left, right)."""
    return cast(Node, t)[1:]


def _hash(t: Tree) -> bytes:
    return EMPTY if t is None else t[0]


def _node(left: Tree, right: Tree) -> Node:
    return _sha256(_NODE + (EMPTY if left is None else left[0]) + (EMPTY if right is None else right[0])).digest(), left, right


def _leaf(kh: bytes, vh: bytes, payload: Any = None) -> Leaf:
    return leaf_hash(kh, vh), kh, vh, payload


def _find(t: Tree, kh: bytes, depth: int) -> Leaf | None:
    """kh's leaf in the subtree t at depth, if there is one."""
    path, shift = int.from_bytes(kh, "big"), 8 * HASH_SIZE - 1 - depth  # the key's bit at depth is path >> shift & 1
    node: Any = t  # a node (hash, left, right) while its [1] is not bytes (typed Any: no cast call per level)
    while node is not None and type(node[1]) is not bytes:
        node = node[2] if path >> shift & 1 else node[1]
        shift -= 1
    return node if node is not None and node[1] == kh else None


def _changed(a: Tree, b: Tree, depth: int) -> Iterator[Leaf]:
    """The leaves of subtree a whose key is not in subtree b (at the same depth) with the same value."""
    if a is None or (b is not None and a[0] == b[0]):  # equal hashes: equal subtrees
        return
    if _is_leaf(a):
        old = _find(b, a[1], depth)
        if old is None or old[2] != a[2]:
            yield a
        return
    bl: Tree
    br: Tree
    if b is None or _is_leaf(b):  # b's one leaf, if any, lies on the side of its key's bit
        bl, br = (None, b) if b is not None and bit(b[1], depth) else (b, None)
    else:
        bl, br = _children(b)
    left, right = _children(a)
    yield from _changed(left, bl, depth + 1)
    yield from _changed(right, br, depth + 1)


def _join(a: Leaf, b: Leaf, depth: int) -> Node:
    """The subtree at depth holding exactly the two leaves a and b (different key hashes)."""
    ba, bb = bit(a[1], depth), bit(b[1], depth)
    if ba == bb:
        child = _join(a, b, depth + 1)
        return _node(None, child) if ba else _node(child, None)
    return _node(b, a) if ba else _node(a, b)


def _set(t: Tree, new: Leaf, depth: int) -> Leaf | Node:
    if t is None:
        return new
    if type(t[1]) is bytes:  # a leaf
        return new if t[1] == new[1] else _join(t, new, depth)
    _, left, right = cast(Node, t)
    if bit(new[1], depth):
        return _node(left, _set(right, new, depth + 1))
    return _node(_set(left, new, depth + 1), right)


def _first_one(leaves: Sequence[Leaf], depth: int) -> int:
    """The position of the first of leaves (sorted by key hash) whose key bit at depth is 1."""
    lo, hi = 0, len(leaves)
    while lo < hi:
        mid = (lo + hi) // 2
        if bit(leaves[mid][1], depth):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _build(leaves: Sequence[Leaf], depth: int) -> Tree:
    """The subtree of leaves, sorted by key hash and distinct, at depth."""
    if not leaves:
        return None
    if len(leaves) == 1:
        return leaves[0]
    split = _first_one(leaves, depth)
    return _node(_build(leaves[:split], depth + 1), _build(leaves[split:], depth + 1))


def _set_many(t: Tree, leaves: Sequence[Leaf], depth: int) -> Tree:
    """The subtree t at depth with leaves (sorted by key hash, distinct) set: each node on the
    leaves' paths is hashed once, however many of them pass through it."""
    if not leaves:
        return t
    if len(leaves) == 1:
        return _set(t, leaves[0], depth)
    if t is None:
        return _build(leaves, depth)
    if _is_leaf(t):  # t's key joins the new leaves unless one of them replaces it
        keys = [leaf[1] for leaf in leaves]
        at = bisect.bisect_left(keys, t[1])
        if at < len(keys) and keys[at] == t[1]:
            return _build(leaves, depth)
        return _build([*leaves[:at], t, *leaves[at:]], depth)
    left, right = _children(t)
    split = _first_one(leaves, depth)
    return _node(_set_many(left, leaves[:split], depth + 1), _set_many(right, leaves[split:], depth + 1))


@dataclass(frozen=True)
class MapProof:
    """siblings: from the root down; other: the leaf (key hash, value hash) the path of an
    absent key ends at, or None (the path ends at the key's own leaf, or at an empty subtree)."""

    siblings: tuple[bytes, ...]
    other: tuple[bytes, bytes] | None = None


@dataclass(frozen=True)
class SparseMap:
    """A persistent map from key hash to value hash (and its payload)."""

    tree: Tree = None

    @property
    def root(self) -> bytes:
        return _hash(self.tree)

    def set(self, kh: bytes, vh: bytes, payload: Any = None) -> SparseMap:
        return SparseMap(_set(self.tree, _leaf(kh, vh, payload), 0))

    def set_many(self, items: Iterable[tuple[bytes, bytes, Any]]) -> SparseMap:
        """The map with each (key hash, value hash, payload) set (the last one wins for a repeated key):
        the same map as set() one by one, each node shared by their paths hashed once."""
        latest = {kh: (kh, vh, payload) for kh, vh, payload in items}
        return SparseMap(_set_many(self.tree, [_leaf(*latest[kh]) for kh in sorted(latest)], 0))

    @classmethod
    def build(cls, items: Iterable[tuple[bytes, bytes]], payloads: Iterable[Any] = ()) -> SparseMap:
        """The map of these (key hash, value hash) pairs, with these payloads in the same order if
        given (the last one wins for a repeated key)."""
        with_payloads = {kh: (kh, vh, payload) for (kh, vh), payload in itertools.zip_longest(items, payloads)}
        return cls(_build([_leaf(*with_payloads[kh]) for kh in sorted(with_payloads)], 0))

    def get(self, kh: bytes) -> bytes | None:
        leaf = _find(self.tree, kh, 0)
        return None if leaf is None else leaf[2]

    def payload(self, kh: bytes) -> Any:
        """kh's payload (None when kh is not in the map)."""
        leaf = _find(self.tree, kh, 0)
        return None if leaf is None else leaf[3]

    def payloads(self, since: SparseMap | None = None) -> Iterator[Any]:
        """The payload of every key (in key-hash order); with since, only of the keys whose value
        is new or changed since that map (shared and equal subtrees are skipped)."""
        return (leaf[3] for leaf in _changed(self.tree, None if since is None else since.tree, 0))

    def prove(self, kh: bytes) -> MapProof:
        """The proof of kh's value, or of its absence."""
        siblings = []
        t, depth = self.tree, 0
        while t is not None and not _is_leaf(t):
            children = _children(t)
            b = bit(kh, depth)
            siblings.append(_hash(children[1 - b]))
            t = children[b]
            depth += 1
        other = (t[1], t[2]) if t is not None and t[1] != kh else None
        return MapProof(tuple(siblings), other)


def verify_map_proof(root: bytes, kh: bytes, vh: bytes | None, proof: MapProof) -> None:
    """Check that the map with this root holds value hash vh at kh (a 32-byte key hash; vh None:
    holds nothing there). Raises MapProofError."""
    siblings = proof.siblings
    depth = len(siblings)
    if depth > MAX_DEPTH or (siblings and set(map(len, siblings)) != {HASH_SIZE}):
        raise MapProofError(f"a map proof has at most {MAX_DEPTH} siblings of {HASH_SIZE} bytes")
    if vh is not None:
        if proof.other is not None:
            raise MapProofError("a proof of a present key ends at that key's own leaf")
        h = leaf_hash(kh, vh)
    elif proof.other is None:
        h = EMPTY
    else:
        okh, ovh = proof.other
        if len(okh) != HASH_SIZE or len(ovh) != HASH_SIZE or okh == kh or _path(okh, depth) != _path(kh, depth):
            raise MapProofError("the leaf an absence proof ends at is not on the key's path, or is the key itself")
        h = leaf_hash(okh, ovh)
    path = _path(kh, depth)
    for sibling in reversed(siblings):  # node_hash, inlined: the edge's hot path
        h = _sha256(_NODE + sibling + h).digest() if path & 1 else _sha256(_NODE + h + sibling).digest()
        path >>= 1
    if h != root:
        raise MapProofError("the map proof does not lead to the index root")


def _path(kh: bytes, depth: int) -> int:
    """The first depth bits of a key hash, as an integer (the bit at depth - 1 lowest)."""
    return int.from_bytes(kh, "big") >> (8 * HASH_SIZE - depth)
