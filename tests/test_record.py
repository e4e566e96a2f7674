"""Log entries, DSSE envelopes and statements: strict decoding, round trips, the reducer."""

from __future__ import annotations

import base64
import json

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, Envelope, Signature, pae, parse_envelope, sign_envelope
from registry.record import (
    Action,
    PackageRef,
    Record,
    RecordError,
    Release,
    decode_entry,
    encode_entry,
    parse_package_ref,
    parse_statement,
    record_for,
)
from registry.state import (
    PENDING,
    AlreadyYanked,
    InvalidSignature,
    KeyAlreadyGranted,
    LastKey,
    RegistryState,
    Unauthorized,
    UnknownKey,
    UnknownRelease,
    VersionExists,
    replay,
)
from registry.wasm import Import
from tlog.errors import MalformedError
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
REF = PackageRef("acme", "hello", "1.0.0")
RELEASE = Release(REF, "ab" * 32, (Import("env", "f", "func"), Import("", "wasi:http/types@0.2.0", "instance")))


def release_record(signer: Ed25519Signer = ALICE, release: Release = RELEASE) -> Record:
    return record_for("release", signer.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer))


def action_record(signer: Ed25519Signer, action: Action) -> Record:
    return record_for(action.action, signer.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), signer))


def test_dsse_pae_vector() -> None:  # secure-systems-lab/dsse protocol.md
    assert pae("http://example.com/HelloWorld", b"hello world") == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_envelope_accepts_std_and_urlsafe_base64_and_rejects_junk() -> None:
    env = sign_envelope(INTOTO_PAYLOAD_TYPE, RELEASE.statement(), ALICE)
    parsed = parse_envelope(env.to_json())
    assert parsed == env
    obj = json.loads(env.to_json())
    obj["signatures"][0]["sig"] = base64.urlsafe_b64encode(env.signatures[0].sig).decode()
    assert parse_envelope(json.dumps(obj).encode()).signatures[0].sig == env.signatures[0].sig
    for bad in [
        b'{"payload":"","payloadType":"application/vnd.in-toto+json","signatures":[],"extra":1}',
        b'{"payload":"","payloadType":"text/plain","signatures":[{"sig":""}]}',
        b'{"payload":"","payload":"","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":""}]}',
        b'{"payload":"!!","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":""}]}',
        b'{"payload":"","payloadType":"application/vnd.in-toto+json","signatures":[]}',
        b"[1]",
        b"\xff",
        b'{"payload":NaN}',
    ]:
        with pytest.raises(MalformedError):
            parse_envelope(bad)


def test_entry_round_trip_and_signature() -> None:
    rec = release_record()
    entry = rec.encode()
    again = decode_entry(entry)
    assert again == rec and again.encode() == entry
    assert again.envelope.verified_by(again.signer_verifier)


def _cbor_head(major: int, n: int) -> bytes:
    return bytes([major << 5 | 24, n]) if n >= 24 else bytes([major << 5 | n])


