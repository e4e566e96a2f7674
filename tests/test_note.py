"""signed-note, tlog-checkpoint and tlog-cosignature: vectors, round trips and manglings."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
import spec_reference
from conftest import load_vectors
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.cosignature import (
    CosignatureV1Verifier,
    cosign,
    cosignature_timestamp,
    cosignature_verifier_from_vkey,
    signed_message,
)
from tlog.errors import MalformedError, SignatureError, TlogError, UnverifiedNoteError
from tlog.hashes import leaf_hash
from tlog.note import (
    ALG_COSIGNATURE_V1,
    MIN_ACCEPTED_SIGNATURES,
    Ed25519Signer,
    Ed25519Verifier,
    b64decode_strict,
    open_note,
    parse_note,
    parse_private_key,
    sign_note,
    verifier_from_vkey,
)

_canonical_b64_reference = spec_reference.canonical_b64
_note_reference = spec_reference.note

V = load_vectors("signed-note.json")
ED = V["ed25519_note"]


def test_go_key_pair_reproduces_go_signature() -> None:
    signer = parse_private_key(ED["skey"])
    assert signer.vkey == ED["vkey"]
    assert signer.private_key == ED["skey"]
    assert sign_note(ED["text"], [signer]).decode() == ED["signed_note"]
    note, verified = open_note(ED["signed_note"].encode(), [verifier_from_vkey(ED["vkey"])])
    assert note.text == ED["text"] and [s.name for s in verified] == ["PeterNeumann"]


def test_changed_text_fails() -> None:
    signed = ED["signed_note"].replace("cryptography", "Cryptography").encode()
    with pytest.raises(SignatureError):
        open_note(signed, [verifier_from_vkey(ED["vkey"])])


def test_leading_zero_key_id() -> None:
    k = V["leading_zero_key_id"]
    signer = parse_private_key(k["skey"])
    assert signer.vkey == k["vkey"] and signer.key_id == 0xC67


@pytest.mark.parametrize("case", V["bad_vkeys"], ids=lambda c: c["why"])
def test_bad_vkeys_rejected(case: dict) -> None:
    with pytest.raises(MalformedError):
        verifier_from_vkey(case["vkey"])


def test_vkey_manglings_rejected() -> None:  # golang/mod note_test.go
    b = ED["vkey"]
    bad = {b[i:j] for i in range(len(b)) for j in range(i + 1, len(b) + 1)} - {b}
    bad |= {b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :] for i in range(len(b))}
    for v in bad:
        with pytest.raises(MalformedError):
            verifier_from_vkey(v)


def test_record_hash_vector() -> None:
    r = V["record_hash"]
    assert base64.b64encode(leaf_hash(r["data"].encode())).decode() == r["leaf_hash_b64"]


def test_go_sumdb_tree_note_parses_as_checkpoint() -> None:
    cp = parse_checkpoint(V["record_hash"]["tree_note_text"])
    assert (cp.origin, cp.size) == ("go.sum database tree", 123456789012)


def test_cosignature_vector() -> None:
    c = V["cosignature_v1"]
    raw = base64.b64decode(c["signature_b64"])
    assert raw[:4].hex() == "646846b9"
    assert cosignature_timestamp(raw[4:]) == 1727964367
    verifier = cosignature_verifier_from_vkey(c["vkey_0x04"])
    assert verifier.key_id == 0xDA77ADE7  # SHA-256(name || 0x0A || 0x04 || key)[:4], checked by the parser
    with pytest.raises(MalformedError):
        cosignature_timestamp(base64.b64decode(c["plain_ed25519_signature_b64"])[4:])
    with pytest.raises(MalformedError):  # a 0x04 key is not a note key, and the other way round
        verifier_from_vkey(c["vkey_0x04"])
    with pytest.raises(MalformedError):
        cosignature_verifier_from_vkey(c["vkey_0x01"])


def test_cosignature_signed_message_matches_spec_example() -> None:
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert signed_message(text, 1679315147).decode() == V["cosignature_v1"]["signed_message_example"]


def test_cosign_and_verify_round_trip() -> None:
    log = Ed25519Signer.generate("example.com/log")
    witness = Ed25519Signer.generate("witness.example", ALG_COSIGNATURE_V1)
    cp = Checkpoint("example.com/log", 5, b"\x07" * 32)
    signed = sign_note(cp.text(), [log])
    cosig = cosign(witness, cp.text(), 1700000000)
    note = signed + cosig.line().encode()
    wv = CosignatureV1Verifier(witness.name, witness.public_key)
    assert wv.vkey == witness.vkey
    opened, verified = open_note(note, [Ed25519Verifier(log.name, log.public_key), wv])
    assert {s.name for s in verified} == {"example.com/log", "witness.example"}
    assert cosignature_timestamp(verified[1].signature) == 1700000000
    # the cosignature does not verify over a different checkpoint
    other = Checkpoint("example.com/log", 6, b"\x07" * 32)
    assert not wv.verify(other.text().encode(), cosig.signature)


def test_unknown_signatures_ignored_and_many_accepted() -> None:
    signers = [Ed25519Signer.generate(f"k{i}.example") for i in range(MIN_ACCEPTED_SIGNATURES + 4)]
    text = "example.com/log\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    signed = sign_note(text, signers)
    last = signers[-1]
    _, verified = open_note(signed, [Ed25519Verifier(last.name, last.public_key)])
    assert [s.name for s in verified] == [last.name]
    with pytest.raises(UnverifiedNoteError):
        open_note(signed, [Ed25519Verifier("nobody", last.public_key)])


@pytest.mark.parametrize(
    "data",
    [
        b"no signatures\n",
        b"text\n\n",
        b"text\n\n\xe2\x80\x94 name AAAA\n",  # signature shorter than key ID + 1 byte
        b"text\n\n- name AAAAAAA=\n",  # not an em dash
        b"te\x01xt\n\n\xe2\x80\x94 name AAAAAAA=\n",  # control character
        b"text\r\n\n\xe2\x80\x94 name AAAAAAA=\n",
        b"text\n\n\xe2\x80\x94 name AAAAAAA=",  # no final newline
        b"text\n\n\xe2\x80\x94 na+me AAAAAAA=\n",
        b"text\n\n\xe2\x80\x94 name AAAAAAB=\n",  # non-canonical base64 padding bits
        b"text\n\n\xe2\x80\x94 name AAAAAAA\n",  # missing padding
        b"\xff\n\n\xe2\x80\x94 name AAAAAAA=\n",
    ],
)
def test_malformed_notes_rejected(data: bytes) -> None:
    with pytest.raises(MalformedError):
        parse_note(data)


@pytest.mark.parametrize(
    "text",
    [
        "o\n01\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
        "o\n+1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
        "o\n\u0661\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
        "o\n9223372036854775808\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
        "o\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\n",
        "o\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=\n",  # non-zero pad bits
        "o\n1\nAAAA\n",
        "\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n",
        "o\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\n",
        "o\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        "o\n1\n",
    ],
)
def test_malformed_checkpoints_rejected(text: str) -> None:
    with pytest.raises(MalformedError):
        parse_checkpoint(text)


origins = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FFF), min_size=1, max_size=40)
ext = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(origin=origins, size=st.integers(0, 2**63 - 1), root=st.binary(min_size=32, max_size=32), exts=st.lists(ext, max_size=3))
def test_checkpoint_round_trip(origin: str, size: int, root: bytes, exts: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(exts))
    assert parse_checkpoint(cp.text()) == cp


KEY = Ed25519Signer.generate("example.com/log")
GOOD = sign_note(Checkpoint("example.com/log", 3, b"\x01" * 32).text(), [KEY])


@settings(max_examples=300, deadline=None)
@given(i=st.integers(0, len(GOOD) - 1), b=st.integers(1, 255))
def test_mangled_signed_checkpoint_never_verifies(i: int, b: int) -> None:
    data = bytearray(GOOD)
    data[i] ^= b
    verifier = Ed25519Verifier(KEY.name, KEY.public_key)
    try:
        note, _ = open_note(bytes(data), [verifier])
    except TlogError:
        return
    # If it opened, the change can only have hit bytes outside the signed text
    # and signature that the parser still canonicalizes: that must not happen.
    pytest.fail(f"mangled note verified: {bytes(data)!r} -> {note}")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_parse_note_round_trips_or_rejects(data: bytes) -> None:
    try:
        note = parse_note(data)
    except MalformedError:
        return
    assert note.encode() == data


def test_private_key_with_wrong_type_rejected() -> None:
    k = Ed25519Signer.generate("w.example", ALG_COSIGNATURE_V1)
    with pytest.raises(MalformedError):
        parse_private_key(k.private_key)
    assert parse_private_key(k.private_key, alg=ALG_COSIGNATURE_V1).vkey == k.vkey
    # The key ID is SHA-256(name || "\n" || 0x04 || public key)[:4] (c2sp.org/signed-note), shown in the vkey.
    want = hashlib.sha256(k.name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + k.public_key).digest()[:4]
    assert struct.pack(">I", k.key_id) == want and k.vkey.split("+")[1] == want.hex()


def test_cosignature_key_id_of_the_published_vkey() -> None:
    name, key_id, key = V["cosignature_v1"]["vkey_0x04"].split("+")
    assert hashlib.sha256(name.encode() + b"\n" + base64.b64decode(key)).hexdigest()[:8] == key_id
    assert cosignature_verifier_from_vkey(V["cosignature_v1"]["vkey_0x04"]).key_id == int(key_id, 16)


_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


@given(st.one_of(st.text(alphabet=_B64_CHARS, max_size=12), st.text(max_size=12), st.binary(max_size=9).map(lambda b: base64.b64encode(b).decode())))
def test_b64decode_strict_accepts_exactly_the_canonical_encoding(s: str) -> None:
    want = _canonical_b64_reference(s)
    try:
        got: bytes | None = b64decode_strict(s)
    except MalformedError:
        got = None
    assert got == want


@given(st.one_of(st.text(alphabet=_B64_CHARS, min_size=40, max_size=48),
                 st.binary(min_size=31, max_size=33).map(lambda b: base64.b64encode(b).decode())))
def test_parse_hash_accepts_exactly_canonical_32_bytes(s: str) -> None:
    from tlog.checkpoint import parse_hash

    want = _canonical_b64_reference(s)
    want = want if want is not None and len(want) == 32 else None
    try:
        got: bytes | None = parse_hash(s)
    except MalformedError:
        got = None
    assert got == want


# Differential tests: the one-regex fast paths of parse_note and parse_checkpoint against naive
# line-by-line references written from the specs (tests/spec_reference.py: canonical base64 by re-encoding).

_valid_sig_lines = st.tuples(
    st.one_of(st.sampled_from(["log.example", "w1", "é.example", "x" * 255]),
              st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="+"), min_size=1, max_size=8)),
    st.binary(min_size=5, max_size=80).map(lambda b: base64.b64encode(b).decode()),
)
# (what to replace, with what): each produces a line the spec rejects, one fault at a time
_SIG_FAULTS = [("name", "a+b"), ("name", ""), ("name", "x" * 256), ("name", "sp ace"), ("name", "a\x7f"), ("name", "\u2028"),
               ("prefix", "- "), ("prefix", "\u2014"), ("sep", "  "), ("b64", "AAAAAAA"), ("b64", "AAAAAAB="), ("b64", "AAAA"),
               ("b64", "AAAAAA=="), ("b64", "AAAA AAA=")]


@st.composite
def _sig_lines(draw: st.DrawFn) -> list[str]:
    lines = []
    for name, b64 in draw(st.lists(_valid_sig_lines, max_size=4)):
        parts = {"prefix": "\u2014 ", "name": name, "sep": " ", "b64": b64}
        if draw(st.integers(0, 3)) == 0:
            what, bad = draw(st.sampled_from(_SIG_FAULTS))
            parts[what] = bad
        lines.append(parts["prefix"] + parts["name"] + parts["sep"] + parts["b64"])
    return lines


@settings(max_examples=500, deadline=None)
@given(text=st.sampled_from(["o\n1\nAAAA\n", "t\n", "", "t\n\n"]), lines=_sig_lines(), end=st.sampled_from(["\n", "", "\n\n"]))
def test_parse_note_matches_line_by_line_reference(text: str, lines: list[str], end: str) -> None:
    data = (text + "\n" + "\n".join(lines) + end).encode()
    want = _note_reference(data)
    try:
        note = parse_note(data)
    except MalformedError:
        assert want is None, data
        return
    assert want is not None, data
    assert (note.text, [(s.name, s.key_id, s.signature) for s in note.signatures]) == want


@settings(max_examples=300, deadline=None)
@given(lines=_sig_lines())
def test_ascii_signature_fast_path_takes_every_valid_ascii_block(lines: list[str]) -> None:
    """The one-regex path of parse_note must not silently fall back for ordinary notes."""
    from tlog.note import _ASCII_SIGNATURE_BLOCK

    block = "".join(line + "\n" for line in lines)
    valid = bool(lines) and _note_reference(("t\n\n" + block).encode(), min_signature=0) is not None
    ascii_names = all(line[2:].split(" ")[0].isascii() for line in lines)
    fast = _ASCII_SIGNATURE_BLOCK.fullmatch(block) is not None and all(
        len(line.split(" ")[-1]) % 4 == 0 and len(line[2:].split(" ")[0]) <= 255 for line in lines)
    assert fast == (valid and ascii_names), block


def _checkpoint_reference(text: str) -> Checkpoint | None:
    fields = spec_reference.checkpoint(text)
    return None if fields is None else Checkpoint(*fields)


_CP_FAULTS = ["", "01", "+1", "\u0661", "9223372036854775808", "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=",
              "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU", "AAAA", "x" * 256, "é" * 128, "\r", "o\n"]


@st.composite
def _checkpoint_texts(draw: st.DrawFn) -> str:
    lines = [draw(st.one_of(origins, st.sampled_from(["é" * 127, "x" * 255]))), str(draw(st.integers(0, 2**63 - 1))),
             base64.b64encode(draw(st.binary(min_size=32, max_size=32))).decode(), *draw(st.lists(ext, max_size=17))]
    if draw(st.booleans()):
        lines[draw(st.integers(0, len(lines) - 1))] = draw(st.sampled_from(_CP_FAULTS))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "\n", "", "\n\n"]))


@settings(max_examples=500, deadline=None)
@given(text=_checkpoint_texts())
def test_parse_checkpoint_matches_reference(text: str) -> None:
    want = _checkpoint_reference(text)
    try:
        got: Checkpoint | None = parse_checkpoint(text)
    except MalformedError:
        got = None
    assert got == want, text
