"""The shared engine's PostgreSQL sessions are bounded: a process frozen inside a transaction loses its row
locks to the others, and a statement stuck behind a lock fails (a 503) instead of hanging its request."""

from __future__ import annotations

import threading

import pytest

from tlog.errors import StorageUnavailableError
from tlog.hashes import leaf_hash


def hold_sequencing_lock(store, release: threading.Event, outcome: dict[str, Exception]) -> threading.Thread:  # type: ignore[no-untyped-def]
    """In a thread: take tlog_next's row lock in a transaction of store's and sit in it until release
    (without the limits, others wait that long: 60 s)."""
    entered = threading.Event()

    def frozen() -> None:
        try:
            with store._txn() as cur:
                cur.execute("SELECT next FROM tlog_next FOR UPDATE")
                entered.set()
                release.wait(60)
                cur.execute("SELECT 1")
        except StorageUnavailableError as e:
            outcome["frozen"] = e

    thread = threading.Thread(target=frozen, daemon=True)
    thread.start()
    assert entered.wait(30)
    return thread


def test_a_process_frozen_inside_a_transaction_loses_its_locks_to_the_others(shared) -> None:  # type: ignore[no-untyped-def]
    frozen, other = shared(idle_in_transaction_ms=300), shared()
    release, outcome = threading.Event(), dict[str, Exception]()
    thread = hold_sequencing_lock(frozen, release, outcome)
    # Waits on the row lock until PostgreSQL ends the frozen session's transaction, then sequences.
    assert other.sequence([b"after the freeze"], [leaf_hash(b"after the freeze")]) == [0]
    release.set()
    thread.join(30)
    assert isinstance(outcome.get("frozen"), StorageUnavailableError)  # its transaction is gone: told so, nothing stored
    assert other.sequence([b"after the freeze"], [leaf_hash(b"after the freeze")]) == [0]


def test_a_statement_waiting_behind_a_lock_fails_after_the_statement_timeout(shared) -> None:  # type: ignore[no-untyped-def]
    holder, waiter = shared(), shared(statement_ms=300)
    release, outcome = threading.Event(), dict[str, Exception]()
    hold_sequencing_lock(holder, release, outcome)
    try:
        with pytest.raises(StorageUnavailableError, match="statement timeout"):
            waiter.sequence([b"x"], [leaf_hash(b"x")])
    finally:
        release.set()
    assert waiter.sequence([b"x"], [leaf_hash(b"x")]) == [0]  # the next try, once the lock is free