def test_non_canonical_cbor_is_rejected() -> None:
    entry = release_record().encode()
    obj = cbor2.loads(entry)
    # unsorted keys
    unsorted = cbor2.dumps(dict(reversed(list(obj.items()))))
    assert unsorted != entry
    # indefinite-length map
    items = b"".join(cbor2.dumps(k, canonical=True) + cbor2.dumps(v, canonical=True) for k, v in sorted(obj.items(), key=lambda kv: (len(kv[0]), kv[0])))
    indefinite = b"\xbf" + items + b"\xff"
    # duplicate key: the canonical map with its first pair repeated and the count raised
    first_key = min(obj, key=lambda k: (len(k), k))
    dup = _cbor_head(5, len(obj) + 1) + cbor2.dumps(first_key, canonical=True) + cbor2.dumps(obj[first_key], canonical=True) + entry[1:]
    # a non-minimal integer for "v": 1 written as 0x18 0x01
    long_int = entry.replace(b"\x61v\x01", b"\x61v\x18\x01")
    # a tag around the signer
    tagged = cbor2.dumps({**obj, "signer": cbor2.CBORTag(32, obj["signer"])}, canonical=True)
    # a float where an int belongs
    floaty = cbor2.dumps({**obj, "v": 1.0}, canonical=True)
    # unsorted keys one and two levels down (envelope, signature)
    env = obj["envelope"]
    inner = cbor2.dumps({**obj, "envelope": dict(reversed(list(env.items())))})
    sig_keys = cbor2.dumps({**obj, "envelope": {**env, "signatures": [dict(reversed(list(x.items()))) for x in env["signatures"]]}})
    for bad in (unsorted, indefinite, dup, long_int, tagged, floaty, entry + b"\x00", entry[:-1], inner, sig_keys):
        assert bad != entry
        with pytest.raises(RecordError):
            decode_entry(bad)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_decode_entry_never_crashes(data: bytes) -> None:
    try:
        rec = decode_entry(data)
    except MalformedError:
        return
    assert rec.encode() == data


@settings(max_examples=100, deadline=None)
@given(i=st.integers(0, 10_000), b=st.integers(1, 255))
def test_byte_flips_in_entries_are_rejected_or_unsigned(i: int, b: int) -> None:
    entry = bytearray(release_record().encode())
    entry[i % len(entry)] ^= b
    try:
        rec = decode_entry(bytes(entry))
    except MalformedError:
        return
    # it still decodes (e.g. a changed payload byte): then the signature must fail
    assert not rec.envelope.verified_by(rec.signer_verifier) or rec.signer != ALICE.vkey


@pytest.mark.parametrize("s", ["acme:hello@1.0.0", "a-b:c-d@0.1.0-rc.1", "x:y@10.20.30"])
def test_package_refs(s: str) -> None:
    assert str(parse_package_ref(s)) == s


@pytest.mark.parametrize("s", ["acme:hello", "Acme:hello@1.0.0", "acme:hello@1.0", "acme:hello@01.0.0", "acme:he_llo@1.0.0", "acme:-x@1.0.0", ":x@1.0.0", "a:b@1.0.0+build", "a:b@1.0.0-01"])
def test_bad_package_refs(s: str) -> None:
    with pytest.raises(RecordError):
        parse_package_ref(s)


def test_statement_is_strict() -> None:
    good = json.loads(RELEASE.statement())
    assert parse_statement(RELEASE.statement()) == RELEASE
    bad_cases = [
        {**good, "_type": "https://in-toto.io/Statement/v0.1"},
        {**good, "subject": []},
        {**good, "subject": [good["subject"][0], good["subject"][0]]},
        {**good, "subject": [{"name": "acme:other@1.0.0", "digest": {"sha256": "ab" * 32}}]},
        {**good, "subject": [{"name": "acme:hello@1.0.0", "digest": {"sha256": "AB" * 32}}]},
        {**good, "subject": [{"name": "acme:hello@1.0.0", "digest": {"sha512": "ab" * 64}}]},
        {**good, "predicate": {**good["predicate"], "imports": [{"module": "m", "name": "n", "kind": "weird"}]}},
        {**good, "predicate": {**good["predicate"], "extra": 1}},
        {**good, "predicate": {**good["predicate"], "sbom": {"digest": {"sha256": "ab" * 32}, "mediaType": "text/plain"}}},
        {k: v for k, v in good.items() if k != "predicate"},
    ]
    for bad in bad_cases:
        with pytest.raises(RecordError):
            parse_statement(json.dumps(bad).encode())


