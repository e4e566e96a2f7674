"""tlog's one checkpoint opener (tlog.policy.open_checkpoint) and its one fork/consistency decision (tlog.merkle.check_extends)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import consistency_proof, mth

from tlog.checkpoint import Checkpoint
from tlog.cosignature import cosign
from tlog.errors import (
    CosignatureError,
    MalformedError,
    MalformedProofError,
    ProofError,
    QuorumNotMetError,
    SignatureError,
    SplitViewError,
    StaleCheckpointError,
    UnknownLogError,
    UnverifiedNoteError,
)
from tlog.hashes import EMPTY_ROOT, leaf_hash
from tlog.merkle import check_extends
from tlog.note import (
    ALG_COSIGNATURE_V1,
    Ed25519Signer,
    NoteSignature,
    parse_note,
    sign_note,
)
from tlog.policy import MAX_FUTURE_SKEW, open_checkpoint, open_checkpoint_times, parse_policy

LOG = Ed25519Signer.generate("example.com/log")
W = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]
STRANGER = Ed25519Signer.generate("stranger.example", ALG_COSIGNATURE_V1)
NOW = 1_700_000_000
POLICY = parse_policy(("\n".join([f"log {LOG.vkey}", *(f"witness W{i} {w.vkey}" for i, w in enumerate(W)),
                                  "group g 2 W0 W1 W2", "quorum g"]) + "\n").encode())
CP = Checkpoint(LOG.name, 5, b"\x07" * 32)


def note_with(*cosigners: tuple[Ed25519Signer, int], log: Ed25519Signer | None = LOG) -> bytes:
    text = CP.text()
    note = sign_note(text, [log]) if log is not None else text.encode() + b"\n"
    return note + b"".join(cosign(w, text, t).line().encode() for w, t in cosigners)


def test_a_quorum_opens_with_its_witnesses_and_newest_time() -> None:
    opened = open_checkpoint(note_with((W[2], NOW - 5), (W[0], NOW - 9), (STRANGER, NOW)), POLICY, NOW, max_age=60)
    assert opened.checkpoint == CP and opened.witnesses == ("W0", "W2") and opened.newest_cosignature == NOW - 5
    parsed = parse_note(note_with((W[0], NOW), (W[1], NOW)))
    assert open_checkpoint(b"ignored when parsed", POLICY, NOW, parsed=(parsed, CP)).witnesses == ("W0", "W1")


def test_each_failure_has_its_own_type() -> None:
    other_log = Ed25519Signer.generate("example.com/other")
    with pytest.raises(UnknownLogError):
        open_checkpoint(sign_note(Checkpoint(other_log.name, 1, b"\x01" * 32).text(), [other_log]), POLICY, NOW)
    with pytest.raises(UnverifiedNoteError):
        open_checkpoint(note_with((W[0], NOW), (W[1], NOW), log=Ed25519Signer(LOG.name, Ed25519Signer.generate("x").seed)), POLICY, NOW)
    good = note_with((W[0], NOW), (W[1], NOW))
    note = parse_note(good)
    bad_log_sig = NoteSignature(note.signatures[0].name, note.signatures[0].key_id, bytes(64))
    with pytest.raises(SignatureError) as e:
        open_checkpoint(b"", POLICY, NOW, parsed=(note._replace(signatures=(bad_log_sig, *note.signatures[1:])), CP))
    assert not isinstance(e.value, CosignatureError)
    bad_cosig = NoteSignature(note.signatures[1].name, note.signatures[1].key_id, note.signatures[1].signature[:8] + bytes(64))
    with pytest.raises(CosignatureError):
        open_checkpoint(b"", POLICY, NOW, parsed=(note._replace(signatures=(*note.signatures[:1], bad_cosig, *note.signatures[2:])), CP))
    with pytest.raises(QuorumNotMetError):
        open_checkpoint(note_with((W[0], NOW), (W[0], NOW - 1), (STRANGER, NOW)), POLICY, NOW)  # one witness counts once
    with pytest.raises(QuorumNotMetError):  # a cosignature from too far in the future does not count
        open_checkpoint(note_with((W[0], NOW), (W[1], NOW + MAX_FUTURE_SKEW + 1)), POLICY, NOW)
    assert open_checkpoint(note_with((W[0], NOW), (W[1], NOW + MAX_FUTURE_SKEW)), POLICY, NOW).newest_cosignature == NOW + MAX_FUTURE_SKEW
    with pytest.raises(StaleCheckpointError):
        open_checkpoint(note_with((W[0], NOW - 61), (W[1], NOW - 70)), POLICY, NOW, max_age=60)
    with pytest.raises(MalformedError):
        open_checkpoint(CP.text().encode(), POLICY, NOW)


def test_the_age_bound_is_the_quorums_not_one_witnesss() -> None:
    """With two of three required, one witness cosigning now does not make a checkpoint the others last
    cosigned long ago fresh: the age is the quorum time's (the second newest here)."""
    note = note_with((W[0], NOW), (W[1], NOW - 3600), (W[2], NOW - 7200))
    with pytest.raises(StaleCheckpointError, match="3600s old"):
        open_checkpoint(note, POLICY, NOW, max_age=60)
    assert open_checkpoint(note, POLICY, NOW, max_age=3600).newest_cosignature == NOW
    assert open_checkpoint(note_with((W[0], NOW), (W[1], NOW - 60)), POLICY, NOW, max_age=60).witnesses == ("W0", "W1")
    assert open_checkpoint(sign_note(CP.text(), [LOG]), NO_QUORUM, NOW, max_age=None).witnesses == ()
    with pytest.raises(StaleCheckpointError, match="no cosignature"):
        open_checkpoint(sign_note(CP.text(), [LOG]), NO_QUORUM, NOW, max_age=60)
    assert open_checkpoint(note_with((W[0], NOW - 60)), NO_QUORUM, NOW, max_age=60).newest_cosignature == NOW - 60


