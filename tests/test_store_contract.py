"""The LogStore contract (tlog/storage/base.py), one suite for every engine: LMDB, and PostgreSQL + S3.

Trees are checked against the naive RFC 6962 reference (tests/reference.py), tiles against leaf
hashes computed here, and a reopened store must give back the same tree.
"""

from __future__ import annotations

import pytest
import reference

from tlog.checkpoint import parse_checkpoint
from tlog.errors import NotFoundError, TlogError
from tlog.hashes import leaf_hash
from tlog.integrate import plan_batch
from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.tiles import split_hashes

KEY = Ed25519Signer.generate("example.com/contract")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


def test_an_empty_store_has_no_tree(engine) -> None:  # type: ignore[no-untyped-def]
    store = engine.open()
    state, note = store.load()
    assert (state.size, note, store.checkpoint(), store.published()) == (0, None, None, None)
    assert store.lookup([leaf_hash(b"x")]) == {}
    with pytest.raises(NotFoundError):
        store.read_tile(0, 0)
    Log(store, KEY)  # signs the size-0 checkpoint
    assert parse_checkpoint(open_note(store.checkpoint(), [VERIFIER])[0].text).size == 0


def test_batches_give_the_reference_tree_tiles_entries_and_dedup(engine) -> None:  # type: ignore[no-untyped-def]
    store = engine.open()
    log = Log(store, KEY)
    entries = [b"contract %d" % i for i in range(600)]
    for start, end in [(0, 1), (1, 255), (255, 257), (257, 600)]:  # across tile and bundle boundaries
        assert engine.append(log, entries[start:end]) == tuple(range(start, end))
    assert engine.append(log, [entries[7], b"new"]) == (7, 600)  # a logged entry keeps its index
    entries.append(b"new")
    cp = parse_checkpoint(open_note(store.checkpoint(), [VERIFIER])[0].text)
    assert (cp.size, cp.root_hash) == (601, reference.mth(tuple(entries)))
    assert split_hashes(store.read_tile(0, 1)) == [leaf_hash(e) for e in entries[256:512]]
    assert store.read_tile(1, 0) == reference.mth(tuple(entries), 0, 256) + reference.mth(tuple(entries), 256, 512)  # the partial
    with pytest.raises(NotFoundError):
        store.read_tile(0, 3)
    assert store.read_entries(250, 260) == entries[250:260]
    assert store.read_entries(598, 601) == entries[598:601]
    with pytest.raises(NotFoundError):
        store.read_entries(600, 602)
    assert store.lookup([leaf_hash(entries[300]), leaf_hash(b"absent")]) == {leaf_hash(entries[300]): 300}
    state, note = store.load()
    assert (state.size, state.root_hash, note) == (601, cp.root_hash, store.checkpoint())


def test_a_stale_plan_is_refused_and_changes_nothing(engine) -> None:  # type: ignore[no-untyped-def]
    store = engine.open()
    log = Log(store, KEY)
    stale = log.state
    engine.append(log, [b"a", b"b"])
    before = store.checkpoint()
    plan = plan_batch(stale, [b"a"], lambda h: None)  # a second writer that did not see a and b
    with pytest.raises(TlogError):
        store.commit(plan, log.sign(plan.state))
    assert store.checkpoint() == before and store.load()[0].size == 2


def test_published_notes_and_a_reopened_store_keep_the_tree(engine) -> None:  # type: ignore[no-untyped-def]
    store = engine.open()
    log = Log(store, KEY)
    engine.append(log, [b"%d" % i for i in range(300)])
    store.publish(log.integrated.note)
    assert store.published() == log.integrated.note
    store.close()
    again = engine.open()
    reopened = Log(again, KEY)
    assert reopened.integrated == log.integrated
    assert again.read_entries(299, 300) == [b"299"]
    with pytest.raises(TlogError):
        Log(again, KEY, origin="example.com/other")
    with pytest.raises(TlogError):
        Log(again, Ed25519Signer.generate("example.com/contract"))  # another key under the same name
