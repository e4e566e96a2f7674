"""The verifiable index against naive references written here from spec/status-proof.md: the map's
root and proofs for present and absent keys, key histories from random record sequences, and the
status-proof parser."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.index import IndexState
from registry.index_map import MapProof, MapProofError, SparseMap, key_hash, verify_map_proof
from registry.record import Action, IndexRoot, PackageRef, RecordError, Release, decode_index_root, record_for
from registry.status_proof import Included, KeyProof, StatusProof, StatusProofError, parse_status_proof
from tlog.errors import TooLargeError
from tlog.note import Ed25519Signer


def sha(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def naive_root(items: dict[bytes, bytes], depth: int = 0) -> bytes:
    """The spec's definition, directly: empty, one leaf, or split on the bit at depth."""
    if not items:
        return bytes(32)
    if len(items) == 1:
        ((kh, vh),) = items.items()
        return sha(b"\x10", kh, vh)
    halves: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
    for kh, vh in items.items():
        halves[(kh[depth // 8] >> (7 - depth % 8)) & 1][kh] = vh
    return sha(b"\x11", naive_root(halves[0], depth + 1), naive_root(halves[1], depth + 1))


# Key hashes from a tiny alphabet share long prefixes: deep paths and absence proofs ending at other leaves.
key_hashes = st.one_of(st.binary(min_size=32, max_size=32),
                       st.lists(st.sampled_from([0, 1, 255]), min_size=32, max_size=32).map(bytes))
values = st.binary(min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(key_hashes, values, max_size=40), st.lists(key_hashes, max_size=10), st.randoms())
def test_the_map_matches_the_naive_root_and_proves_presence_and_absence(items, probes, rnd) -> None:  # type: ignore[no-untyped-def]
    order = list(items.items())
    rnd.shuffle(order)
    incremental = SparseMap()
    for kh, vh in order:
        incremental = incremental.set(kh, vh)
    built = SparseMap.build(items.items())
    assert incremental.root == built.root == naive_root(items)
    assert not list(incremental.payloads(since=built)) and len(list(built.payloads())) == len(items)
    for kh in [*list(items)[:3], *(p for p in probes if p not in items)]:  # a changed value or a new key: only it
        assert list(built.set(kh, bytes(a ^ 1 for a in items.get(kh, bytes(32))), kh).payloads(since=built)) == [kh]
    for kh, vh in items.items():
        proof = incremental.prove(kh)
        verify_map_proof(built.root, kh, vh, proof)
        with pytest.raises(MapProofError):
            verify_map_proof(built.root, kh, None, proof)  # a present key cannot be shown absent
        with pytest.raises(MapProofError):
            verify_map_proof(built.root, kh, bytes(a ^ 1 for a in vh), proof)  # nor with another value
    for kh in probes:
        proof = built.prove(kh)
        if kh in items:
            continue
        verify_map_proof(built.root, kh, None, proof)
        assert built.get(kh) is None
        with pytest.raises(MapProofError):
            verify_map_proof(built.root, kh, bytes(32), proof)  # an absent key cannot be shown present
        for other in list(items)[:3]:  # a proof for another key proves nothing about this one
            with pytest.raises(MapProofError):
                verify_map_proof(built.root, kh, items[other], built.prove(other))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(key_hashes, values, max_size=30), st.lists(st.tuples(key_hashes, values), max_size=30), st.randoms())
def test_setting_many_keys_at_once_is_setting_them_one_by_one(items, updates, rnd) -> None:  # type: ignore[no-untyped-def]
    updates += [(kh, vh) for kh, vh in items.items() if rnd.random() < 0.3]  # replaced values (repeated keys: the last wins)
    rnd.shuffle(updates)
    before = SparseMap.build(items.items(), items)
    one_by_one = before
    for kh, vh in updates:
        one_by_one = one_by_one.set(kh, vh, vh)
    at_once = before.set_many((kh, vh, vh) for kh, vh in updates)
    assert at_once.tree == one_by_one.tree  # the same shape, hashes and payloads
    assert at_once.root == naive_root({**items, **dict(updates)})
    assert SparseMap().set_many((kh, vh, None) for kh, vh in items.items()).root == before.root
    assert before.root == naive_root(items)  # the old map is untouched


def test_an_updated_value_changes_only_its_path_and_old_maps_stay_valid() -> None:
    a = SparseMap().set(key_hash("acme"), bytes(32)).set(key_hash("acme:hello"), bytes(32))
    b = a.set(key_hash("acme"), b"\x01" * 32)
    assert a.root != b.root and a.get(key_hash("acme")) == bytes(32) and b.get(key_hash("acme")) == b"\x01" * 32
    verify_map_proof(a.root, key_hash("acme"), bytes(32), a.prove(key_hash("acme")))
    with pytest.raises(MapProofError):
        verify_map_proof(b.root, key_hash("acme"), bytes(32), b.prove(key_hash("acme")))


# A pool of signed records over two namespaces and two packages: random sequences of them (void
# ones included: the index lists every record that decodes) against a naive reference.
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")


def _action(signer: Ed25519Signer, action: Action):  # type: ignore[no-untyped-def]
    return record_for(action.action, signer.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), signer))