# Nested groups: (W0 and W1) or (any two of W2..W4), or all of A0..A2 (quorum none is the last policy).
NESTED = parse_policy(("\n".join([
    f"log {LOG.vkey}", *(f"witness {n} {Ed25519Signer.generate(n.lower() + '.example', ALG_COSIGNATURE_V1).vkey}"
                         for n in ["W0", "W1", "W2", "W3", "W4", "A0", "A1", "A2"]),
    "group pair all W0 W1", "group trio 2 W2 W3 W4", "group all-a all A0 A1 A2", "group q any pair trio all-a", "quorum q"]) + "\n").encode())
NO_QUORUM = parse_policy(f"log {LOG.vkey}\nwitness W0 {W[0].vkey}\nquorum none\n".encode())


@given(st.sampled_from([POLICY, NESTED, NO_QUORUM]), st.dictionaries(st.sampled_from(["W0", "W1", "W2", "W3", "W4", "A0", "A1", "A2"]),
                                                                     st.integers(NOW - 5, NOW + 5)))
def test_the_quorum_time_is_the_newest_time_a_quorum_had_cosigned_by(policy, times) -> None:  # type: ignore[no-untyped-def]
    """Against the definition, directly: the newest T at which the witnesses cosigning at T or later meet the quorum."""
    times = {name: t for name, t in times.items() if name in policy.witnesses}
    meeting = [t for t in times.values() if policy.satisfied(n for n, u in times.items() if u >= t)]
    assert policy.quorum_time(times) == (max(meeting) if meeting else None)


def test_the_quorum_time_of_an_opened_checkpoint() -> None:
    """One witness that cosigned long after the others does not make the quorum (2 of 3) that fresh."""
    opened, times = open_checkpoint_times(note_with((W[0], NOW - 900), (W[1], NOW - 5), (W[2], NOW - 300)), POLICY, NOW)
    assert opened.newest_cosignature == NOW - 5 and times == {"W0": NOW - 900, "W1": NOW - 5, "W2": NOW - 300}
    assert POLICY.quorum_time(times) == NOW - 300
    assert POLICY.quorum_time({"W1": NOW - 5}) is None


LEAVES = tuple(leaf_hash(bytes([i])) for i in range(40))


@given(st.integers(0, 40), st.integers(0, 40))
def test_check_extends_accepts_every_true_pair(a: int, b: int) -> None:
    old, new = min(a, b), max(a, b)
    proof = consistency_proof(old, new, LEAVES) if 0 < old < new else []
    check_extends(old, mth(LEAVES[:old]) if old else EMPTY_ROOT, new, mth(LEAVES[:new]) if new else EMPTY_ROOT, proof)


@given(st.integers(1, 40))
def test_check_extends_names_what_is_wrong(n: int) -> None:
    root = mth(LEAVES[:n])
    other = bytes(b ^ 1 for b in root)
    with pytest.raises(SplitViewError):  # same size, other root: two histories, whatever the proof says
        check_extends(n, root, n, other, [root])
    with pytest.raises(ProofError) as e:  # a size-0 tree with a root that is not the empty one: not a fork
        check_extends(0, other, n, root, [])
    assert not isinstance(e.value, SplitViewError)
    with pytest.raises(MalformedProofError):
        check_extends(0, EMPTY_ROOT, n, root, [root])
    if n > 1:
        with pytest.raises(MalformedProofError):
            check_extends(n - 1, mth(LEAVES[: n - 1]), n, root, [])
