"""RFC 9162 §2.1 tree hashes and proofs, planned as node reads and then computed.

A *node* is a perfect subtree, named (height, index): it covers the entries
[index * 2**height, (index + 1) * 2**height). Proof generation follows Go's
sumdb/tlog split: ``*_ranges`` and ``range_nodes`` say which stored nodes a
computation needs, one ``NodeReader.read_nodes`` call fetches them, and pure
code folds them.
Verification is the RFC 9162 algorithm, written independently of generation.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Protocol

from .errors import MalformedProofError, ProofError, SplitViewError
from .hashes import EMPTY_ROOT, HASH_SIZE, node_hash

_sha256 = hashlib.sha256

Node = tuple[int, int]  # (height, index)
Range = tuple[int, int]  # [lo, hi) of entry indexes

MAX_TREE_SIZE = 2**63 - 1  # what Go's tlog (int64) and C2SP clients accept
MAX_PROOF_HASHES = 63  # c2sp.org/tlog-witness: a proof never needs more for a 2**63 tree


class NodeReader(Protocol):
    def read_nodes(self, nodes: Sequence[Node], /) -> Sequence[bytes]:
        """Return the hashes of the given perfect-subtree nodes, in the same order.

        Raises NotFoundError if a node is not stored.
        """
        ...


def _split(n: int) -> int:
    """The largest power of two smaller than n (RFC 9162 §2.1.1 k), for n >= 2."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(lo: int, hi: int) -> list[Node]:
    """The perfect subtrees whose hashes fold into MTH(D[lo:hi]), left to right.

    Requires lo < hi and lo aligned as in RFC 9162's recursion (a multiple of
    the largest power of two <= hi - lo), which holds for every subtree a proof
    or tree hash names.
    """
    n = hi - lo
    if n > 0 and n & (n - 1) == 0 and lo & (n - 1) == 0:  # the common case: one perfect subtree
        return [(n.bit_length() - 1, lo >> (n.bit_length() - 1))]
    nodes: list[Node] = []
    while lo < hi:
        height = (hi - lo).bit_length() - 1
        if lo & ((1 << height) - 1):
            raise ValueError(f"range [{lo}, {hi}) is not an RFC 9162 subtree")
        nodes.append((height, lo >> height))
        lo += 1 << height
    return nodes


def fold_range(hashes: Sequence[bytes]) -> bytes:
    """Fold the hashes of range_nodes(lo, hi) into MTH(D[lo:hi])."""
    root = hashes[-1]
    for h in reversed(hashes[:-1]):
        root = node_hash(h, root)
    return root


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The subtrees whose hashes form the inclusion proof, leaf sibling first (RFC 9162 §2.1.3.1)."""
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise ProofError(f"no inclusion proof for index {index} in a tree of size {size}")
    ranges: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = 1 << ((hi - lo - 1).bit_length() - 1)  # _split, inlined: this loop is the proof server's hot path
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()
    return ranges


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """The subtrees whose hashes form the consistency proof (RFC 9162 §2.1.4.1).

    Requires 0 < old_size <= new_size. The proof for equal sizes is empty.
    """
    if not 0 < old_size <= new_size <= MAX_TREE_SIZE:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    ranges: list[Range] = []
    lo, hi, m, whole = 0, new_size, old_size, True
    # SUBPROOF(m, D[lo:hi], whole): collect right-hand siblings on the way down.
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            m -= k
            lo = lo + k
            whole = False
    if not whole:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def _read(ranges: Sequence[Range], reader: NodeReader) -> list[bytes]:
    """Read the nodes every range needs in one call, then fold each range's hash."""
    if not ranges:
        return []
    parts: list[Sequence[Node]] = []
    for lo, hi in ranges:
        n = hi - lo
        if n > 0 and n & (n - 1) == 0 and lo & (n - 1) == 0:  # one perfect subtree (range_nodes' common case, inlined)
            height = n.bit_length() - 1
            parts.append(((height, lo >> height),))
        else:
            parts.append(range_nodes(lo, hi))
    hashes = reader.read_nodes([node for part in parts for node in part])
    out: list[bytes] = []
    i = 0
    for part in parts:
        n = len(part)
        out.append(hashes[i] if n == 1 else fold_range(hashes[i : i + n]))
        i += n
    return out


def tree_hash(size: int, reader: NodeReader) -> bytes:
    """Return the root hash of the tree of this size (RFC 9162 §2.1.1)."""
    if size == 0:
        return EMPTY_ROOT
    return _read([(0, size)], reader)[0]


def inclusion_proof(index: int, size: int, reader: NodeReader) -> list[bytes]:
    """Return the inclusion proof for entry index in the tree of this size."""
    return _read(inclusion_ranges(index, size), reader)