def _release(signer: Ed25519Signer, ref: PackageRef):  # type: ignore[no-untyped-def]
    rel = Release(ref, "00" * 32, ())
    return record_for("release", signer.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), signer))


POOL = [
    *(_action(ALICE, Action("key-grant", ns, key=k.vkey, issued=1)) for ns in ("acme", "zeta") for k in (ALICE, BOB)),
    *(_action(ALICE, Action("key-revocation", ns, key=BOB.vkey, issued=2)) for ns in ("acme", "zeta")),
    *(_release(s, PackageRef(ns, n, v)) for s in (ALICE, BOB) for ns in ("acme", "zeta") for n in ("a", "b") for v in ("1.0.0", "2.0.0")),
    *(_action(ALICE, Action("yank", ns, name=n, version="1.0.0", issued=3)) for ns in ("acme", "zeta") for n in ("a", "b")),
]


def naive_key(record) -> str:  # type: ignore[no-untyped-def]
    if record.type in ("key-grant", "key-revocation"):
        return str(record.body.namespace)
    body = record.body
    return f"{body.ref.namespace}:{body.ref.name}" if record.type == "release" else f"{body.namespace}:{body.name}"


def naive_value(history: list[tuple[int, int]]) -> bytes:
    packed = len(history).to_bytes(8, "big") + b"".join(i.to_bytes(8, "big") for i, _ in history) + bytes(c for _, c in history)
    return sha(b"wasmlog-index-history\x00", packed)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(range(len(POOL)))), max_size=40), st.lists(st.integers(1, 7), max_size=10))
def test_the_index_from_random_record_sequences_matches_a_naive_reference(picks, chunks) -> None:  # type: ignore[no-untyped-def]
    records = [None if p is None else POOL[p] for p in picks]  # None: an entry in no history (an index root, garbage)
    codes = {"release": 0, "key-grant": 1, "key-revocation": 2, "yank": 3}
    histories: dict[str, list[tuple[int, int]]] = {}
    for i, r in enumerate(records):
        if r is not None:
            histories.setdefault(naive_key(r), []).append((i, codes[r.type]))
    # applied in arbitrary chunks, as batches are
    state, start = IndexState(), 0
    for n in [*chunks, len(records)]:
        end = min(len(records), start + n)
        before, state = state, state.with_records([(i, records[i]) for i in range(start, end)], end)
        assert dict(state.changed(before)) == {k: h for k, h in state.histories.items() if before.history(k) != h}
        start = end
    assert state.size == len(records)
    assert {k: list(v) for k, v in state.histories.items()} == histories
    assert dict(state.changed(None)) == state.histories
    rebuilt = IndexState.from_histories(state.size, state.histories)  # a saved audit state, loaded
    assert rebuilt.root == state.root and rebuilt.histories == state.histories and not list(state.changed(rebuilt))
    values = {key_hash(k): naive_value(h) for k, h in histories.items()}
    assert state.root == naive_root(values)
    for key in ("acme", "zeta", "acme:a", "zeta:b", "nobody", "acme:zzz"):
        vh = values.get(key_hash(key))
        verify_map_proof(state.root, key_hash(key), vh, state.prove(key))


def test_index_root_records_are_strict() -> None:
    root = IndexRoot("example.com/log", 7, bytes(range(32)))
    assert decode_index_root(root.encode()) == root
    import cbor2
    for bad in (
        cbor2.dumps({"v": 1, "root": bytes(32), "size": 7, "type": "index-root", "origin": "o", "x": 1}),
        cbor2.dumps({"v": 2, "root": bytes(32), "size": 7, "type": "index-root", "origin": "o"}),
        cbor2.dumps({"v": 1, "root": bytes(31), "size": 7, "type": "index-root", "origin": "o"}),
        cbor2.dumps({"v": 1, "root": bytes(32), "size": -1, "type": "index-root", "origin": "o"}),
        cbor2.dumps({"v": 1, "root": bytes(32), "size": 7, "type": "release", "origin": "o"}),
        root.encode().replace(b"\x07", b"\x18\x07"),  # a non-minimal integer
        root.encode() + b"\x00",
    ):
        with pytest.raises(RecordError):
            decode_index_root(bad)


