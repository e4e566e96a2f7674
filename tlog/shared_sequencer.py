"""The sequencer of a log on shared storage (storage/shared.py): many processes, one log.

Each process pools its submissions like Sequencer and, every interval, sequences the pool in one
database transaction (durable: the entries' indexes are fixed). Whichever process holds the
integrator's lock integrates what is sequenced, in order, into the bucket and the tree row; the
others poll the committed size and take up each new tree (Log.refresh). A submitter is answered
with its tlog-proof once the tree this process serves covers its entry; if the integrator dies,
another process takes the lock and carries on from the committed tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import PushbackError, StorageUnavailableError, TlogError
from .hashes import leaf_hash
from .log import Log
from .runloop import cancel_all
from .sequencer import Sequencer
from .storage.shared import Admission, SharedLogStore

log = logging.getLogger("wasmlog.shared_sequencer")

DEFAULT_POLL_INTERVAL = 0.02  # seconds between looks at the committed size (and leadership) when idle
ROUNDS_PER_WAKE = 8  # integration rounds of batch_max entries before answering and looking again
DEFAULT_ANSWER_TIMEOUT = 30.0  # seconds a sequenced entry's submitter waits for integration before a 503


@dataclass
class _Waiting:
    """A sequenced batch whose submitters wait for a tree of at least size entries."""

    size: int
    indexes: list[int]
    entries: list[bytes]
    futures: list[asyncio.Future[bytes]]
    since: float  # time.monotonic() when sequenced


class SharedSequencer(Sequencer):
    """Sequencer over a SharedLogStore. Start it with ``async with sequencer.running():``.

    on_integrated listeners hear of this process's own submissions (entries, indexes) once they
    are in the served tree, before those submitters are answered. With a cosigner (a witnessed log),
    only the integrator has checkpoints cosigned and publishes them (store.publish); every process
    answers once the published checkpoint covers its submitters' entries. An admission
    (storage/shared.py) judges new entries while they are sequenced; a refused entry's submitter
    gets its error. With a boundary, every batch integrated ends with the last entry boundary()
    accepts among those read (so every checkpoint ends with one: an admission's trailer, say);
    entries sequenced before boundaries were (none among them) are integrated batch_max at a time.
    """

    def __init__(self, log: Log, *, poll_interval: float = DEFAULT_POLL_INTERVAL, **options: Any) -> None:
        super().__init__(log, **options)
        if not isinstance(log.store, SharedLogStore):
            raise TlogError("a SharedSequencer needs a log on a SharedLogStore")
        if log.witnessed == log.store.publish_integrated:
            raise TlogError("a witnessed log needs SharedLogStore(publish_integrated=False), an unwitnessed one True")
        self.store: SharedLogStore = log.store
        self.poll_interval = poll_interval
        self._waiting: list[_Waiting] = []
        self._waiting_entries = 0
        self._wake = asyncio.Event()
        self.leading = False
        self.admission: Admission | None = None
        self.boundary: Callable[[bytes], bool] | None = None
        self.answer_timeout = DEFAULT_ANSWER_TIMEOUT

    @property
    def pending(self) -> int:
        """Entries submitted to this process and not yet answered (pooled or sequenced)."""
        return len(self._pool) + self._waiting_entries

    def submit(self, entry: bytes) -> asyncio.Future[bytes]:
        h = leaf_hash(entry)
        if h not in self._pool and self.pending >= self.max_pending:
            raise PushbackError("too many pending entries")
        return super().submit(entry)

    async def flush(self) -> None:
        """Sequence up to batch_max pooled entries now (durably); they are answered once integrated."""
        keys, batch = self._take_batch()
        if not batch:
            return
        entries = [entry for entry, _ in batch]
        futures = [fut for _, fut in batch]
        try:
            results = await asyncio.to_thread(self.store.sequence, entries, keys, self.admission)
        except Exception as e:  # every waiter must hear of a failure
            if not isinstance(e, TlogError):
                log.exception("sequencing %d entries failed", len(entries))
            _fail(futures, e)
            if self.observer is not None:
                self.observer.batch_failed()
            return
        indexes: list[int] = []
        for result, fut in zip(results, futures, strict=True):
            if isinstance(result, TlogError):
                _fail([fut], result)
            else:
                indexes.append(result)
        if not indexes:
            return
        admitted = [(e, f) for e, f, r in zip(entries, futures, results, strict=True) if not isinstance(r, TlogError)]
        entries, futures = [e for e, _ in admitted], [f for _, f in admitted]
        self._waiting.append(_Waiting(max(indexes) + 1, indexes, entries, futures, time.monotonic()))
        self._waiting_entries += len(entries)
        self._wake.set()

    def _integrate_round(self) -> list[tuple[int, float]]:
        """In a worker thread: lead if we can and integrate what is sequenced, or take up others' tree.

        Returns (entries, seconds) of each batch integrated."""
        leading = self.store.try_lead()
        took_over, self.leading = leading and not self.leading, leading
        stale = self.store.committed_size() != self.log.state.size
        if not stale and self.log.witnessed and not leading:  # the integrator publishes cosigned checkpoints
            stale = (self.store.published() or b"") != self.log.published.note
        if stale:
            self.log.refresh()
        if not leading:
            return []
        if took_over and self.cosigner is not None:
            self.cosigner.resume(self.log.published.note, self.log.published.checkpoint.size)
        if self.log.witnessed:
            pass  # the checkpoint object is the published one: written by store.publish
        elif took_over or self.store.bucket_checkpoint != self.log.integrated.note:
            # the previous integrator (or our own last round) may have died between the database and the bucket
            self.store.put_checkpoint(self.log.integrated.note)
        batches = []
        for _ in range(ROUNDS_PER_WAKE):
            started = time.monotonic()
            entries = self._next_batch()
            if not entries:
                break
            self.log.integrate(entries, dedup=False)
            batches.append((len(entries), time.monotonic() - started))
        return batches

    def _next_batch(self) -> list[bytes]:
        """The sequenced entries to integrate next: up to batch_max, or through the last boundary.

        One sequencing transaction holds at most batch_max entries and its trailer, so reading one
        more than batch_max always finds a boundary once a transaction with a trailer is committed."""
        if self.boundary is None:
            return self.store.sequenced(self.log.state.size, self.batch_max)
        entries = self.store.sequenced(self.log.state.size, self.batch_max + 1)
        ends = [i for i, entry in enumerate(entries) if self.boundary(entry)]
        if ends:
            return entries[: ends[-1] + 1]
        return entries[: self.batch_max]  # only entries sequenced before boundaries were can have none

    async def _answer(self) -> None:
        published = self.log.published
        ready = [w for w in self._waiting if w.size <= published.checkpoint.size]
        if not ready:
            return
        self._waiting = [w for w in self._waiting if w.size > published.checkpoint.size]
        for w in ready:
            self._waiting_entries -= len(w.entries)
            try:
                for listener in self.on_integrated:
                    listener(w.entries, w.indexes)
                extras = w.entries if self.entry_as_extra else None
                proofs = await asyncio.to_thread(self.log.tlog_proofs, w.indexes, published, extras)
            except Exception as e:
                if not isinstance(e, TlogError):
                    log.exception("answering %d entries failed", len(w.entries))
                _fail(w.futures, e)
                continue
            self.batches += 1
            self.integrated += len(w.entries)
            for fut, proof in zip(w.futures, proofs, strict=True):
                if not fut.done():
                    fut.set_result(proof)

    async def _integrate_loop(self) -> None:
        while True:
            try:
                batches = await asyncio.to_thread(self._integrate_round)
                if batches and self.observer is not None:
                    for entries, seconds in batches:
                        self.observer.batch(entries, seconds)
                    if self.cosigner is None:
                        self.observer.published()
                if batches and self.cosigner is not None:
                    await self.publish(self.log.integrated)  # QuorumError: the republisher retries
                await self._answer()
            except TlogError as e:  # the database or bucket is away: the entries are durable, retry
                log.warning("integration round: %s", e)
                if self.observer is not None:
                    self.observer.batch_failed()
            except Exception:
                log.exception("integration round failed")
            self._expire()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            self._wake.clear()

    def _expire(self) -> None:
        """Answer 503 to submitters still waiting answer_timeout after their entries were sequenced
        (integration is stalled: the database or bucket is away). Their entries keep their indexes."""
        deadline = time.monotonic() - self.answer_timeout
        late = [w for w in self._waiting if w.since < deadline]
        if not late:
            return
        self._waiting = [w for w in self._waiting if w.since >= deadline]
        for w in late:
            self._waiting_entries -= len(w.entries)
            _fail(w.futures, StorageUnavailableError(
                f"entries sequenced at indexes {min(w.indexes)}..{max(w.indexes)} are not integrated after {self.answer_timeout:g} s; "
                "they keep their indexes: submit them again for their proofs"))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SharedSequencer]:
        """Run the batching and integration loops for the duration of the context; resign the lead after."""
        tasks = [asyncio.create_task(self._run(), name="sequencer"), asyncio.create_task(self._integrate_loop(), name="integrator")]
        if self.cosigner is not None:
            tasks.append(asyncio.create_task(self._republish(), name="republisher"))  # acts only while leading
        try:
            yield self
        finally:
            await cancel_all(tasks)
            await asyncio.to_thread(self.store.resign)
            for w in self._waiting:
                _fail(w.futures, TlogError("the log stopped before integrating the entry (it is sequenced and will be logged)"))


def _fail(futures: Sequence[asyncio.Future[bytes]], e: BaseException) -> None:
    if not isinstance(e, TlogError):
        e = TlogError(f"sequencing failed: {e}")
    for fut in futures:
        if not fut.done():
            fut.set_exception(e)
