"""The registry: checks releases and actions, stores blobs, appends records to its embedded log.

State is derived from the log: at start-up by replaying every entry, and after
each batch by applying the newly integrated entries in index order. New
submissions are checked against that state plus the submissions still waiting
for integration, in the order the sequencer will append them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tlog.errors import NotFoundError, TlogError
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.merkle import consistency_proof
from tlog.sequencer import Sequencer
from tlog.tiles import TILE_WIDTH

from .blobs import BlobStore
from .bucket_blobs import BucketBlobStore
from .dsse import parse_envelope
from .groupsync import GroupSync
from .indexer import Indexer
from .record import (
    PackageRef,
    Record,
    RecordError,
    Release,
    check_module,
    check_module_digest,
    decode_entry,
    is_index_root,
    module_digest,
    record_for,
)
from .sbom import check_sbom
from .sbom_pool import SbomPool
from .state import (
    PENDING,
    InvalidSignature,
    NamespaceState,
    RegistryState,
    ReleaseState,
    ValidationError,
)

logger = logging.getLogger("wasmlog.registry")
T = TypeVar("T")

INLINE_IO_BYTES = 64 << 10  # blobs this small are parsed and written on the event loop: a thread hop costs more


class NotYetPublished(TlogError):
    """The record is logged but no published (cosigned) checkpoint covers it yet: retry later."""


def check_signed_release(*, signer: str, envelope: bytes) -> Record:
    """The cheap checks of a release, before anything costly: envelope, statement and the
    signer's signature. Raises MalformedError, RecordError, InvalidSignature."""
    record = record_for("release", signer, parse_envelope(envelope))
    if not record.signed_by_signer:
        raise InvalidSignature(f"the envelope is not signed by {record.signer}")
    return record


def _check_module(release: Release, module: bytes, digest_only: bool) -> None:
    if digest_only:
        check_module_digest(release, module)
    else:
        check_module(release, module)


def _check_sbom_bytes(release: Release, sbom: bytes, digest_only: bool) -> None:
    if module_digest(sbom) != release.sbom_sha256:
        raise RecordError("the SBOM's SHA-256 is not the statement's sbom digest")
    assert release.sbom_media_type is not None
    if not digest_only:
        check_sbom(release.sbom_media_type, sbom)


# Digests, the wasm parse and the SBOM pre-pass of large blobs: linear, but off the event loop and
# out of the default thread pool that log integration and witness writes use.
_CHECK_THREADS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="wasmlog-publish-checks")


async def _off_loop_if_large(size: int, fn: Callable[..., None], *args: object) -> None:
    if size <= INLINE_IO_BYTES:
        fn(*args)
    else:
        await asyncio.get_running_loop().run_in_executor(_CHECK_THREADS, fn, *args)


async def check_release_contents(record: Record, module: bytes, sbom: bytes | None, sbom_pool: SbomPool, *,
                                 logged: bool = False) -> None:
    """The costly checks of a release whose signer is authorized, cheapest first: the module's
    digest and imports, then the SBOM's digest, limits and validity (in sbom_pool).

    A release already logged passed these checks when it was submitted: its module and SBOM are
    then only compared with the digests it names, so replaying a public release costs no parse
    and no validation. Raises RecordError (422), TooLargeError, PushbackError (503: SBOM validators busy)."""
    release = record.body
    assert isinstance(release, Release)
    if (sbom is None) != (release.sbom_sha256 is None):
        raise RecordError("an SBOM must be sent exactly when the statement names one")
    await _off_loop_if_large(len(module), _check_module, release, module, logged)
    if sbom is not None:
        await _off_loop_if_large(len(sbom), _check_sbom_bytes, release, sbom, logged)
        assert release.sbom_media_type is not None
        if not logged:
            await sbom_pool.validate(release.sbom_media_type, sbom)


Blobs = BlobStore | BucketBlobStore


async def store_blobs(blobs: Blobs, group: GroupSync, *datas: bytes | None) -> None:
    """Write each blob and return once all are durable (one shared filesystem sync per round; a bucket
    confirms each write, made concurrently)."""
    if isinstance(blobs, BucketBlobStore):
        writes = [blobs.put_async(data) for data in datas if data is not None]
        await (writes[0] if len(writes) == 1 else asyncio.gather(*writes))  # one blob (no SBOM): no task to make
        return
    for data in datas:
        if data is None:
            continue
        if len(data) <= INLINE_IO_BYTES:
            blobs.write(data)  # into the page cache: cheaper here than a thread hop
        else:
            await asyncio.to_thread(blobs.write, data)
    await group.wait()


def _done(value: bytes) -> asyncio.Future[bytes]:
    fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut


LOGGED = b"logged"  # check_entry's answer for a release already logged or pending
CHECKED_CACHE = 4096  # records checked for front-ends, kept until they submit them (a miss only decodes again)


