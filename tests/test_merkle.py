"""Merkle hashing and proofs: published vectors, a naive reference, and manglings."""

from __future__ import annotations

import base64

import pytest
import reference
from conftest import load_vectors
from helpers import grow, reader
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.compact import CompactRange
from tlog.errors import MalformedProofError, ProofError, SplitViewError
from tlog.hashes import EMPTY_ROOT, leaf_hash, node_hash
from tlog.merkle import (
    consistency_proof,
    inclusion_proof,
    inclusion_proofs,
    root_from_inclusion_proof,
    tree_hash,
    verify_consistency,
    verify_inclusion,
)

V = load_vectors("rfc6962-8-leaves.json")
LEAVES = [base64.b64decode(x) for x in V["leaves_b64"]]
b64 = base64.b64decode


def test_leaf_hashes_match_vectors() -> None:
    assert [leaf_hash(x) for x in LEAVES] == [b64(h) for h in V["leaf_hashes"]]


def test_empty_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == V["roots_hex"][0]


def test_roots_of_every_prefix_match_vectors() -> None:
    store, _ = grow(LEAVES, batch=3)
    for size in range(len(LEAVES) + 1):
        assert tree_hash(size, reader(store)) == b64(V["roots"][size])
        c = CompactRange()
        for x in LEAVES[:size]:
            c.append(leaf_hash(x))
        assert c.root() == b64(V["roots"][size])


def test_inclusion_vectors() -> None:
    store, _ = grow(LEAVES)
    for case in V["inclusion_proofs"]:
        proof = [b64(p) for p in case["proof"]]
        assert inclusion_proof(case["leaf_index"], case["tree_size"], reader(store)) == proof
        verify_inclusion(case["leaf_index"], case["tree_size"], b64(case["leaf_hash"]), proof, b64(case["root_hash"]))


def test_consistency_vectors() -> None:
    store, _ = grow(LEAVES)
    cases = V["consistency_proofs"]
    assert cases
    for case in cases:
        old, new = case["old_size"], case["new_size"]
        proof = [b64(p) for p in case["proof"]]
        assert consistency_proof(old, new, reader(store)) == proof
        verify_consistency(old, new, proof, b64(case["old_root"]), b64(case["new_root"]))


# Every pair of sizes up to 300 (crossing the first tile boundary) against the RFC's definitions.
N = 300
ENTRIES = tuple(b"entry %d" % i for i in range(N))
STORE, _ = grow(list(ENTRIES), batch=41)


@pytest.mark.parametrize("size", range(1, N + 1))
def test_inclusion_matches_reference(size: int) -> None:
    r = reader(STORE, summaries=size % 2 == 0)  # both ways of reading tiles
    root = reference.mth(ENTRIES, 0, size)
    assert tree_hash(size, r) == root
    for index in range(size):
        proof = inclusion_proof(index, size, r)
        assert proof == reference.inclusion_proof(index, size, ENTRIES)
        verify_inclusion(index, size, leaf_hash(ENTRIES[index]), proof, root)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, N), data=st.data())
def test_batched_inclusion_proofs_are_the_one_at_a_time_proofs(size: int, data: st.DataObject) -> None:
    """Any indexes (runs of neighbours as a batch answers, scattered ones, repeats, any order): each
    proof is inclusion_proof's and the naive reference's, in the order asked."""
    start = data.draw(st.integers(0, size - 1))
    run = list(range(start, min(size, start + data.draw(st.integers(1, 130)))))
    indexes = data.draw(st.one_of(st.just(run), st.lists(st.integers(0, size - 1), max_size=40), st.permutations(run)))
    r = reader(STORE, summaries=data.draw(st.booleans()))
    proofs = inclusion_proofs(indexes, size, r)
    assert proofs == [inclusion_proof(i, size, r) for i in indexes]
    assert proofs == [reference.inclusion_proof(i, size, ENTRIES) for i in indexes]