def test_reducer_rules() -> None:
    s = RegistryState()
    with pytest.raises(Unauthorized):  # a namespace is claimed only by a self-grant
        s.apply(release_record(), 0)
    with pytest.raises(Unauthorized):
        s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey)), 0)
    s = s.apply(action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey)), 0)
    s = s.apply(release_record(), 1)
    with pytest.raises(VersionExists):
        s.apply(release_record(), 2)
    with pytest.raises(Unauthorized):
        s.apply(release_record(BOB, Release(PackageRef("acme", "hello", "2.0.0"), "cd" * 32, ())), 2)
    s = s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey)), 2)
    s = s.apply(release_record(BOB, Release(PackageRef("acme", "hello", "2.0.0"), "cd" * 32, ())), 3)
    s = s.apply(action_record(ALICE, Action("key-revocation", "acme", key=BOB.vkey)), 4)
    with pytest.raises(Unauthorized):
        s.apply(release_record(BOB, Release(PackageRef("acme", "hello", "3.0.0"), "ef" * 32, ())), 5)
    with pytest.raises(Unauthorized):  # a revoked key cannot come back
        s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=9)), 5)
    with pytest.raises(UnknownRelease):
        s.apply(action_record(ALICE, Action("yank", "acme", name="hello", version="9.0.0")), 5)
    s = s.apply(action_record(ALICE, Action("yank", "acme", name="hello", version="2.0.0", reason="bad")), 5)
    assert s.release(PackageRef("acme", "hello", "2.0.0")).yanked_at == 5  # type: ignore[union-attr]
    assert s.release(PackageRef("acme", "hello", "2.0.0")).index == 3  # type: ignore[union-attr]
    forged = Record("release", ALICE.vkey, Envelope(INTOTO_PAYLOAD_TYPE, RELEASE.statement(), (Signature("", b"\0" * 64),)), RELEASE)
    with pytest.raises(InvalidSignature):
        s.apply(forged, 6)
    assert dict(s.namespaces["acme"].revoked) == {BOB.vkey: 4}


def test_a_key_is_its_public_key_not_its_name() -> None:
    """issue 12: a revoked key came back under a new name, and its old envelopes with it."""
    bob_again = Ed25519Signer("bob-again", BOB.seed)  # Bob's key pair under another name
    s = RegistryState().apply(action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey)), 0)
    s = s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey)), 1)
    with pytest.raises(KeyAlreadyGranted, match="same public key"):  # one grant per public key
        s.apply(action_record(ALICE, Action("key-grant", "acme", key=bob_again.vkey, issued=2)), 2)
    old = release_record(BOB, Release(PackageRef("acme", "hello", "3.0.0"), "ef" * 32, ()))  # signed before the revocation
    s = s.apply(action_record(ALICE, Action("key-revocation", "acme", key=bob_again.vkey)), 2)  # revokes Bob's key by any name
    assert s.namespaces["acme"].keys == {ALICE.vkey} and dict(s.namespaces["acme"].revoked) == {BOB.vkey: 2}
    with pytest.raises(Unauthorized, match="under any name"):
        s.apply(action_record(ALICE, Action("key-grant", "acme", key=bob_again.vkey, issued=3)), 3)
    replayed = record_for("release", bob_again.vkey, old.envelope)  # DSSE does not sign the signer's name
    assert replayed.signed_by_signer
    with pytest.raises(Unauthorized, match="revoked in acme at index 2"):
        s.apply(replayed, 3)
    with pytest.raises(Unauthorized, match="revoked"):
        s.apply(old, 3)


def test_every_logged_decision_replayed_is_refused() -> None:
    """Every change is one-way, so any signed statement already applied is refused when sent again."""
    carol = Ed25519Signer.generate("carol")
    records = [
        action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey)),
        action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1)),
        action_record(ALICE, Action("key-grant", "acme", key=carol.vkey, issued=1)),
        release_record(BOB),
        action_record(BOB, Action("yank", "acme", name="hello", version="1.0.0", issued=1)),
        action_record(ALICE, Action("key-revocation", "acme", key=carol.vkey, issued=1)),
    ]
    s = RegistryState()
    for i, r in enumerate(records):
        s = s.apply(r, i)
    for r in records:
        with pytest.raises((Unauthorized, VersionExists, KeyAlreadyGranted, AlreadyYanked, UnknownRelease, UnknownKey)):
            s.apply(r, len(records))