class Registry:
    def __init__(self, *, sequencer: Sequencer, blobs: Blobs, sbom_pool: SbomPool | None = None) -> None:
        self.sequencer = sequencer
        self.sbom_pool = SbomPool() if sbom_pool is None else sbom_pool
        self.log: Log = sequencer.log
        self.blobs = blobs
        self.rejected: list[tuple[int, TlogError]] = []
        self.state = RegistryState()
        self._applied_size = 0
        self._pending: dict[bytes, Record] = {}  # leaf hash -> record, in submission order
        self.indexer = Indexer(self.log, self._pending.get)
        self._replay()
        if self.log.signer is not None:  # our own log (not a mirror's copy): every batch ends with an index root
            self.log.trailer = self.indexer.trailer
        self.pending_state = self.state
        sequencer.on_integrated.append(self._on_integrated)
        sequencer.entry_as_extra = True  # every proof we hand out carries its entry
        self.blob_sync = GroupSync(blobs.sync)
        self._checked: OrderedDict[bytes, Record] = OrderedDict()  # leaf hash -> record (front-ends)

    def _replay(self) -> None:
        size = self.log.integrated.checkpoint.size
        for start in range(0, size, TILE_WIDTH):
            entries = self.log.store.read_entries(start, min(size, start + TILE_WIDTH))
            self._apply([(start + i, e) for i, e in enumerate(entries)])
        logger.info("replayed %d log entries (%d rejected)", size, len(self.rejected))

    def _apply(self, entries: Sequence[tuple[int, bytes]], known: dict[bytes, Record] | None = None) -> bool:
        """Apply entries in index order; return whether all of them were valid."""
        ok = True
        for index, entry in entries:
            if index < self._applied_size:
                continue
            self._applied_size = index + 1
            if is_index_root(entry):
                self.indexer.add_root(index, entry)
                continue
            record = None
            try:
                # A record we checked at submission is reused: its signature was verified once.
                record = (known or {}).get(leaf_hash(entry)) or decode_entry(entry)
                self.state = self.state.apply(record, index)
            except (RecordError, ValidationError) as e:
                self.rejected.append((index, e))  # logged but void: replay reports it, state ignores it
                ok = False
            self.indexer.add(index, record)
        self.indexer.flush()
        return ok

    def _on_integrated(self, entries: Sequence[bytes], indexes: Sequence[int]) -> None:
        fresh = sorted({i: e for e, i in zip(entries, indexes, strict=True) if i >= self._applied_size}.items())
        all_pending = all(leaf_hash(e) in self._pending for _, e in fresh)
        ok = self._apply(fresh, self._pending)
        self.indexer.batch_done(self._applied_size)
        for _, e in fresh:
            self._pending.pop(leaf_hash(e), None)
        # pending_state already is state + the remaining pending records, in the same order,
        # unless something we did not submit, or a void record, came in between.
        if not (ok and all_pending):
            self._rebuild_pending()

    def _rebuild_pending(self) -> None:
        state = self.state
        for h, record in list(self._pending.items()):
            try:
                state = state.apply(record, PENDING)
            except ValidationError:
                self._pending.pop(h)
        self.pending_state = state

    def _logged(self, h: bytes) -> bool:
        """Whether the entry with leaf hash h is pending or logged (one read of the memory-mapped dedup index)."""
        return h in self._pending or bool(self.log.store.lookup([h]))

    def _queue(self, record: Record) -> asyncio.Future[bytes]:
        """Check the record against the pending state, reserve it and queue it; the future is its tlog-proof.

        Nothing may await between the check and the queueing: the sequencer appends in
        reservation order. Raises ValidationError (nothing reserved).
        """
        entry = record.entry
        h = leaf_hash(entry)
        reserved = not self._logged(h)
        if reserved:
            self.pending_state = self._judged(lambda: self.pending_state.apply(record, PENDING), record)
            self._pending[h] = record
        try:
            fut = self.sequencer.submit(entry)
        except Exception:
            if reserved:  # a record another submitter reserved stays theirs
                self._unreserve(h)
            raise
        if reserved:
            def unreserve_on_failure(f: asyncio.Future[bytes]) -> None:
                if f.cancelled() or f.exception() is not None:
                    self._unreserve(h)

            fut.add_done_callback(unreserve_on_failure)
        return fut

    def _judged(self, judge: Callable[[], T], record: Record) -> T:
        """judge() against the pending state; a refusal the integrated state makes too is raised as it words
        it, naming the logged record's index (the pending state may still hold it as not yet integrated)."""
        try:
            return judge()
        except ValidationError:
            self.state.check(record)
            raise

    def _unreserve(self, h: bytes) -> None:
        if self._pending.pop(h, None) is not None:
            self._rebuild_pending()

    async def submit(self, record: Record) -> bytes:
        """Append a checked record; return its tlog-proof with the entry as extra data."""
        return await asyncio.shield(self._queue(record))

    async def authorize_release(self, *, signer: str, envelope: bytes) -> tuple[Record, bool]:
        """The cheap checks of a release: its statement, its signature, and whether the signer may
        publish it now (403, 409), so that an unauthorized publish costs no wasm parse and no SBOM
        validation. Returns the record and whether it is already logged or pending (a replay)."""
        record = check_signed_release(signer=signer, envelope=envelope)
        logged = self._logged(leaf_hash(record.entry))
        if not logged:
            self._judged(lambda: self.pending_state.check(record), record)
        return record, logged

    async def publish_authorized(self, record: Record, module: bytes, sbom: bytes | None, *, logged: bool) -> bytes:
        """Check an authorized release's module and SBOM, store them, and log it; return its tlog-proof."""
        await check_release_contents(record, module, sbom, self.sbom_pool, logged=logged)
        await store_blobs(self.blobs, self.blob_sync, sbom, module)  # durable before the entry naming them
        return await self.submit(record)

    async def publish(self, *, signer: str, envelope: bytes, module: bytes, sbom: bytes | None) -> bytes:
        """authorize_release, then publish_authorized."""
        record, logged = await self.authorize_release(signer=signer, envelope=envelope)
        return await self.publish_authorized(record, module, sbom, logged=logged)

    # ── for front-end processes (registry/frontend.py), over tlog/addipc.py ──
    def _decoded(self, entry: bytes) -> Record:
        record = self._checked.pop(leaf_hash(entry), None) or decode_entry(entry)
        if record.type != "release":
            raise RecordError("front-ends forward releases only")
        return record

    def check_entry(self, entry: bytes) -> asyncio.Future[bytes]:
        """Would this release entry be accepted now? Resolves to b"" (check its module and SBOM),
        LOGGED (it is logged or pending: compare their digests only) or raises ValidationError.

        The front-end asks before it writes blobs, so a refused release writes nothing.
        """
        record = self._decoded(entry)
        h = leaf_hash(entry)
        logged = self._logged(h)
        if not logged:
            self._judged(lambda: self.pending_state.check(record), record)  # verifies the signature here too: never trust a front-end's word
        self._checked[h] = record
        while len(self._checked) > CHECKED_CACHE:
            self._checked.popitem(last=False)
        return _done(LOGGED if logged else b"")

    def submit_entry(self, entry: bytes) -> asyncio.Future[bytes]:
        """Queue a release entry whose blobs the front-end made durable; the future is its tlog-proof."""
        return self._queue(self._decoded(entry))

    async def act(self, *, record_type: str, signer: str, envelope: bytes) -> bytes:
        """Log a key grant, key revocation or yank."""
        if record_type == "release":
            raise RecordError("releases are published with their module")
        return await self.submit(record_for(record_type, signer, parse_envelope(envelope)))

    # ── reads ───────────────────────────────────────────────────────────────
    @property
    def applied_size(self) -> int:
        """The log entries below this size are applied to the state reads are answered from."""
        return self._applied_size

    async def caught_up(self) -> bool:
        """Take up what other processes logged since this one last looked; whether there was any (a
        read that found nothing is then worth trying again). One process is always current: False."""
        return False

    def namespace(self, ns: str) -> NamespaceState:
        state = self.state.namespaces.get(ns)
        if state is None:
            raise NotFoundError(f"namespace {ns} is unclaimed")
        return state

    def release(self, ref: PackageRef) -> ReleaseState:
        found = self.state.release(ref)
        if found is None:
            raise NotFoundError(f"{ref} is not published")
        return found

    def metadata(self, ref: PackageRef) -> dict[str, Any]:
        r = self.release(ref)
        rel = r.release
        return {
            "package": str(ref),
            "index": r.index,
            "module": {"sha256": rel.module_sha256},
            "sbom": None if rel.sbom_sha256 is None else {"sha256": rel.sbom_sha256, "mediaType": rel.sbom_media_type},
            "imports": [{"module": i.module, "name": i.name, "kind": i.kind} for i in rel.imports],
            "signer": r.signer,
            "yanked_at": r.yanked_at,
        }

    def entry(self, index: int) -> bytes:
        return self.log.store.read_entries(index, index + 1)[0]

    def tlog_proof(self, index: int, old_size: int | None = None) -> tuple[bytes, list[bytes]]:
        """A tlog-proof of entry index against the latest published checkpoint (extra: the entry),
        and the consistency proof from old_size to that checkpoint if asked."""
        published = self.log.published
        size = published.checkpoint.size
        if index >= size:
            raise NotYetPublished(f"index {index} is logged but not yet in a published checkpoint")
        proof = self.log.tlog_proofs([index], published, [self.entry(index)])[0]
        consistency: list[bytes] = []
        if old_size is not None:
            if not 0 < old_size <= size:
                raise NotFoundError(f"old size {old_size} is not in 1..{size}")
            consistency = consistency_proof(old_size, size, self.log.reader)
        return proof, consistency