def inclusion_proofs(indexes: Sequence[int], size: int, reader: NodeReader) -> list[list[bytes]]:
    """Inclusion proofs for many entries in one tree (each one inclusion_proof's), in the order asked.

    One walk down the tree visits each subtree holding any of the indexes once, naming the
    sibling subtrees on the way: a batch of neighbouring entries shares most of its proof, so
    the work is about one node per entry, not one per proof hash. One read fetches them all.
    This is how the sequencer answers a whole batch.
    """
    if not indexes:
        return []
    for index in indexes:
        if not 0 <= index < size <= MAX_TREE_SIZE:
            raise ProofError(f"no inclusion proof for index {index} in a tree of size {size}")
    wanted = sorted(set(indexes))
    plans: dict[int, tuple[Range, ...]] = {}  # index -> its proof's subtrees, leaf sibling first
    needed: list[Range] = []  # each visited subtree's sibling: distinct subtrees have distinct siblings
    walk: list[tuple[int, int, int, int, tuple[Range, ...]]] = [(0, size, 0, len(wanted), ())]  # [lo, hi), wanted[a:b], siblings from the root
    while walk:
        lo, hi, a, b, above = walk.pop()
        if hi - lo == 1:
            plans[lo] = above[::-1]
            continue
        mid = lo + (1 << ((hi - lo - 1).bit_length() - 1))  # RFC 9162's split: the largest power of two < hi - lo
        split = bisect.bisect_left(wanted, mid, a, b)
        if split > a:
            needed.append((mid, hi))
            walk.append((lo, mid, a, split, (*above, (mid, hi))))
        if split < b:
            needed.append((lo, mid))
            walk.append((mid, hi, split, b, (*above, (lo, mid))))
    get = dict(zip(needed, _read(needed, reader), strict=True)).__getitem__
    return [list(map(get, plans[index])) for index in indexes]


def consistency_proof(old_size: int, new_size: int, reader: NodeReader) -> list[bytes]:
    """Return the consistency proof from the tree of old_size to the tree of new_size."""
    return _read(consistency_ranges(old_size, new_size), reader)


def _check_hash(name: str, h: bytes) -> None:
    if len(h) != HASH_SIZE:
        raise MalformedProofError(f"{name} is {len(h)} bytes, want {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """Return the root implied by an inclusion proof (RFC 9162 §2.1.3.2).

    Requires 0 <= index < size and len(leaf) == HASH_SIZE. Raises ProofError
    if the proof has the wrong length for (index, size).
    """
    # Check the leaf length first: without it an empty leaf and an empty root
    # "verify" for size 1 (a case in transparency-dev's vectors).
    _check_hash("leaf hash", leaf)
    if not 0 <= index < size <= MAX_TREE_SIZE:
        raise ProofError(f"index {index} is not in a tree of size {size}")
    # The path splits where index and the last index (size - 1) diverge: below that level the
    # proof hashes are siblings on either side (the index's bits say which); above it, the
    # index's subtree is a left child only where the index has a 1 bit (RFC 9162 §2.1.3.2,
    # computed as transparency-dev/merkle does).
    inner = (index ^ (size - 1)).bit_length()
    if len(proof) != inner + (index >> inner).bit_count():
        raise ProofError(f"inclusion proof for {index} in size {size} has {len(proof)} hashes, want {inner + (index >> inner).bit_count()}")
    if set(map(len, proof)) - {HASH_SIZE}:
        raise ProofError(f"a proof hash is not {HASH_SIZE} bytes")
    r = leaf
    for p in proof[:inner]:
        r = _sha256(b"\x01" + p + r).digest() if index & 1 else _sha256(b"\x01" + r + p).digest()  # node_hash, inlined
        index >>= 1
    for p in proof[inner:]:
        r = _sha256(b"\x01" + p + r).digest()
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that leaf is entry index of the tree with this size and root. Raises ProofError."""
    _check_hash("root hash", root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof for index {index} does not match the root of size {size}")


def check_extends(old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: Sequence[bytes]) -> None:
    """The one fork and consistency decision: whether (new_size, new_root) extends (old_size, old_root).

    Requires old_size <= new_size. A tree of size 0 must have the empty root, and every tree
    extends it (the proof must then be empty); otherwise verify_consistency decides. Raises
    SplitViewError if the two trees prove two histories (equal sizes with different roots, or a
    proof yielding new_root from another old root), MalformedProofError if the proof is not one
    for these sizes, ProofError if it merely fails or a size-0 tree has another root.
    """
    if (old_size == 0 and old_root != EMPTY_ROOT) or (new_size == 0 and new_root != EMPTY_ROOT):
        raise ProofError("a tree of size 0 must have the empty root")
    if old_size == 0:
        if proof:
            raise MalformedProofError("a proof from size 0 must be empty")
        if new_size > MAX_TREE_SIZE:
            raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
        return
    verify_consistency(old_size, new_size, proof, old_root, new_root)


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree (old_size, old_root) is a prefix of (new_size, new_root) (RFC 9162 §2.1.4.2).

    Requires 0 < old_size <= new_size; an old size of 0 is the caller's case to
    handle (every tree extends the empty tree). Raises MalformedProofError if the
    proof is not one for these sizes, SplitViewError if it proves the two trees are
    not one history (equal sizes with different roots, or a proof that yields
    new_root from another root of old_size), and ProofError if it merely fails.
    """
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for p in proof:
        _check_hash("proof hash", p)
    if not 0 < old_size <= new_size <= MAX_TREE_SIZE:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size == new_size:
        if old_root != new_root:  # two histories, whatever the proof
            raise SplitViewError(f"different roots for the same size {old_size}")
        if proof:
            raise MalformedProofError("consistency proof between equal sizes must be empty")
        return
    want = len(consistency_ranges(old_size, new_size))
    if len(proof) != want:
        raise MalformedProofError(f"consistency proof from {old_size} to {new_size} has {len(proof)} hashes, want {want}")
    path = list(proof)
    old_is_node = old_size & (old_size - 1) == 0  # an exact power of two: the old root is a node
    if old_is_node:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if fr == old_root and sr == new_root:
        return
    if sr == new_root and not old_is_node:  # the proof yields new_root from another old root
        raise SplitViewError(f"the tree of size {new_size} has another root at size {old_size}")
    which = old_size if fr != old_root else new_size
    raise ProofError(f"consistency proof does not match the root of size {which}")