LOOKALIKES = ["ali\u200bce", "alice\u200d", "\u0430lice", "al\u00edce", "alice\u202e"]  # zero-width space, zero-width joiner, Cyrillic a, accent, RTL


@pytest.mark.parametrize("name", LOOKALIKES)
def test_records_refuse_key_names_that_are_not_printable_ascii(name: str) -> None:
    """issue 12: a key name with a zero-width space printed as another name."""
    odd = Ed25519Signer(name, ALICE.seed)  # a valid signed-note name: C2SP allows it, our policy does not
    with pytest.raises(RecordError, match="printable ASCII"):
        release_record(odd)
    with pytest.raises(RecordError, match="printable ASCII"):
        action_record(ALICE, Action("key-grant", "acme", key=odd.vkey))
    env = sign_envelope(INTOTO_PAYLOAD_TYPE, RELEASE.statement(), odd)
    entry = encode_entry("release", odd.vkey, Envelope(env.payload_type, env.payload, (Signature(f"{odd.key_id:08x}", env.signatures[0].sig),)))
    with pytest.raises(RecordError, match="printable ASCII"):
        decode_entry(entry)


def test_the_last_key_cannot_revoke_itself() -> None:
    s = RegistryState().apply(action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey)), 0)
    with pytest.raises(LastKey) as e:
        s.apply(action_record(ALICE, Action("key-revocation", "acme", key=ALICE.vkey)), 1)
    assert "last key of acme" in str(e.value)
    s = s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey)), 1)
    s = s.apply(action_record(ALICE, Action("key-revocation", "acme", key=ALICE.vkey)), 2)  # with a successor: fine
    assert s.namespaces["acme"].keys == {BOB.vkey}
    with pytest.raises(LastKey):
        s.apply(action_record(BOB, Action("key-revocation", "acme", key=BOB.vkey)), 3)


def test_refusals_of_pending_records_name_no_index() -> None:
    """issue 12: errors said "at index -1" for records reserved but not yet integrated."""
    s = RegistryState().apply(action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey)), 0)
    s = s.apply(action_record(ALICE, Action("key-grant", "acme", key=BOB.vkey)), 1)
    s = s.apply(release_record(), PENDING)
    s = s.apply(action_record(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=1)), PENDING)
    s = s.apply(action_record(ALICE, Action("key-revocation", "acme", key=BOB.vkey)), PENDING)
    refused = [
        release_record(ALICE, RELEASE._replace(module_sha256="cd" * 32)),
        action_record(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=2)),
        release_record(BOB, Release(PackageRef("acme", "hello", "2.0.0"), "cd" * 32, ())),
    ]
    for r in refused:
        with pytest.raises((VersionExists, AlreadyYanked, Unauthorized)) as e:
            s.check(r)
        assert "-1" not in str(e.value) and "not yet integrated" in str(e.value)


def test_replay_skips_invalid_records_and_reports_them() -> None:
    records = [
        (0, action_record(ALICE, Action("key-grant", "acme", key=ALICE.vkey))),
        (1, release_record(BOB)),  # not authorized: void
        (2, release_record()),
    ]
    state, rejected = replay(records)
    assert [i for i, _ in rejected] == [1]
    assert state.release(REF).index == 2  # type: ignore[union-attr]


def test_entry_size_limit() -> None:
    big = Release(REF, "ab" * 32, tuple(Import("m" * 200, f"f{i}", "func") for i in range(400)))
    with pytest.raises(MalformedError):
        encode_entry("release", ALICE.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, big.statement(), ALICE))


