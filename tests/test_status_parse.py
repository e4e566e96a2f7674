"""A status proof's parse is bounded by the largest valid status proof before any object is built
(registry/status_proof.py scan_heads): hostile files are refused with StatusProofError at a small,
bounded memory cost, every valid one is still read (tests/test_index.py has the round trips)."""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.status import parse_status
from registry.index_map import MAX_DEPTH, MapProof
from registry.status_proof import (
    MAX_ARRAY,
    MAX_CONTAINERS,
    MAX_HISTORY,
    MAX_ITEMS,
    MAX_NESTING,
    MAX_PAIRS,
    MAX_RECORDS,
    MAX_STATUS_PROOF_BYTES,
    Included,
    KeyProof,
    StatusProof,
    StatusProofError,
    parse_status_proof,
    scan_heads,
)
from registry.trust_policy import VerifyError
from tlog.merkle import MAX_PROOF_HASHES

N = MAX_STATUS_PROOF_BYTES - 5
# Before the scan, parse_status_proof decoded these with cbor2 first: 289 MiB and 257 MiB of
# traced peak for the two 4 MiB arrays (python bench/status_parse.py measures both ways).
HOSTILE = {
    "4 MiB array of empty maps": (b"\x9a" + N.to_bytes(4, "big") + b"\xa0" * N, "an array of 4194299 entries"),
    "4 MiB array of empty arrays": (b"\x9a" + N.to_bytes(4, "big") + b"\x80" * N, "an array of 4194299 entries"),
    "records of empty maps": (cbor2.dumps({"v": 1, "keys": [], "root": {}, "records": [{}] * MAX_ARRAY, "checkpoint": b"x"}),
                              "more items, arrays and maps or nesting"),
    "nested arrays": (b"\x81" * N + b"\x00", "more items, arrays and maps or nesting"),
    "a map of 2**32 pairs": (b"\xbb" + (1 << 32).to_bytes(8, "big") + b"\x00" * 64, "a map of 4294967296 entries"),
    "an indefinite array of maps": (b"\x9f" + b"\xa0" * N + b"\xff", "an indefinite length or reserved head 0x9f at byte 0"),
}


