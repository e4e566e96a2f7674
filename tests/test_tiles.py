"""tlog-tiles paths, tile contents, entry bundles; tlog-proof files."""

from __future__ import annotations

import pytest
import reference
import spec_reference
from conftest import load_vectors
from helpers import grow
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.checkpoint import Checkpoint
from tlog.errors import MalformedError, ProofError, TooLargeError
from tlog.hashes import leaf_hash
from tlog.merkle import inclusion_proof
from tlog.note import Ed25519Signer, Ed25519Verifier, Note, NoteSignature, sign_note
from tlog.proof_file import TlogProof, parse_tlog_proof, verify_tlog_proof
from tlog.tiles import (
    ENTRIES,
    TileID,
    TileNodeReader,
    encode_entry_bundle,
    format_index,
    parse_entry_bundle,
    parse_tile_path,
    tiles_for_size,
)

V = load_vectors("tiles.json")


@pytest.mark.parametrize("n,path", V["index_path"].items())
def test_index_paths(n: str, path: str) -> None:
    assert format_index(int(n)) == path
    assert parse_tile_path(f"tile/0/{path}") == TileID(0, int(n))


def _describe(size: int) -> list[str]:
    out: list[str] = []
    tiles = list(tiles_for_size(size))
    full0 = [t for t in tiles if t.level == 0 and t.is_full]
    if len(full0) > 1:
        out.append(f"{full0[0].path()} .. {full0[-1].path()} full")
        tiles = [t for t in tiles if t not in full0]
    return out + [t.path() for t in tiles]


@pytest.mark.parametrize("size,want", V["tiles_for_size"].items())
def test_tiles_for_size(size: str, want: list[str]) -> None:
    assert _describe(int(size)) == want


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/x001/x234/067",
        "tile/0/x001/x234/067.p/1",
        "tile/63/000.p/255",
        "tile/entries/x001/000",
        "tile/entries/000.p/7",
    ],
)
def test_paths_round_trip(path: str) -> None:
    assert parse_tile_path(path).path() == path


@pytest.mark.parametrize(
    "path",
    [
        "tile/64/000",
        "tile/01/000",
        "tile/0/1",
        "tile/0/0001",
        "tile/0/x000/001",  # non-canonical leading element
        "tile/0/001/002",  # missing x
        "tile/0/x001",
        "tile/0/000.p/0",
        "tile/0/000.p/256",
        "tile/0/000.p/01",
        "tile/0/000.p",
        "tile/0/000/",
        "tile//000",
        "tile/entries/000.p/",
        "tiles/0/000",
        "tile/-1/000",
        "tile/0/\u0661\u0662\u0663",
        "tile/0/" + "x999/" * 40 + "000",
    ],
)
def test_bad_paths_rejected(path: str) -> None:
    with pytest.raises(MalformedError):
        parse_tile_path(path)


@settings(max_examples=300)
@given(level=st.integers(-1, 63), index=st.integers(0, 2**60), width=st.integers(1, 256))
def test_tile_path_property(level: int, index: int, width: int) -> None:
    t = TileID(level, index, width)
    assert parse_tile_path(t.path()) == t


@settings(max_examples=300)
@given(s=st.text(alphabet="tile/entrx0123456789.p", max_size=40))
def test_tile_path_parser_round_trips_or_rejects(s: str) -> None:
    try:
        t = parse_tile_path(s)
    except MalformedError:
        return
    assert t.path() == s


def test_tile_contents_follow_the_spec_formula() -> None:
    entries = [b"e%d" % i for i in range(70_000)]
    store, _ = grow(entries, batch=5000)
    ref = tuple(entries)
    # MTH(D[(n*256+i)*256**l : (n*256+i+1)*256**l]) for a sample of tiles at each level
    for tile in [TileID(0, 0), TileID(0, 273, 112), TileID(1, 0), TileID(1, 1, 17), TileID(2, 0, 1)]:
        data = store.read_tile(tile.level, tile.index)[: tile.width * 32]
        assert len(data) == tile.width * 32
        for i in range(0, tile.width, 37):
            lo = (tile.index * 256 + i) * 256**tile.level
            assert data[i * 32 : i * 32 + 32] == reference.mth(ref, lo, lo + 256**tile.level)