@given(
    st.sampled_from(["release", "key-grant", "key-revocation", "yank"]),
    st.text(max_size=300),
    st.text(max_size=40),
    st.binary(max_size=3000),
    st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=80)), min_size=1, max_size=3),
)
def test_encode_entry_is_the_canonical_cbor_encoding(record_type: str, signer: str, payload_type: str, payload: bytes,
                                                     sigs: list[tuple[str, bytes]]) -> None:
    """Reference: cbor2's canonical encoder of the same map (it sorts; ours inserts keys in order)."""
    env = Envelope(payload_type, payload, tuple(Signature(k, s) for k, s in sigs))
    want = cbor2.dumps(
        {"v": 1, "type": record_type, "signer": signer,
         "envelope": {"payloadType": payload_type, "payload": payload,
                      "signatures": [{"keyid": k, "sig": s} for k, s in sigs]}},
        canonical=True,
    )
    assert encode_entry(record_type, signer, env) == want


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)


def _strict_json_reference(text: str) -> object:
    """json.loads with a duplicate-key check and no NaN/Infinity: what strict_json must accept."""
    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        if len(dict(items)) != len(items):
            raise ValueError("duplicate")
        return dict(items)

    def constant(name: str) -> object:
        raise ValueError(name)

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, before=st.sampled_from(["", " ", "\n", "x", "{"]), after=st.sampled_from(["", " ", "\t\n", "x", "}", ',"a":1}']),
       duplicate=st.booleans())
def test_strict_json_matches_reference(value: object, before: str, after: str, duplicate: bool) -> None:
    from registry.dsse import strict_json

    text = before + json.dumps(value) + after
    if duplicate and text.endswith("}") and text.count(":"):
        text = text[:-1] + ',"' + "k" + '":1,"k":2}'
    try:
        want: object = _strict_json_reference(text)
    except ValueError:
        want = MalformedError
    try:
        got: object = strict_json(text.encode(), "test")
    except MalformedError:
        got = MalformedError
    assert got == want, text


def _entry_fields_reference(data: bytes) -> tuple[object, ...] | None:
    """What _read_canonical_entry must read: a canonical (cbor2, canonical=True) map of that shape, one signature."""
    try:
        obj = cbor2.loads(data)
    except Exception:
        return None
    try:
        if cbor2.dumps(obj, canonical=True) != data or list(obj) != ["v", "type", "signer", "envelope"] or obj["v"] != 1:
            return None
        env = obj["envelope"]
        (s,) = env["signatures"]
        if list(env) != ["payload", "signatures", "payloadType"] or list(s) != ["sig", "keyid"]:
            return None
        fields = (obj["type"], obj["signer"], env["payload"], s["sig"], s["keyid"], env["payloadType"])
    except (TypeError, ValueError, KeyError):
        return None
    if type(obj["v"]) is not int or [type(f) for f in fields] != [str, str, bytes, bytes, str, str]:
        return None
    return fields


_lengths = st.sampled_from([0, 1, 23, 24, 25, 255, 256, 257, 1000])
_entry_texts = st.one_of(_lengths.map(lambda n: "x" * n), st.text(max_size=30))
_entry_bytes = st.one_of(_lengths.map(lambda n: b"\x01" * n), st.binary(max_size=30))


@settings(max_examples=400, deadline=None)
@given(fields=st.tuples(_entry_texts, _entry_texts, _entry_bytes, _entry_bytes, _entry_texts, _entry_texts),
       edit=st.one_of(st.none(), st.tuples(st.integers(0, 3000), st.integers(0, 2), st.binary(max_size=2))))
def test_canonical_entry_reader_matches_cbor2(fields: tuple[str, str, bytes, bytes, str, str], edit: tuple[int, int, bytes] | None) -> None:
    from registry.record import _NotCanonicalLayout, _read_canonical_entry

    t, signer, payload, sig, keyid, payload_type = fields
    data = cbor2.dumps({"v": 1, "type": t, "signer": signer, "envelope": {
        "payload": payload, "signatures": [{"sig": sig, "keyid": keyid}], "payloadType": payload_type}}, canonical=True)
    if edit is not None:
        at, drop, insert = edit
        at %= len(data) + 1
        data = data[:at] + insert + data[at + drop :]
    want = _entry_fields_reference(data)
    try:
        got: tuple[object, ...] | None = _read_canonical_entry(data)
    except (_NotCanonicalLayout, IndexError, UnicodeDecodeError):
        got = None
    assert got == want, data