def test_batched_inclusion_proofs_refuse_an_index_outside_the_tree() -> None:
    r = reader(STORE)
    assert inclusion_proofs([], 5, r) == []
    for indexes, bad in (([5], 5), ([0, 4, 5], 5), ([-1, 0], -1)):
        with pytest.raises(ProofError, match=f"index {bad} in a tree of size 5"):
            inclusion_proofs(indexes, 5, r)


@pytest.mark.parametrize("new", range(1, N + 1))
def test_consistency_matches_reference(new: int) -> None:
    r = reader(STORE, summaries=new % 2 == 1)
    new_root = reference.mth(ENTRIES, 0, new)
    for old in range(1, new + 1):
        proof = consistency_proof(old, new, r)
        assert proof == reference.consistency_proof(old, new, ENTRIES)
        verify_consistency(old, new, proof, reference.mth(ENTRIES, 0, old), new_root)


def test_large_tree_crosses_three_tile_levels() -> None:
    entries = [b"%d" % i for i in range(70_000)]
    store, state = grow(entries, batch=4099)
    ref = tuple(entries)
    assert len(store.summaries[(0, 0)]) == 16 * 32 and len(store.summaries[(1, 1)]) == (17 // 16) * 32
    for r in (reader(store), reader(store, summaries=True)):
        assert tree_hash(70_000, r) == reference.mth(ref) == state.root_hash
        for index, size in [(0, 70_000), (65_535, 65_536), (65_536, 69_999), (69_999, 70_000), (12_345, 66_000)]:
            assert inclusion_proof(index, size, r) == reference.inclusion_proof(index, size, ref)
        batch = [*range(65_300, 65_800), 3, 69_999]  # across index 65,536 (a new level-1 tile), plus far ones
        assert inclusion_proofs(batch, 70_000, r) == [inclusion_proof(i, 70_000, r) for i in batch]  # inclusion_proof: the reference above
        for old, new in [(1, 70_000), (256, 65_537), (65_536, 70_000), (69_999, 70_000), (4097, 65_535)]:
            assert consistency_proof(old, new, r) == reference.consistency_proof(old, new, ref)


# Verifiers must reject every single-bit or structural mangling.
@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, N), data=st.data())
def test_mangled_inclusion_proofs_fail(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, reader(STORE))
    root = reference.mth(ENTRIES, 0, size)
    leaf = leaf_hash(ENTRIES[index])
    # (Changing only the size is not a mangling: a proof for (0, 3) also proves (0, 4)
    # against the same root; the checkpoint is what binds a root to its size.)
    choice = data.draw(st.sampled_from(["flip", "drop", "add", "index", "leaf"]))
    if choice == "flip" and proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        proof[i] = bytes(b ^ (1 << (bit % 8)) if j == bit // 8 else b for j, b in enumerate(proof[i]))
    elif choice == "drop" and proof:
        proof.pop()
    elif choice == "add":
        proof.append(b"\x00" * 32)
    elif choice == "index" and size > 1:
        index = (index + 1) % size
    elif choice == "leaf":
        leaf = leaf_hash(b"other")
    else:
        return
    with pytest.raises(ProofError):
        verify_inclusion(index, size, leaf, proof, root)


@settings(max_examples=300, deadline=None)
@given(new=st.integers(2, N), data=st.data())
def test_mangled_consistency_proofs_fail(new: int, data: st.DataObject) -> None:
    old = data.draw(st.integers(1, new - 1))
    proof = consistency_proof(old, new, reader(STORE))
    old_root, new_root = reference.mth(ENTRIES, 0, old), reference.mth(ENTRIES, 0, new)
    choice = data.draw(st.sampled_from(["flip", "drop", "add", "old", "newroot", "oldroot"]))
    if choice == "flip":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
    elif choice == "drop":
        proof.pop()
    elif choice == "add":
        proof.append(b"\x00" * 32)
    elif choice == "old":
        old = old + 1 if old + 1 < new else old - 1
        if old == 0:
            return
    elif choice == "newroot":
        new_root = node_hash(new_root, new_root)
    else:
        old_root = node_hash(old_root, old_root)
    with pytest.raises(ProofError):
        verify_consistency(old, new, proof, old_root, new_root)


@settings(max_examples=300, deadline=None)
@given(new=st.integers(2, N), data=st.data())
def test_no_mangled_or_garbage_proof_is_a_split_view(new: int, data: st.DataObject) -> None:
    """Whatever the proof, between the true roots it never proves a fork; a proof of the wrong shape is malformed."""
    old = data.draw(st.integers(1, new - 1))
    proof = consistency_proof(old, new, reader(STORE))
    old_root, new_root = reference.mth(ENTRIES, 0, old), reference.mth(ENTRIES, 0, new)
    choice = data.draw(st.sampled_from(["flip", "drop", "add", "short-hash", "garbage", "swap"]))
    if choice == "flip":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = bytes([proof[i][0] ^ 1 << data.draw(st.integers(0, 7))]) + proof[i][1:]
    elif choice == "drop":
        proof.pop(data.draw(st.integers(0, len(proof) - 1)))
    elif choice == "add":
        proof.insert(data.draw(st.integers(0, len(proof))), data.draw(st.binary(min_size=32, max_size=32)))
    elif choice == "short-hash":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = proof[i][: data.draw(st.integers(0, 31))]
    elif choice == "garbage":
        proof = data.draw(st.lists(st.binary(max_size=40), max_size=20))
    elif len(proof) > 1:
        proof.reverse()
    if proof == consistency_proof(old, new, reader(STORE)):
        return
    with pytest.raises(ProofError) as e:
        verify_consistency(old, new, proof, old_root, new_root)
    assert not isinstance(e.value, SplitViewError)
    if choice in ("drop", "add", "short-hash"):
        assert isinstance(e.value, MalformedProofError)


@settings(max_examples=100, deadline=None)
@given(new=st.integers(2, N), data=st.data())
def test_a_proof_from_another_history_is_a_split_view(new: int, data: st.DataObject) -> None:
    """A forked log's own valid proof, checked against the honest old root, proves the fork (naive reference trees)."""
    old = data.draw(st.integers(1, new - 1))
    changed = data.draw(st.integers(0, old - 1))
    forked = ENTRIES[:changed] + (b"forked",) + ENTRIES[changed + 1 :]
    proof = reference.consistency_proof(old, new, forked)
    honest_old = reference.mth(ENTRIES, 0, old)
    with pytest.raises(ProofError) as e:
        verify_consistency(old, new, proof, honest_old, reference.mth(forked, 0, new))
    if old & (old - 1) == 0:  # the old root is itself a node of the proof: a mismatch proves nothing
        assert type(e.value) is ProofError
    else:
        assert isinstance(e.value, SplitViewError)
    with pytest.raises(SplitViewError):
        verify_consistency(old, old, [], honest_old, reference.mth(forked, 0, old))


def test_verifier_edge_cases() -> None:
    leaf = leaf_hash(b"x")
    with pytest.raises(ProofError):  # transparency-dev: empty leaf and root must not verify at size 1
        verify_inclusion(0, 1, b"", [], b"")
    with pytest.raises(ProofError):
        root_from_inclusion_proof(1, 1, leaf, [])
    with pytest.raises(ProofError):
        root_from_inclusion_proof(-1, 1, leaf, [])
    with pytest.raises(ProofError):  # old size 0 is the caller's case, as in transparency-dev's vectors
        verify_consistency(0, 1, [], EMPTY_ROOT, leaf)
    with pytest.raises(ProofError):
        verify_consistency(2, 1, [], leaf, leaf)
    with pytest.raises(ProofError):
        verify_consistency(3, 3, [leaf], leaf, leaf)
    with pytest.raises(ProofError):
        verify_consistency(3, 3, [], leaf, node_hash(leaf, leaf))
    verify_consistency(3, 3, [], leaf, leaf)
    with pytest.raises(ProofError):
        verify_consistency(1, 2, [], leaf, leaf)
