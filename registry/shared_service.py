"""The registry on shared storage: any number of processes on one PostgreSQL database and bucket.

Why the namespace rules are checked while entries are sequenced: sequencing is already one
transaction at a time across every process (tlog_next's row lock, tlog/storage/shared.py), and it
fixes each entry's index. Inside that transaction this process brings its view of every sequenced
record up to date (the entries others sequenced since it last looked, from PostgreSQL or, once
integrated into full bundles, the bucket) and judges its own records against it, in index order
(the Admission hook). So the state that authorization depends on is the sequenced records in
PostgreSQL themselves; two processes can never both admit two keys' claims of one namespace,
a refused record never gets an index (the log holds no void records), its submitter gets the same
typed error (403, 409, ...) as on one machine, and the integrator stays the log's.

Index roots: the same transaction, after the records it admitted, sequences an index-root record
committing the index as of the root's own index (the Admission's trailer: under the lock this
process's view is current up to there). The integrator integrates only through the last index root
it reads (SharedSequencer.boundary), so every checkpoint ends with one, as on one machine.

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

from tlog.errors import StorageUnavailableError, TlogError
from tlog.hashes import leaf_hash
from tlog.runloop import FreshRead
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TILE_WIDTH

from .index import IndexState
from .record import IndexRoot, Record, RecordError, decode_entry, is_index_root
from .sbom_pool import SbomPool
from .service import Blobs, Registry, check_signed_release
from .state import RegistryState, ValidationError

logger = logging.getLogger("wasmlog.registry.shared")

READ_ATTEMPTS = 3  # reads of what is sequenced, should integration move entries from the database to the bucket meanwhile
PREPARE_MAX = 65536  # records sequenced but not integrated, read at once to judge a refusal again
SHARED_KEPT_ROOTS = 256  # one root per sequencing transaction of every process: more roots per published checkpoint than on one machine
Known = tuple[bytes, Record | None, bytes | None]  # an entry's leaf hash, its record (None: not a valid record), index-root entry
View = tuple[int, RegistryState, frozenset[bytes]]  # every record sequenced below an index applied, and the leaf hashes read


def _decode(entry: bytes) -> Record | None:
    """The entry's record, its signature verified now (cached on the record: apply() then costs no
    verification), or None if it is not a valid record. Call from a worker thread."""
    try:
        record = decode_entry(entry)
    except RecordError:
        return None
    _ = record.signed_by_signer
    return record


def _admitted(entry: bytes) -> Record | None:
    """The record of an entry another process sequenced, its signature not verified again (None: not a
    valid record). Sound because every record sequenced was admitted: admit() gives an index only to a
    record that state.apply() accepted, and apply() refuses an envelope that does not verify with its
    signer's key (the admitting process verified it, under the sequencing lock); a refused record is
    never stored. So this trusts what PostgreSQL holds (or the full bundles our integrator wrote from
    it to the bucket), as authorization already does; records read from the bucket when following the
    integrated tree (_fetch, once their bundle is full) and at start-up (Registry._replay) are verified."""
    try:
        record = decode_entry(entry)
    except RecordError:
        return None
    record.__dict__["signed_by_signer"] = True  # the cached_property's value: verified by the admitting process
    return record


def _known(entry: bytes, admitted: bool = False) -> Known:
    """What following needs of an entry (call from a worker thread); admitted: read from PostgreSQL's
    sequenced entries, so its signature is not verified again (_admitted)."""
    if is_index_root(entry):
        return leaf_hash(entry), None, entry
    return leaf_hash(entry), (_admitted if admitted else _decode)(entry), None


def _padded(index: IndexState, size: int) -> IndexState:
    """index extended to size with entries in no history (index roots)."""
    return index if index.size == size else index.with_records((), size)


class SharedRegistry(Registry):
    """A Registry whose log is on a SharedLogStore, driven by a SharedSequencer."""

    def __init__(self, *, sequencer: SharedSequencer, blobs: Blobs, sbom_pool: SbomPool | None = None) -> None:
        super().__init__(sequencer=sequencer, blobs=blobs, sbom_pool=sbom_pool)
        # Every entry gets its index when it is sequenced: the index root is sequenced there too (trailer below),
        # never appended by the integrator (Log.trailer).
        self.log.trailer = None
        self.store: SharedLogStore = sequencer.store
        self.poll_interval = sequencer.poll_interval
        self._lock = threading.Lock()  # the sequencing thread and the event loop share what follows
        self._seen = self._applied_size  # every record below is in _sequenced_state
        self._sequenced_state = self.state
        self._sequenced_index = _padded(self.indexer.index, self._seen)  # the index of entries [0, _seen)
        self._known: dict[int, Known] = {}  # records in [_applied_size, _seen)
        self._known_hashes: set[bytes] = set()
        self._submitted: dict[bytes, Record] = {}  # leaf hash -> checked record, until sequenced or refused
        self._tentative: tuple[int, RegistryState, IndexState, dict[int, Known], dict[int, IndexState]] | None = None
        self._computed: dict[int, IndexState] = {}  # index roots sequenced, not yet applied -> the index as of each (admit's)
        self._root: tuple[int, bytes] | None = None  # the index root admit() computed: (its index, the entry)
        self._view: View | None = None  # what refusals last read (_read_view): a flood of them reads and verifies only what is new
        self._fresh_view = FreshRead(lambda: asyncio.to_thread(self._read_view))
        self._fresh_size = FreshRead(self._take_up_committed)
        sequencer.admission = self
        sequencer.before_answer = self._catch_up
        sequencer.boundary = is_index_root
        self.indexer.kept_roots = SHARED_KEPT_ROOTS

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

    async def authorize_release(self, *, signer: str, envelope: bytes) -> tuple[Record, bool]:
        """Registry.authorize_release against every record this process knows sequenced; a refusal is
        final only once checked again against every record sequenced by now (another process may have
        just logged the grant it lacks). The authoritative check is admit's."""
        record = check_signed_release(signer=signer, envelope=envelope)
        try:
            self._sequenced_state.check(record)
        except ValidationError:
            h = leaf_hash(record.entry)
            if h in self._known_hashes or h in self._submitted:
                return record, True
            _, state, hashes = await self._fresh_view()  # concurrent refusals share one read, begun after each arrived
            if h in hashes:
                return record, True
            try:
                state.check(record)
            except ValidationError:
                if await asyncio.to_thread(self.store.lookup, [h]):  # integrated before what was read: a replay
                    return record, True
                raise
        return record, False

    def _read_view(self) -> View:
        """Every record sequenced by now applied (blocking): the records read since the last view, or since
        this process's own view (_seen) if that is further on. Raises StorageUnavailableError."""
        with self._lock:
            start, state = self._seen, self._sequenced_state
        hashes: frozenset[bytes] = frozenset()
        if self._view is not None and self._view[0] > start:
            start, state, hashes = self._view
        entries = self._read_sequenced(start)
        self._view = (start + len(entries), self._applied(start, state, entries), hashes | {leaf_hash(e) for e in entries})
        return self._view

    async def caught_up(self) -> bool:
        """Take up at once what other processes integrated since this one last looked; whether there was any
        (concurrent callers share one look, begun after each called)."""
        return await self._fresh_size()

    async def _take_up_committed(self) -> bool:
        return await self._take_up(await asyncio.to_thread(self.store.committed_size))

    def _logged(self, h: bytes) -> bool:
        """Whether h's entry is sequenced or being submitted (blocking: asks the database last)."""
        return h in self._known_hashes or h in self._submitted or bool(self.store.lookup([h]))

    # ── the Admission (tlog/storage/shared.py), in the sequencing thread ─────
    def _read_sequenced(self, start: int) -> list[bytes]:
        """Every entry sequenced from index start on, in order (blocking): the integrated ones from the
        bucket, the others (up to PREPARE_MAX) from the database. Raises StorageUnavailableError if
        integration keeps moving them from one to the other while they are read."""
        for _ in range(READ_ATTEMPTS):
            committed = self.store.committed_size()
            entries = [e for first in range(start, committed, TILE_WIDTH) for e in self.store.read_entries(first, min(committed, first + TILE_WIDTH))]
            pending = self.store.sequenced(max(start, committed), PREPARE_MAX)
            if pending or self.store.committed_size() == committed:  # else their rows may have gone as their bundle filled
                return entries + pending
        raise StorageUnavailableError(f"the log moved on {READ_ATTEMPTS} times while its entries from {start} on were read")

    def _applied(self, first: int, state: RegistryState, entries: Sequence[bytes]) -> RegistryState:
        """state with the records among entries (sequenced from index first on) applied (their signatures
        not verified again: _admitted; a check on it is an early one, admit's is the authoritative one)."""
        for i, entry in enumerate(entries, start=first):
            if is_index_root(entry):  # another transaction's root: in no history
                continue
            record = self._submitted.get(leaf_hash(entry)) or _admitted(entry)
            if record is not None:
                with contextlib.suppress(ValidationError):  # a void record changes nothing (replay reports it)
                    state = state.apply(record, i)
        return state

    def admit(self, next_index: int, sequenced_since: Callable[[int], list[bytes]], entries: Sequence[bytes]) -> list[TlogError | None]:
        with self._lock:
            seen, state, index_state = self._seen, self._sequenced_state, self._sequenced_index
        tentative: dict[int, Known] = {}
        computed: dict[int, IndexState] = {}  # index root's position -> the index as of there
        segment: list[tuple[int, Record | None]] = []  # records since the last root, not yet in index_state
        for i, entry in enumerate(sequenced_since(seen), start=seen):
            h = leaf_hash(entry)
            if is_index_root(entry):  # another transaction's root: in no history
                tentative[i] = (h, None, entry)
                index_state, segment = index_state.with_records(segment, i), []
                computed[i] = index_state
                continue
            record = self._submitted.get(h) or _admitted(entry)
            tentative[i] = (h, record, None)
            segment.append((i, record))
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
            tentative[index] = (h, record, None)
            segment.append((index, record))
            verdicts.append(None)
            index += 1
        index_state = index_state.with_records(segment, index)
        if index > next_index:  # records admitted: the index root follows them
            root = IndexRoot(self.log.origin, index, index_state.root).encode()
            tentative[index] = (leaf_hash(root), None, root)
            self._root = (index, root)
            computed[index] = index_state
            index_state = index_state.with_records((), index + 1)
        self._tentative = (seen, state, index_state, tentative, computed)
        return verdicts

    def trailer(self, index: int) -> bytes | None:
        """The index root admit() computed, as of index (every record before it)."""
        assert self._root is not None and self._root[0] == index, (self._root, index)
        root, self._root = self._root[1], None
        return root

    def committed(self, next_index: int) -> None:
        assert self._tentative is not None
        seen, state, index_state, tentative, computed = self._tentative
        self._tentative, self._root = None, None
        assert index_state.size == next_index, (index_state.size, next_index)
        with self._lock:
            if next_index < self._seen:
                return  # the follower already went past all of it
            for i in range(max(seen, self._applied_size), next_index):
                self._known[i] = tentative[i]
                self._known_hashes.add(tentative[i][0])
            self._computed.update((i, index) for i, index in computed.items() if i >= self._applied_size)
            self._seen, self._sequenced_state, self._sequenced_index = next_index, state, index_state

    # ── following the integrated tree ───────────────────────────────────────
    async def _catch_up(self, size: int) -> None:
        """Before this process's submitters are answered (SharedSequencer.before_answer): read, off the event
        loop, the records below size this process does not know (rare: a replay of a record another process
        sequenced, which this one has not followed yet)."""
        start = self._applied_size
        if any(i not in self._known for i in range(start, size)):
            self._advance(size, await asyncio.to_thread(self._fetch, start, size))

    def _on_integrated(self, entries: Sequence[bytes], indexes: Sequence[int]) -> None:
        """Before this process's submitters are answered: apply every record up to theirs."""
        size = max(indexes) + 1
        self._advance(size, self._fetch(self._applied_size, size))  # _catch_up just read what was not known: no read here

    def _fetch(self, start: int, end: int) -> dict[int, Known]:
        """Records [start, end) that are not known already (blocking): from PostgreSQL while their bundle
        is partial (one query, no signature verified again: _admitted), else from the bucket (verified)."""
        missing = [i for i in range(start, end) if i not in self._known]
        out: dict[int, Known] = {}
        if not missing:
            return out
        for i, entry in enumerate(self.store.sequenced(missing[0], missing[-1] + 1 - missing[0]), start=missing[0]):
            if i not in self._known:
                out[i] = _known(entry, admitted=True)
        missing = [i for i in missing if i not in out]
        if not missing:
            return out
        for first in range(missing[0], missing[-1] + 1, TILE_WIDTH):
            for i, entry in enumerate(self.store.read_entries(first, min(missing[-1] + 1, first + TILE_WIDTH)), start=first):
                if i not in self._known:
                    out[i] = _known(entry)
        return out

    def _advance(self, size: int, fetched: dict[int, Known]) -> None:
        """Apply records [_applied_size, size) to the served state (on the event loop)."""
        with self._lock:
            segment: list[tuple[int, Record | None]] = []  # records since the last root, for the indexer
            for i in range(self._applied_size, size):
                h, record, root = self._known.pop(i) if i in self._known else fetched[i]
                self._known_hashes.discard(h)
                if root is not None:  # checked against the index this process computed (here or while sequencing)
                    computed = self._computed.pop(i, None)
                    if computed is None:
                        for j, r in segment:
                            self.indexer.add(j, r)
                    self.indexer.add_root(i, root, computed)
                    segment = []
                    continue
                segment.append((i, record))
                try:
                    if record is None:
                        raise RecordError(f"entry {i} is not a registry record")
                    self.state = self.state.apply(record, i)
                except (RecordError, ValidationError) as e:
                    self.rejected.append((i, e))  # logged but void: replay reports it, state ignores it
            computed = self._computed.get(size)  # the index as of the root that follows, computed while sequencing: it covers the segment
            if computed is not None:
                self.indexer.adopt(computed)
            else:
                for j, r in segment:
                    self.indexer.add(j, r)
                self.indexer.flush()
            self._applied_size = max(self._applied_size, size)
            for i in [i for i in self._computed if i < self._applied_size]:  # roots we will not meet again
                del self._computed[i]
            if size > self._seen:
                self._seen, self._sequenced_state = size, self.state
                self._sequenced_index = _padded(self.indexer.index, size)

    async def follower(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: take up the records other processes logged, while the app runs."""
        task = asyncio.create_task(self._follow(), name="registry-follower")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _take_up(self, size: int) -> bool:
        """Apply the integrated records up to size (read from the store if not known); whether there were any."""
        start = self._applied_size
        if size <= start:
            return False
        known = all(i in self._known for i in range(start, size))  # usually: no thread hop then
        self._advance(size, {} if known else await asyncio.to_thread(self._fetch, start, size))
        return True

    async def _follow(self) -> None:
        while True:
            size = self.log.integrated.checkpoint.size
            try:
                await self._take_up(size)
            except TlogError as e:  # the bucket is away: the next round retries
                logger.warning("following the log to size %d: %s", size, e)
            await asyncio.sleep(self.poll_interval)