def peak(f: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        f()
    except (StatusProofError, VerifyError):
        pass
    finally:
        high = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return high


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_status_proof_is_refused_before_it_is_built(name: str) -> None:
    data, message = HOSTILE[name]
    with pytest.raises(StatusProofError, match=message):
        parse_status_proof(data)
    with pytest.raises(VerifyError) as e:
        parse_status(data)  # what an edge node does with it
    assert e.value.reason == "status-malformed" and e.value.unusable_input
    assert peak(lambda: parse_status_proof(data)) < 1 << 20


def test_a_hostile_file_inside_every_bound_costs_no_more_than_a_valid_one_at_the_bounds() -> None:
    """The most items a valid proof may hold, as short text: refused after the scan, by its shape,
    at about the cost of decoding a valid status proof at every bound (42 MiB, bench/status_parse.py)."""
    lists = MAX_ITEMS // MAX_ARRAY
    items = [["abcdefghijk"] * MAX_ARRAY for _ in range(lists)] + [["abcdefghijk"] * (MAX_ITEMS - lists * (MAX_ARRAY + 1) - 2)]
    data = cbor2.dumps(items)
    assert len(data) <= MAX_STATUS_PROOF_BYTES
    with pytest.raises(StatusProofError, match="must have exactly the fields"):  # past the scan
        parse_status_proof(data)
    assert peak(lambda: parse_status_proof(data)) < 32 << 20


def nested(depth: int) -> bytes:
    return b"\x81" * depth + b"\x00"


@pytest.mark.parametrize("data,within", [
    (nested(MAX_NESTING), True), (nested(MAX_NESTING + 1), False),
    (cbor2.dumps(dict.fromkeys("abcde"[:MAX_PAIRS], 0)), True), (cbor2.dumps(dict.fromkeys("abcdef"[:MAX_PAIRS + 1], 0)), False),
    (cbor2.dumps([0] * MAX_ARRAY), True), (cbor2.dumps([0] * (MAX_ARRAY + 1)), False),
    (cbor2.dumps([[]] * (MAX_CONTAINERS - 1)), True), (cbor2.dumps([[]] * MAX_CONTAINERS), False),
])
def test_each_bound_of_the_scan_is_exact(data: bytes, within: bool) -> None:
    """At a bound the scan lets the file through to the field checks; one past it, the scan refuses."""
    with pytest.raises(StatusProofError) as e:
        parse_status_proof(data)
    assert ("must have exactly the fields" in str(e.value)) is within, str(e.value)


@pytest.mark.parametrize("extra", [0, 1])
def test_the_item_bound_is_exact(extra: int) -> None:
    lists = MAX_ITEMS // MAX_ARRAY
    last = MAX_ITEMS - lists * (MAX_ARRAY + 1) - 2 + extra  # the top array, its arrays and their items
    data = cbor2.dumps([[0] * MAX_ARRAY for _ in range(lists)] + [[0] * last])
    with pytest.raises(StatusProofError) as e:
        parse_status_proof(data)
    assert ("must have exactly the fields" in str(e.value)) is (extra == 0), str(e.value)


def naive_within_bounds(obj: Any, depth: int = 0) -> tuple[bool, int, int]:
    """Reference for the scan, on the decoded value: (only allowed types and every per-container bound
    kept, items, containers)."""
    if obj is None or type(obj) in (bytes, str) or (type(obj) is int and obj >= 0):
        return True, 1, 0
    if type(obj) is list or type(obj) is dict:
        children = obj if isinstance(obj, list) else [x for kv in obj.items() for x in kv]
        bound = MAX_ARRAY if type(obj) is list else MAX_PAIRS
        ok, items, containers = depth < MAX_NESTING and len(obj) <= bound, 1, 1
        for child in children:
            c_ok, c_items, c_containers = naive_within_bounds(child, depth + 1)
            ok, items, containers = ok and c_ok, items + c_items, containers + c_containers
        return ok, items, containers
    return False, 1, 0  # negative integers, floats, booleans


LEAVES = st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False) | st.binary(max_size=40) | st.text(max_size=10)
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=3), inner, max_size=7), max_leaves=60)


@settings(max_examples=400, deadline=None)
@given(VALUES)
def test_the_scan_refuses_exactly_what_a_naive_reference_does(value: Any) -> None:
    data = cbor2.dumps(value)
    ok, items, containers = naive_within_bounds(value)
    within = ok and items <= MAX_ITEMS and containers <= MAX_CONTAINERS
    try:
        scan_heads(data)
    except StatusProofError as e:
        assert not within, str(e)
    else:
        assert within


def test_the_largest_valid_status_proof_holds_exactly_the_bounds() -> None:
    """Every count of spec/status-proof.md at its bound, both keys with an `other` leaf: accepted, and
    its items and containers (counted by the reference) are exactly the scan's bounds."""
    history = tuple((i, i % 4) for i in range(MAX_HISTORY))
    key = KeyProof("acme", history, MapProof((bytes(32),) * MAX_DEPTH, (bytes(32), bytes(32))))
    largest = StatusProof(b"checkpoint", Included(2, b"root", (bytes(32),) * MAX_PROOF_HASHES), key,
                          dataclasses.replace(key, key="acme:app"),
                          tuple(Included(i, b"x", (bytes(32),) * MAX_PROOF_HASHES) for i in range(MAX_RECORDS)))
    data = largest.encode()
    assert len(data) <= MAX_STATUS_PROOF_BYTES
    assert parse_status_proof(data) == largest
    assert naive_within_bounds(cbor2.loads(data)) == (True, MAX_ITEMS, MAX_CONTAINERS)