@settings(max_examples=100)
@given(entries=st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_entry_bundle_round_trip(entries: list[bytes]) -> None:
    assert parse_entry_bundle(encode_entry_bundle(entries), len(entries)) == entries


def test_entry_bundle_strict() -> None:
    bundle = encode_entry_bundle([b"a", b"bc"])
    with pytest.raises(MalformedError):
        parse_entry_bundle(bundle, 1)  # trailing data
    with pytest.raises(MalformedError):
        parse_entry_bundle(bundle, 3)  # too few
    with pytest.raises(MalformedError):
        parse_entry_bundle(bundle[:-1], 2)  # truncated
    with pytest.raises(TooLargeError):
        encode_entry_bundle([b"x" * 65536])
    assert parse_entry_bundle(encode_entry_bundle([b"x" * 65535]), 1) == [b"x" * 65535]


def _proof_fixture(index: int = 5, extra: bytes | None = b"the entry") -> tuple[TlogProof, Ed25519Signer, list[bytes]]:
    entries = [b"entry %d" % i for i in range(10)]
    store, state = grow(entries)
    key = Ed25519Signer.generate("example.com/log")
    note = sign_note(Checkpoint("example.com/log", 10, state.root_hash).text(), [key])
    proof = inclusion_proof(index, 10, TileNodeReader(store.read_tile))
    return TlogProof(index, tuple(proof), note, extra), key, entries


def test_tlog_proof_round_trip_and_verify() -> None:
    tp, key, entries = _proof_fixture()
    data = tp.encode()
    assert data.startswith(b"c2sp.org/tlog-proof@v1\nextra dGhlIGVudHJ5\nindex 5\n")
    parsed = parse_tlog_proof(data)
    assert parsed == tp
    cp, _, _ = verify_tlog_proof(parsed, leaf_hash(entries[5]), Ed25519Verifier(key.name, key.public_key))
    assert cp.size == 10
    with pytest.raises(ProofError):
        verify_tlog_proof(parsed, leaf_hash(entries[4]), Ed25519Verifier(key.name, key.public_key))
    with pytest.raises(ProofError):
        verify_tlog_proof(parsed, leaf_hash(entries[5]), Ed25519Verifier(key.name, key.public_key), origin="other")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.replace(b"index 5", b"index 05"),
        lambda d: d.replace(b"index 5", b"index  5"),
        lambda d: d.replace(b"c2sp.org/tlog-proof@v1", b"c2sp.org/tlog-proof@v2"),
        lambda d: d.replace(b"extra dGhlIGVudHJ5\n", b"extra \n"),
        lambda d: d.replace(b"extra dGhlIGVudHJ5\n", b"extra dGhlIGVudHJ5=\n"),
        lambda d: d.replace(b"\n\n", b"\n\n\n", 1),
        lambda d: d.replace(b"\n\n", b"\n", 1),
        lambda d: d.replace(b"index 5\n", b""),
        lambda d: d + b"\n",
        lambda d: d[:-1],
    ],
)
def test_tlog_proof_manglings_rejected(mangle) -> None:  # type: ignore[no-untyped-def]
    tp, _, _ = _proof_fixture()
    with pytest.raises(MalformedError):
        parse_tlog_proof(mangle(tp.encode()))


@settings(max_examples=300, deadline=None)
@given(i=st.integers(0, 400), b=st.integers(1, 255))
def test_tlog_proof_byte_flips_never_verify_wrongly(i: int, b: int) -> None:
    tp, key, entries = _proof_fixture(extra=None)
    data = bytearray(tp.encode())
    data[i % len(data)] ^= b
    try:
        parsed = parse_tlog_proof(bytes(data))
        verify_tlog_proof(parsed, leaf_hash(entries[parsed.index]) if parsed.index < 10 else b"\0" * 32,
                          Ed25519Verifier(key.name, key.public_key))
    except Exception as e:
        from tlog.errors import TlogError

        assert isinstance(e, TlogError)
        return
    pytest.fail("a mangled tlog-proof verified")


def test_entries_level_is_named_entries() -> None:
    assert TileID(ENTRIES, 1234067, 3).path() == "tile/entries/x001/x234/067.p/3"


