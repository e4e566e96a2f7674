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

from tlog.errors import TlogError
from tlog.hashes import leaf_hash
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TILE_WIDTH

from .index import IndexState
from .record import IndexRoot, Record, RecordError, decode_entry, is_index_root
from .sbom_pool import SbomPool
from .service import Blobs, Registry, check_signed_release
from .state import RegistryState, ValidationError

logger = logging.getLogger("wasmlog.registry.shared")

PREPARE_MAX = 65536  # records sequenced but not integrated, read before the lock (more are read under it)
SHARED_KEPT_ROOTS = 256  # one root per sequencing transaction of every process: more roots per published checkpoint than on one machine
Known = tuple[bytes, Record | None, bytes | None]  # an entry's leaf hash, its record (None: not a valid record), index-root entry


def _decode(entry: bytes) -> Record | None:
    """The entry's record, its signature verified now (cached on the record: apply() then costs no
    verification), or None if it is not a valid record. Call from a worker thread."""
    try:
        record = decode_entry(entry)
    except RecordError:
        return None
    _ = record.signed_by_signer
    return record


def _known(entry: bytes) -> Known:
    """What following needs of an entry (call from a worker thread)."""
    if is_index_root(entry):
        return leaf_hash(entry), None, entry
    return leaf_hash(entry), _decode(entry), None


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
        self._tentative: tuple[int, RegistryState, IndexState, dict[int, Known]] | None = None
        self._root: tuple[int, bytes] | None = None  # the index root admit() computed: (its index, the entry)
        self._prepared: dict[bytes, Record] = {}  # leaf hash -> others' records decoded and verified outside the lock
        sequencer.admission = self
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

    def authorize_release(self, *, signer: str, envelope: bytes) -> tuple[Record, bool]:
        """Registry.authorize_release against every record this process knows sequenced (the
        authoritative check is admit's); a record the rules refuse may be a replay of a logged one.
        While the log holds records this process has not taken up (a claim answered by another
        node, say), a refusal is left to admit(), which sees them all."""
        record = check_signed_release(signer=signer, envelope=envelope)
        try:
            self._sequenced_state.check(record)
        except ValidationError:
            if self._logged(leaf_hash(record.entry)):
                return record, True
            if self.store.committed_size() > self._seen:
                return record, False
            raise
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
            seen, state, index_state = self._seen, self._sequenced_state, self._sequenced_index
        tentative: dict[int, Known] = {}
        for i, entry in enumerate(sequenced_since(seen), start=seen):
            h = leaf_hash(entry)
            if is_index_root(entry):  # another transaction's root: in no history
                tentative[i] = (h, None, entry)
                continue
            record = self._prepared.get(h) or self._submitted.get(h) or _decode(entry)
            tentative[i] = (h, record, None)
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
            verdicts.append(None)
            index += 1
        index_state = index_state.with_records(((i, tentative[i][1]) for i in range(index_state.size, index)), index)
        if index > next_index:  # records admitted: the index root follows them
            root = IndexRoot(self.log.origin, index, index_state.root).encode()
            tentative[index] = (leaf_hash(root), None, root)
            self._root = (index, root)
            index_state = index_state.with_records((), index + 1)
        self._tentative = (seen, state, index_state, tentative)
        self._prepared = {}
        return verdicts

    def trailer(self, index: int) -> bytes | None:
        """The index root admit() computed, as of index (every record before it)."""
        assert self._root is not None and self._root[0] == index, (self._root, index)
        root, self._root = self._root[1], None
        return root

    def committed(self, next_index: int) -> None:
        assert self._tentative is not None
        seen, state, index_state, tentative = self._tentative
        self._tentative, self._root = None, None
        assert index_state.size == next_index, (index_state.size, next_index)
        with self._lock:
            if next_index < self._seen:
                return  # the follower already went past all of it
            for i in range(max(seen, self._applied_size), next_index):
                self._known[i] = tentative[i]
                self._known_hashes.add(tentative[i][0])
            self._seen, self._sequenced_state, self._sequenced_index = next_index, state, index_state

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
                    out[i] = _known(entry)
        return out

    def _advance(self, size: int, fetched: dict[int, Known]) -> None:
        """Apply records [_applied_size, size) to the served state (on the event loop)."""
        with self._lock:
            for i in range(self._applied_size, size):
                h, record, root = self._known.pop(i) if i in self._known else fetched[i]
                self._known_hashes.discard(h)
                if root is not None:
                    self.indexer.add_root(i, root)  # checked against the index this process computed
                    continue
                self.indexer.add(i, record)
                try:
                    if record is None:
                        raise RecordError(f"entry {i} is not a registry record")
                    self.state = self.state.apply(record, i)
                except (RecordError, ValidationError) as e:
                    self.rejected.append((i, e))  # logged but void: replay reports it, state ignores it
            self.indexer.flush()
            self._applied_size = max(self._applied_size, size)
            if size > self._seen:
                self._seen, self._sequenced_state = size, self.state
                self._sequenced_index = _padded(self.indexer.index, size)

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