SAMPLE = StatusProof(
    b"example.com/log\n3\n" + bytes(10), Included(2, b"root-entry", (bytes(32),)),
    KeyProof("acme", ((0, 1),), MapProof((b"\x01" * 32,), None)),
    KeyProof("acme:a", ((1, 0),), MapProof((), (b"\x02" * 32, b"\x03" * 32))),
    (Included(0, b"grant", (bytes(32), b"\x04" * 32)),),
)


def test_a_status_proof_round_trips() -> None:
    assert parse_status_proof(SAMPLE.encode()) == SAMPLE


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(SAMPLE.encode()) - 1), st.integers(0, 255), st.booleans())
def test_the_status_proof_parser_takes_only_canonical_files(pos: int, byte: int, cut: bool) -> None:
    data = SAMPLE.encode()
    mutated = data[:pos] if cut else data[:pos] + bytes([byte]) + data[pos + 1:]
    try:
        parsed = parse_status_proof(mutated)
    except (StatusProofError, TooLargeError):
        return
    assert parsed.encode() == mutated  # whatever is accepted is exactly its own canonical encoding


def test_status_proof_bounds() -> None:
    with pytest.raises(TooLargeError):
        parse_status_proof(bytes(5 << 20))
    import dataclasses
    unordered = dataclasses.replace(SAMPLE, records=(SAMPLE.records[0], SAMPLE.records[0]))
    with pytest.raises(StatusProofError):
        parse_status_proof(unordered.encode())
    one_key = SAMPLE.encode().replace(b"\x82\xa5", b"\x81\xa5", 1)
    assert one_key != SAMPLE.encode()
    with pytest.raises(StatusProofError):
        parse_status_proof(one_key)


def test_a_status_proofs_history_columns_are_strict() -> None:
    """A history travels as types (a byte each) and indexes (the first, then increases of at least 1)."""
    import cbor2

    def with_package(types: object, indexes: object) -> bytes:
        obj = cbor2.loads(SAMPLE.encode())
        obj["keys"][1].update(types=types, indexes=indexes)
        return cbor2.dumps(obj, canonical=True)

    assert parse_status_proof(with_package(b"\x00\x03\x02", [1, 4, 1])).package.history == ((1, 0), (5, 3), (6, 2))
    assert parse_status_proof(with_package(b"", [])).package.history == ()
    for types, indexes in (
        (b"\x00", [1, 4]), (b"\x00\x03", [1]),  # columns of different lengths
        (b"\x00\x04", [1, 4]),  # no record type 4
        (b"\x00\x00", [1, 0]), (b"\x00\x00", [1, -3]),  # not increasing
        (b"\x00", [-1]), (b"\x00\x00", [2**63 - 2, 1]),  # not a log index
        ("\x00", [1]), (b"\x00", [True]), (b"\x00", [[1]]), (b"\x00\x00", [1, 1.0]),  # wrong types
    ):
        with pytest.raises(StatusProofError):
            parse_status_proof(with_package(types, indexes))


def test_status_proof_counts_are_bounded() -> None:
    """One past each bound of spec/status-proof.md is refused; the bound itself parses."""
    import dataclasses

    from registry.status_proof import MAX_HISTORY, MAX_RECORDS
    from tlog.merkle import MAX_PROOF_HASHES

    long_history = tuple((i, 0) for i in range(MAX_HISTORY))
    at_bounds = dataclasses.replace(
        SAMPLE, package=dataclasses.replace(SAMPLE.package, history=long_history, proof=MapProof((bytes(32),) * 256, None)),
        records=tuple(Included(i, b"x", (bytes(32),) * MAX_PROOF_HASHES) for i in range(MAX_RECORDS)))
    assert parse_status_proof(at_bounds.encode()) == at_bounds
    for past in (
        dataclasses.replace(at_bounds, package=dataclasses.replace(at_bounds.package, history=(*long_history, (MAX_HISTORY, 0)))),
        dataclasses.replace(at_bounds, package=dataclasses.replace(at_bounds.package, proof=MapProof((bytes(32),) * 257, None))),
        dataclasses.replace(at_bounds, records=(*at_bounds.records, Included(MAX_RECORDS, b"x", ()))),
        dataclasses.replace(at_bounds, root=Included(2, b"root-entry", (bytes(32),) * (MAX_PROOF_HASHES + 1))),
    ):
        with pytest.raises(StatusProofError):
            parse_status_proof(past.encode())