def _head(major: int, n: int, width: int) -> bytes:
    """A CBOR head with 0 (only if n < 24), 1, 2, 4 or 8 length bytes; the shortest that holds n if width is too small."""
    widths = [(0, n), (1, 24), (2, 25), (4, 26), (8, 27)]
    for w, info in widths:
        if w >= width and (n < 24 if w == 0 else n < 256**w):
            return bytes([major << 5 | info]) + (n.to_bytes(w, "big") if w else b"")
    raise AssertionError(n)


@settings(max_examples=400, deadline=None)
@given(fields=st.tuples(_entry_texts, _entry_texts, _entry_bytes, _entry_bytes, _entry_texts, _entry_texts),
       widths=st.lists(st.sampled_from([0, 0, 0, 1, 2, 4, 8]), min_size=6, max_size=6))
def test_canonical_entry_reader_refuses_longer_heads(fields: tuple[str, str, bytes, bytes, str, str], widths: list[int]) -> None:
    """Strings written with longer heads than needed: the reader takes exactly the shortest forms cbor2 would write."""
    from registry.record import _NotCanonicalLayout, _read_canonical_entry

    def item(value: str | bytes, width: int) -> bytes:
        raw, major = (value.encode(), 3) if isinstance(value, str) else (value, 2)
        return _head(major, len(raw), width) + raw

    t, signer, payload, sig, keyid, payload_type = fields
    w = widths
    data = (b"\xa4\x61v\x01\x64type" + item(t, w[0]) + b"\x66signer" + item(signer, w[1]) + b"\x68envelope\xa3\x67payload"
            + item(payload, w[2]) + b"\x6asignatures\x81\xa2\x63sig" + item(sig, w[3]) + b"\x65keyid" + item(keyid, w[4])
            + b"\x6bpayloadType" + item(payload_type, w[5]))
    want = _entry_fields_reference(data)
    assert (want is not None) == all(item(f, 0) == item(f, wi) for f, wi in zip(fields, w, strict=True))  # the reference
    try:
        got: tuple[object, ...] | None = _read_canonical_entry(data)
    except (_NotCanonicalLayout, IndexError, UnicodeDecodeError):
        got = None
    assert got == want, data


def test_decode_entry_reads_the_canonical_layout_as_the_general_decoder_does() -> None:
    from registry.record import _read_canonical_entry, _read_entry_generally

    entry = encode_entry("release", ALICE.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, RELEASE.statement(), ALICE))
    assert _read_canonical_entry(entry)[:2] == ("release", ALICE.vkey)  # the fast layout reader takes it
    assert _read_canonical_entry(entry) == _read_entry_generally(entry)
    assert decode_entry(entry).signed_by_signer


_odd_parts = st.sampled_from(["x" * 64, "x" * 65, "A", "a--b", "-a", "01.0.0", "1.0.0+build", "1.0", "é", "a:b", "a@b", "", "1.0.0-" + "r" * 58, "1.0.0-" + "r" * 59])
_labels = st.one_of(_odd_parts, st.from_regex(r"[a-z0-9]{1,3}(-[a-z0-9]{1,3})?", fullmatch=True))
_versions = st.one_of(_odd_parts, st.from_regex(r"(0|[1-9][0-9]?)\.(0|[1-9])\.(0|[1-9])(-[0-9A-Za-z-]{1,3}(\.[0-9A-Za-z-]{1,3})?)?", fullmatch=True))


