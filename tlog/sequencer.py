"""The asyncio sequencer: pool submissions, integrate them in batches off the event loop.

A submission waits in a bounded pool. Every interval (or as soon as batch_max
entries wait) the pool is integrated in one store transaction in a worker
thread, a checkpoint is signed, and every waiting submitter gets its
c2sp.org/tlog-proof. Nothing is answered before the commit returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from .errors import PushbackError, TlogError
from .hashes import leaf_hash
from .log import Log, Published
from .runloop import cancel_all
from .witnessing import Cosigner, RequestBudget

log = logging.getLogger("wasmlog.sequencer")

DEFAULT_INTERVAL = 0.1  # seconds: the longest wait before a pending batch is integrated
DEFAULT_BATCH_MAX = 4096
DEFAULT_MAX_PENDING = 65536  # beyond this, submissions get 503 with Retry-After
DEFAULT_REPUBLISH_INTERVAL = 60.0  # seconds between cosignings of an unchanged tree (witness budgets)
RETRY_INTERVAL = 1.0  # seconds between attempts to publish a tree whose quorum was not met


class Observer(Protocol):
    """What a sequencer reports (tlog/metrics.py implements it)."""

    def batch(self, entries: int, seconds: float) -> None: ...
    def batch_failed(self) -> None: ...
    def published(self) -> None: ...


class Sequencer:
    """Batches submissions to a Log. Start it with ``async with sequencer.running():``."""

    def __init__(
        self,
        log: Log,
        *,
        interval: float = DEFAULT_INTERVAL,
        batch_max: int = DEFAULT_BATCH_MAX,
        max_pending: int = DEFAULT_MAX_PENDING,
        cosigner: Cosigner | None = None,
        republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
        witness_budget: RequestBudget | None = None,
    ) -> None:
        """With a cosigner, a checkpoint is published (and submitters answered) only once
        the witness quorum cosigned it; an unchanged tree is resubmitted to witnesses at most
        every republish_interval seconds, an unpublished one every RETRY_INTERVAL. With a
        witness_budget, cosigning rounds wait for it (entries integrated meanwhile join the
        round's checkpoint)."""
        if interval <= 0 or batch_max < 1 or max_pending < batch_max:
            raise ValueError("need interval > 0, batch_max >= 1 and max_pending >= batch_max")
        self.log = log
        self.interval = interval
        self.batch_max = batch_max
        self.max_pending = max_pending
        self._pool: dict[bytes, tuple[bytes, asyncio.Future[bytes]]] = {}  # leaf hash -> (entry, waiter)
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self.cosigner = cosigner
        # Called on the event loop after each batch is durable (entries, their indexes), before
        # any submitter is answered and before the next batch integrates: how an application
        # keeps state derived from the log in step.
        self.on_integrated: list[Callable[[Sequence[bytes], Sequence[int]], None]] = []
        self.republish_interval = republish_interval
        self.witness_budget = witness_budget
        self._publish_lock = asyncio.Lock()
        self._integrate_lock = asyncio.Lock()  # each batch's listeners run before the next batch integrates
        self._last_publish = float("-inf")
        self.observer: Observer | None = None
        self.batches = 0  # counters for metrics and tests
        self.integrated = 0
        self.entry_as_extra = False  # answer with tlog-proofs whose extra line is the entry itself
        self.leading = True  # this process integrates (on shared storage, only the lock holder does)

    @property
    def pending(self) -> int:
        """Entries waiting in the pool (submitted, not yet taken into a batch)."""
        return len(self._pool)

    async def add(self, entry: bytes) -> bytes:
        """Submit an entry; return its tlog-proof once a checkpoint covering it is signed.

        A duplicate of a pending or logged entry gets the original index.
        Raises PushbackError when the pool is full, TlogError if the batch failed.
        """
        return await asyncio.shield(self.submit(entry))

    def submit(self, entry: bytes) -> asyncio.Future[bytes]:
        """add() without a coroutine: the future (shared by duplicates: do not cancel it).

        Raises PushbackError when the pool is full.
        """
        h = leaf_hash(entry)
        pending = self._pool.get(h)
        if pending is None:
            if len(self._pool) >= self.max_pending:
                raise PushbackError("too many pending entries")
            pending = (entry, asyncio.get_running_loop().create_future())
            self._pool[h] = pending
            self._nonempty.set()
            if len(self._pool) >= self.batch_max:
                self._full.set()
        return pending[1]

    async def _run(self) -> None:
        while True:
            await self._nonempty.wait()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(self.interval):
                    await self._full.wait()
            await self.flush()

    def _take_batch(self) -> tuple[list[bytes], list[tuple[bytes, asyncio.Future[bytes]]]]:
        """Take up to batch_max pooled entries, oldest first: (their leaf hashes, their (entry, future) pairs)."""
        keys = list(self._pool)[: self.batch_max]
        batch = [self._pool.pop(k) for k in keys]
        if len(self._pool) < self.batch_max:
            self._full.clear()
        if not self._pool:
            self._nonempty.clear()
        return keys, batch

    async def flush(self) -> None:
        """Integrate up to batch_max pending entries now."""
        keys, batch = self._take_batch()
        if not batch:
            return
        entries = [entry for entry, _ in batch]
        try:
            async with self._integrate_lock:  # flush can be called while another batch integrates
                started = time.monotonic()
                indexes, integrated = await asyncio.to_thread(self.log.integrate, entries, leaf_hashes=keys)
                if self.observer is not None:
                    self.observer.batch(len(entries), time.monotonic() - started)
                    if self.cosigner is None:
                        self.observer.published()
                for listener in self.on_integrated:
                    listener(entries, indexes)
            published = await self.publish(integrated) if self.cosigner else integrated
            extras = entries if self.entry_as_extra else None
            proofs = await asyncio.to_thread(self.log.tlog_proofs, indexes, published, extras)
        except Exception as e:  # every waiter must hear of a failure
            if not isinstance(e, TlogError):
                log.exception("batch of %d entries failed", len(entries))
                e = TlogError(f"integration failed: {e}")
            else:
                log.error("batch of %d entries failed: %s", len(entries), e)
            if self.observer is not None:
                self.observer.batch_failed()
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        self.batches += 1
        self.integrated += len(entries)
        for (_, fut), proof in zip(batch, proofs, strict=True):
            if not fut.done():
                fut.set_result(proof)

    async def _prove(self, old_size: int, new_size: int) -> list[bytes]:
        return await asyncio.to_thread(self.log.consistency_proof, old_size, new_size, unpublished=True)

    async def publish(self, integrated: Published) -> Published:
        """Have the witnesses cosign an integrated checkpoint, then publish it. Raises QuorumError."""
        assert self.cosigner is not None
        async with self._publish_lock:
            current = self.log.published
            if current.checkpoint.size > integrated.checkpoint.size:
                return current  # a later batch already published a larger tree that covers this one
            fresh = time.monotonic() - self._last_publish < self.republish_interval
            if current.note and current.checkpoint == integrated.checkpoint and fresh:
                return current  # nothing changed: do not spend the witnesses' budget
            if self.witness_budget is not None:
                await self.witness_budget.take()
                integrated = self.log.integrated  # what was integrated while we waited supersedes it
            refresh = bool(current.note) and current.checkpoint == integrated.checkpoint  # new timestamps wanted
            note = await self.cosigner.cosign(integrated.note, integrated.checkpoint, self._prove, refresh=refresh)
            published = Published(integrated.checkpoint, note)
            await asyncio.to_thread(self.log.publish, published)
            self._last_publish = time.monotonic()
            if self.observer is not None:
                self.observer.published()
            return published

    async def _republish(self) -> None:
        """Publish trees left unpublished (after a failed quorum or a restart), and refresh old cosignatures."""
        while True:
            behind = self.log.published.checkpoint.size < self.log.integrated.checkpoint.size or not self.log.published.note
            stale = time.monotonic() - self._last_publish >= self.republish_interval
            if (behind or stale) and not self._pool and self.leading:
                try:
                    await self.publish(self.log.integrated)
                except TlogError as e:
                    log.warning("publishing size %d: %s", self.log.integrated.checkpoint.size, e)
            await asyncio.sleep(min(RETRY_INTERVAL, self.republish_interval))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sequencer]:
        """Run the batching loop for the duration of the context."""
        tasks = [asyncio.create_task(self._run(), name="sequencer")]
        if self.cosigner is not None:
            self.cosigner.resume(self.log.published.note, self.log.published.checkpoint.size)
            tasks.append(asyncio.create_task(self._republish(), name="republisher"))
        try:
            yield self
        finally:
            await cancel_all(tasks)
