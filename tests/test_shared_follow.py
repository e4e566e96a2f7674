"""How the processes of a shared log follow each other: new trees taken up from the database's entries
(not the bucket's tiles), checked against the committed checkpoint, with the bucket as the fallback;
and PostgreSQL's notifications waking them, with polling as the fallback.

Real PostgreSQL and SeaweedFS (tests/services.py); trees against the naive RFC 6962 reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from typing import Any

import psycopg
import reference

from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.objects import ObjectStore
from tlog.storage.shared import SharedLogStore

KEY = Ed25519Signer.generate("example.com/follow")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


class CountingObjects(ObjectStore):
    """The real bucket, counting the objects read from it (not those served from memory)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads: list[str] = []

    def _call(self, what: str, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        if method == "GET":
            self.reads.append(path)
        return super()._call(what, method, path, expect, **kwargs)


class Deaf(SharedLogStore):
    """A store that never hears a notification (as when LISTEN is impossible): only polling moves it."""

    def listen(self, notified: Callable[[str], None]) -> None:
        pass




def integrate(log: Log, entries: list[bytes]) -> None:
    """Sequence entries and integrate them, as the integrator does."""
    store = log.store
    assert isinstance(store, SharedLogStore)
    store.sequence(entries, [leaf(e) for e in entries])
    log.integrate(store.sequenced(log.state.size, len(entries)), dedup=False)


def test_a_follower_takes_up_trees_from_the_database_without_reading_the_bucket(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    leader = Log(shared(), KEY)
    objects = CountingObjects(f"s3://{s3_path}/log")
    follower = Log(shared(objects=objects), KEY)
    objects.reads.clear()  # the start-up read of the checkpoint object (the bucket is there and answers)
    entries: list[bytes] = []
    for n in (1, 254, 2, 300, 70, 600):  # across tile and bundle boundaries, and a level-1 tile
        batch = [b"follow %d" % (len(entries) + i) for i in range(n)]
        integrate(leader, batch)
        entries += batch
        assert follower.refresh()
        assert follower.state == leader.state and follower.integrated.note == leader.integrated.note
        assert follower.state.root_hash == reference.mth(tuple(entries))
    indexes = [0, 255, 256, 700, len(entries) - 1]
    for i, proof in zip(indexes, follower.tlog_proofs(indexes, follower.published), strict=True):
        verify_tlog_proof(parse_tlog_proof(proof), leaf(entries[i]), VERIFIER)
    assert objects.reads == []  # the tiles it needed (full ones too) are the ones it computed


def test_a_follower_reads_the_bucket_when_the_database_no_longer_has_the_entries(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    leader = Log(shared(entries_kept=0), KEY)  # keeps none below the last full bundle
    objects = CountingObjects(f"s3://{s3_path}/log")
    follower = Log(shared(objects=objects), KEY)
    entries = [b"gone %d" % i for i in range(600)]
    integrate(leader, entries[:10])
    follower.refresh()
    objects.reads.clear()  # the start-up read of the checkpoint object, and the first tree's tiles
    integrate(leader, entries[10:])  # [10, 512) leave the database
    assert objects.reads == [] and follower.refresh()
    assert objects.reads  # the partial tiles of size 600, from the bucket
    assert follower.state == leader.state and follower.state.root_hash == reference.mth(tuple(entries))


def test_entries_that_do_not_give_the_committed_root_are_not_taken_up(shared, s3_path, pg_dsn) -> None:  # type: ignore[no-untyped-def]
    leader = Log(shared(), KEY)
    objects = CountingObjects(f"s3://{s3_path}/log")
    follower = Log(shared(objects=objects), KEY)
    entries = [b"true %d" % i for i in range(300)]
    integrate(leader, entries[:100])
    follower.refresh()
    integrate(leader, entries[100:])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the database's copy no longer matches the tree
        conn.execute("UPDATE tlog_entries SET entry = 'forged' WHERE idx = 150")
    assert follower.refresh()
    assert objects.reads  # it rebuilt the tree from the bucket instead
    assert follower.state == leader.state and follower.state.root_hash == reference.mth(tuple(entries))


async def test_notifications_wake_the_integrator_and_the_followers_long_before_their_polls(shared) -> None:  # type: ignore[no-untyped-def]
    nodes = [SharedSequencer(Log(shared(), KEY), interval=0.01, poll_interval=600) for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        # each node's first round, at start, takes or tries the lock; from then on only a notification wakes it
        entries = [b"woken %d" % i for i in range(40)]
        proofs = await asyncio.wait_for(asyncio.gather(*(nodes[i % 2].add(e) for i, e in enumerate(entries))), 30)
        assert sum(node.leading for node in nodes) == 1 and all(node.store.listening for node in nodes)
    for e, proof in zip(entries, proofs, strict=True):
        verify_tlog_proof(parse_tlog_proof(proof), leaf(e), VERIFIER)


async def test_polling_alone_carries_the_log_when_nothing_is_notified(shared) -> None:  # type: ignore[no-untyped-def]
    nodes = [SharedSequencer(Log(shared(Deaf), KEY), interval=0.01) for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        entries = [b"polled %d" % i for i in range(40)]
        proofs = await asyncio.wait_for(asyncio.gather(*(nodes[i % 2].add(e) for i, e in enumerate(entries))), 30)
        assert not any(node.store.listening for node in nodes)
    assert sorted(parse_tlog_proof(p).index for p in proofs) == list(range(40))