@settings(max_examples=500, deadline=None)
@given(ns=_labels, name=_labels, version=_versions, subject=st.one_of(st.none(), st.none(), _odd_parts, _labels))
def test_statement_package_ref_matches_field_checks(ns: str, name: str, version: str, subject: str | None) -> None:
    from registry.record import check_label, check_version, parse_statement

    subject_name = f"{ns}:{name}@{version}" if subject is None else subject
    statement = json.loads(RELEASE.statement())
    statement["subject"][0]["name"] = subject_name
    statement["predicate"].update(namespace=ns, name=name, version=version)
    try:  # the reference: each field checked on its own, then the subject compared with their join
        want: object = PackageRef(check_label(ns, "namespace"), check_label(name, "name"), check_version(version))
        if subject_name != str(want):
            want = RecordError
    except RecordError:
        want = RecordError
    try:
        got: object = parse_statement(json.dumps(statement).encode()).ref
    except RecordError:
        got = RecordError
    assert got == want


_import_texts = st.one_of(st.sampled_from(["env", "", 'q"uote', "back\\slash", "tab\t", "del\x7f", "é", "\u2028", "wasi:http/types@0.2.0"]),
                          st.text(max_size=6))
_statement_edits = [
    lambda t: t,
    lambda t: t.replace('{"_type"', '{ "_type"'),
    lambda t: t + "\n",
    lambda t: t.replace('"kind":"func"', '"kind":"funk"'),
    lambda t: t.replace('"kind":"func"', '"kind":"func","kind":"func"'),
    lambda t: t.replace('"name":"hello"', '"name":"hello","name":"hello"'),
    lambda t: t.replace('"version":"1.0.0"', '"version":"1.0.00"'),
    lambda t: t.replace('"imports":[', '"imports":[,'),
    lambda t: t.replace('}],"predicateType"', '},{"name":"x","digest":{"sha256":"' + "0" * 64 + '"}}],"predicateType"'),
    lambda t: t.replace('"mediaType":"application/spdx+json"', '"mediaType":"text/plain"'),
    lambda t: t.replace('"sha256":"ab', '"sha256":"AB'),
    lambda t: json.dumps(json.loads(t), indent=1),
    lambda t: json.dumps(json.loads(t), separators=(",", ":")),  # escapes non-ASCII
]


@settings(max_examples=500, deadline=None)
@given(imports=st.lists(st.tuples(_import_texts, _import_texts, st.sampled_from(["func", "memory", "instance"])), max_size=4),
       sbom=st.booleans(), edit=st.sampled_from(_statement_edits))
def test_compact_statement_reader_matches_the_general_parser(imports: list[tuple[str, str, str]], sbom: bool, edit) -> None:  # type: ignore[no-untyped-def]
    from registry.record import _COMPACT_STATEMENT, _parse_statement_generally, parse_statement

    release = Release(REF, "ab" * 32, tuple(Import(*i) for i in imports), "cd" * 32 if sbom else None,
                      "application/spdx+json" if sbom else None)
    payload = edit(release.statement().decode()).encode()
    try:
        want: object = _parse_statement_generally(payload)
    except MalformedError as e:  # RecordError, or MalformedError for JSON itself
        want = type(e)
    try:
        got: object = parse_statement(payload)
    except MalformedError as e:
        got = type(e)
    assert got == want, payload
    if edit is _statement_edits[0] and not any("\\" in f or '"' in f or any(c < " " for c in f) for i in imports for f in i):
        assert _COMPACT_STATEMENT.fullmatch(payload.decode()) is not None  # the fast path takes what Release.statement() writes


def test_canonical_entry_reader_refuses_every_truncation() -> None:
    from registry.record import _NotCanonicalLayout, _read_canonical_entry

    entry = encode_entry("release", ALICE.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, RELEASE.statement(), ALICE))
    for cut in range(len(entry)):
        with pytest.raises((_NotCanonicalLayout, IndexError, UnicodeDecodeError)):
            _read_canonical_entry(entry[:cut])
        with pytest.raises(RecordError):
            decode_entry(entry[:cut])