def test_tile_summaries_follow_the_formula() -> None:
    entries = [b"s%d" % i for i in range(70_000)]
    store, _ = grow(entries, batch=7000)
    ref = tuple(entries)
    for (level, index), width in [((0, 0), 256), ((0, 273), 112), ((1, 0), 256), ((1, 1), 17)]:
        summary = store.read_summary(level, index)
        assert summary is not None and len(summary) == (width // 16) * 32
        span = 16 * 256**level  # entries under one summary hash
        for j in range(width // 16):
            lo = index * 256 ** (level + 1) + j * span
            assert summary[j * 32 : j * 32 + 32] == reference.mth(ref, lo, lo + span)


def _parse_tlog_proof_by_lines(data: bytes) -> tuple[TlogProof, object, object]:
    """The spec's line-by-line reading (tests/spec_reference.py, no tlog parser): the reference for parse_tlog_proof."""
    from tlog.proof_file import MAX_EXTRA_BYTES, MAX_TLOG_PROOF_BYTES

    try:
        read = spec_reference.tlog_proof(data, MAX_TLOG_PROOF_BYTES, (MAX_EXTRA_BYTES + 2) // 3 * 4)
    except spec_reference.TooLarge:
        raise TooLargeError("too large") from None
    if read is None:
        raise MalformedError("refused")
    (index, proof, checkpoint, extra), (text, signatures), fields = read
    return TlogProof(index, proof, checkpoint, extra), Note(text, tuple(map(NoteSignature._make, signatures))), Checkpoint(*fields)


def _assert_fast_path_agrees(data: bytes) -> None:
    """parse_tlog_proof gives what the line-by-line path gives: the same value, or the same error type."""
    try:
        want: object = _parse_tlog_proof_by_lines(data)
    except MalformedError as e:  # TooLargeError is a MalformedError
        want = type(e)
    try:
        got = parse_tlog_proof(data)
        result: object = (got, got.note, got.parsed)
    except MalformedError as e:
        result = type(e)
    assert result == want, data


_COSIGNER = Ed25519Signer.generate("w.example", 0x04)
_PROOF_EDITS = [b"\x00", b"\x1f", b"\n", b"\n\n", b" ", b"=", b"A", b"+", b"\xe2\x80\x94 ", b"\xc3\xa9", b"\xff", b"0", b"-"]


@settings(max_examples=1000, deadline=None)
@given(index=st.integers(0, 9), extra=st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
       cosigned=st.booleans(), exts=st.lists(st.sampled_from(["ext", "é", "a b"]), max_size=2),
       edit=st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.integers(-1, 1), st.integers(0, 3), st.sampled_from(_PROOF_EDITS))))
def test_tlog_proof_fast_path_matches_line_by_line(index: int, extra: bytes | None, cosigned: bool, exts: list[str],
                                                   edit: tuple[int, int, int, bytes] | None) -> None:
    from tlog.cosignature import cosign

    tp, key, _ = _proof_fixture(index, extra)
    text = Checkpoint("example.com/log", 10, b"\x07" * 32, tuple(exts)).text()
    note = sign_note(text, [key]) + (cosign(_COSIGNER, text, 1_700_000_000).line().encode() if cosigned else b"")
    data = TlogProof(tp.index, tp.proof, note, tp.extra).encode()
    if edit is not None:  # replace `drop` bytes with `insert` next to a field boundary (space or newline)
        k, offset, drop, insert = edit
        boundaries = [i for i, c in enumerate(data) if c in b" \n"]
        at = min(max(boundaries[k % len(boundaries)] + offset, 0), len(data))
        data = data[:at] + insert + data[at + drop :]
    _assert_fast_path_agrees(data)


@pytest.mark.parametrize("mangle", [
    lambda d: d.replace(b"index 5", b"index 05"),
    lambda d: d.replace(b"index 5", b"index 99999999999999999999"),
    lambda d: d.replace(b"index 5", b"index 9223372036854775808"),
    lambda d: d.replace(b"example.com/log\n10", b"example.com/\x01log\n10"),
    lambda d: d.replace(b"example.com/log\n10", b"example.com/\x7flog\n10"),
    lambda d: d.replace(b"example.com/log\n10", b"example.com/log\n010"),
    lambda d: d.replace(b"Bwc=\n\n", b"Bwc=\next\x09x\n\n"),
    lambda d: d.replace(b"Bwc=\n\n", b"Bwc=\n\xc3\xa9\n\n"),
    lambda d: d.replace(b"BwcHBwc=\n", b"BwcHBwd=\n"),
    lambda d: d.replace(b"\xe2\x80\x94 example.com/log ", b"\xe2\x80\x94 example.com/l\xc3\xb6g "),
    lambda d: d.replace(b"\xe2\x80\x94 example.com/log ", b"\xe2\x80\x94 example.com/l\x01g "),
    lambda d: d.replace(b"=\n\n", b"\n\n", 1),
    lambda d: d + b"\xe2\x80\x94 w.example AAAAAAA=\n",
    lambda d: d + b"\xe2\x80\x94 w.example AAAAAA==\n",
    lambda d: d + b"\xe2\x80\x94 w.example AAAA\n",
])
def test_tlog_proof_fast_path_matches_line_by_line_on_edge_cases(mangle) -> None:  # type: ignore[no-untyped-def]
    tp, key, _ = _proof_fixture()
    note = sign_note(Checkpoint("example.com/log", 10, b"\x07" * 32).text(), [key])
    data = mangle(TlogProof(tp.index, tp.proof, note, tp.extra).encode())
    _assert_fast_path_agrees(data)
