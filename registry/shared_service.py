"""The registry on shared storage: any number of processes on one PostgreSQL database and bucket.

Why the namespace rules are checked while entries are sequenced: sequencing is already one
transaction at a time across every process (tlog_next's row lock, tlog/storage/shared.py), and it
fixes each entry's index. Inside that transaction this process brings its view of every sequenced
record up to date (the entries others sequenced since it last looked, from PostgreSQL or, once
integrated into full bundles, the bucket) and judges its own records against it, in index order
(the Admission hook). So the state that authorization depends on is the sequenced records in
PostgreSQL themselves; two processes can never both admit two keys' claims of one namespace,
a refused record never gets an index (the log holds no void records), its submitter gets the same
typed error (403, 409, ...) as on one machine, and the integrator stays the log's, unchanged.

Every process also follows the integrated tree (its own batches as they are answered, others'
by polling) to serve every read from its in-memory state, like Registry does on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from tlog.errors import TlogError
from tlog.hashes import leaf_hash
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TILE_WIDTH

from .record import Record, RecordError, decode_entry
from .sbom_pool import SbomPool
from .service import Blobs, Registry, check_signed_release
from .state import RegistryState, ValidationError

logger = logging.getLogger("wasmlog.registry.shared")

PREPARE_MAX = 65536  # records sequenced but not integrated, read before the lock (more are read under it)
Known = tuple[bytes, Record | None]  # an entry's leaf hash and its record (None: not a valid record)


def _decode(entry: bytes) -> Record | None:
    """The entry's record, its signature verified now (cached on the record: apply() then costs no
    verification), or None if it is not a valid record. Call from a worker thread."""
    try:
        record = decode_entry(entry)
    except RecordError:
        return None
    _ = record.signed_by_signer
    return record


class SharedRegistry(Registry):
    """A Registry whose log is on a SharedLogStore, driven by a SharedSequencer."""

    def __init__(self, *, sequencer: SharedSequencer, blobs: Blobs, sbom_pool: SbomPool | None = None) -> None:
        super().__init__(sequencer=sequencer, blobs=blobs, sbom_pool=sbom_pool)
        # Index roots close a batch in the same commit (Log.trailer); on shared storage every entry gets its
        # index when it is sequenced, so a trailer would not be the entry sequenced there: none is written here
        # yet, and status proofs answer 503 NoIndexRoot (see docs/architecture.md).
        self.log.trailer = None
        self.store: SharedLogStore = sequencer.store
        self.poll_interval = sequencer.poll_interval
        self._lock = threading.Lock()  # the sequencing thread and the event loop share what follows
        self._seen = self._applied_size  # every record below is in _sequenced_state
        self._sequenced_state = self.state
        self._known: dict[int, Known] = {}  # records in [_applied_size, _seen)
        self._known_hashes: set[bytes] = set()
        self._submitted: dict[bytes, Record] = {}  # leaf hash -> checked record, until sequenced or refused
        self._tentative: tuple[int, RegistryState, dict[int, Known]] | None = None
        self._prepared: dict[bytes, Record] = {}  # leaf hash -> others' records decoded and verified outside the lock
        sequencer.admission = self

    # ── submitting ──────────────────────────────────────────────────────────
    def _queue(self, record: Record) -> asyncio.Future[bytes]:
        """Queue a checked record; the rules are applied when it is sequenced (admit)."""
        h = leaf_hash(record.entry)
        self._submitted[h] = record
        try:
            fut = self.sequencer.submit(record.entry)
        except Exception:
            self._submitted.pop(h, None)
            raise
        fut.add_done_callback(lambda _: self._submitted.pop(h, None))
        return fut

    def authorize_release(self, *, signer: str, envelope: bytes) -> tuple[Record, bool]:
        """Registry.authorize_release against every record this process knows sequenced (the
        authoritative check is admit's); a record the rules refuse may be a replay of a logged one."""
        record = check_signed_release(signer=signer, envelope=envelope)
        try:
            self._sequenced_state.check(record)
        except ValidationError:
            if not self._logged(leaf_hash(record.entry)):
                raise
            return record, True
        return record, False

    def _logged(self, h: bytes) -> bool:
        return h in self._known_hashes or h in self._submitted or bool(self.store.lookup([h]))

    # ── the Admission (tlog/storage/shared.py), in the sequencing thread ─────
    def prepare(self) -> None:
        """Decode, and verify the signatures of, what others sequenced since we last looked, before
        taking the sequencing lock: under it only the records sequenced meanwhile cost a verification."""
        with self._lock:
            seen = self._seen
        committed = self.store.committed_size()
        entries = [e for first in range(seen, committed, TILE_WIDTH) for e in self.store.read_entries(first, min(committed, first + TILE_WIDTH))]
        entries += self.store.sequenced(max(seen, committed), PREPARE_MAX)
        prepared: dict[bytes, Record] = {}
        for entry in entries:
            h = leaf_hash(entry)
            record = self._submitted.get(h) or _decode(entry)
            if record is not None:
                prepared[h] = record
        self._prepared = prepared

    def admit(self, next_index: int, sequenced_since: Callable[[int], list[bytes]], entries: Sequence[bytes]) -> list[TlogError | None]:
        with self._lock:
            seen, state = self._seen, self._sequenced_state
        tentative: dict[int, Known] = {}
        for i, entry in enumerate(sequenced_since(seen), start=seen):
            h = leaf_hash(entry)
            record = self._prepared.get(h) or self._submitted.get(h) or _decode(entry)
            tentative[i] = (h, record)
            if record is not None:
                with contextlib.suppress(ValidationError):  # a void record changes nothing (replay reports it)
                    state = state.apply(record, i)
        verdicts: list[TlogError | None] = []
        index = next_index
        for entry in entries:
            h = leaf_hash(entry)
            record = self._submitted.get(h) or _decode(entry)
            try:
                if record is None:
                    raise RecordError("not a registry record")
                state = state.apply(record, index)
            except (RecordError, ValidationError) as e:
                verdicts.append(e)
                continue
            tentative[index] = (h, record)
            verdicts.append(None)
            index += 1
        self._tentative = (seen, state, tentative)
        self._prepared = {}
        return verdicts

    def committed(self, next_index: int) -> None:
        assert self._tentative is not None
        seen, state, tentative = self._tentative
        self._tentative = None
        with self._lock:
            if next_index < self._seen:
                return  # the follower already went past all of it
            for i in range(max(seen, self._applied_size), next_index):
                self._known[i] = tentative[i]
                self._known_hashes.add(tentative[i][0])
            self._seen, self._sequenced_state = next_index, state

    # ── following the integrated tree ───────────────────────────────────────
    def _on_integrated(self, entries: Sequence[bytes], indexes: Sequence[int]) -> None:
        """Before this process's submitters are answered: apply every record up to theirs."""
        size = max(indexes) + 1
        self._advance(size, self._fetch(self._applied_size, size))  # reads the store only if something is not known (rare)

    def _fetch(self, start: int, end: int) -> dict[int, Known]:
        """Records [start, end) that are not known already, read from the store (blocking)."""
        missing = [i for i in range(start, end) if i not in self._known]
        out: dict[int, Known] = {}
        if not missing:
            return out
        for first in range(missing[0], missing[-1] + 1, TILE_WIDTH):
            for i, entry in enumerate(self.store.read_entries(first, min(missing[-1] + 1, first + TILE_WIDTH)), start=first):
                if i not in self._known:
                    out[i] = (leaf_hash(entry), _decode(entry))
        return out

    def _advance(self, size: int, fetched: dict[int, Known]) -> None:
        """Apply records [_applied_size, size) to the served state (on the event loop)."""
        with self._lock:
            for i in range(self._applied_size, size):
                h, record = self._known.pop(i) if i in self._known else fetched[i]
                self._known_hashes.discard(h)
                try:
                    if record is None:
                        raise RecordError(f"entry {i} is not a registry record")
                    self.state = self.state.apply(record, i)
                except (RecordError, ValidationError) as e:
                    self.rejected.append((i, e))  # logged but void: replay reports it, state ignores it
            self._applied_size = max(self._applied_size, size)
            if size > self._seen:
                self._seen, self._sequenced_state = size, self.state

    async def follower(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: take up the records other processes logged, while the app runs."""
        task = asyncio.create_task(self._follow(), name="registry-follower")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _follow(self) -> None:
        while True:
            size = self.log.integrated.checkpoint.size
            start = self._applied_size
            if size > start:
                try:
                    self._advance(size, await asyncio.to_thread(self._fetch, start, size))
                except TlogError as e:  # the bucket is away: the next round retries
                    logger.warning("following the log to size %d: %s", size, e)
            await asyncio.sleep(self.poll_interval)
