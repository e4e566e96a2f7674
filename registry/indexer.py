"""The registry's verifiable index, kept in step with its log, and the status proofs it serves.

Every batch the sequencer integrates ends with an index-root record committing the index as of
that record's own index (Log.trailer, in the same commit): so every checkpoint the log signs
ends with an index root, and a status proof against a checkpoint is as of that checkpoint.
A mirror (no trailer) follows the source's index roots and checks each against its own index.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tlog.errors import TlogError
from tlog.integrate import BatchPlan
from tlog.log import Log
from tlog.merkle import inclusion_proofs

from .index import IndexState
from .record import IndexRoot, Record, RecordError, decode_entry, decode_index_root
from .status_proof import Included, build_status_proof

logger = logging.getLogger("wasmlog.registry")
KEPT_ROOTS = 64  # index states kept for the latest index roots (the published one may lag the integrated one)


class NoIndexRoot(TlogError):
    """The published checkpoint does not end with an index root this registry can prove from yet: retry later."""


class Indexer:
    def __init__(self, log: Log, pending: Callable[[bytes], Record | None]) -> None:
        """pending(leaf hash): the record already decoded for a submitted entry, if any."""
        self.log = log
        self.index = IndexState()
        self._pending = pending
        self._tentative: IndexState | None = None  # computed by the trailer, adopted once its batch is applied
        self._at: OrderedDict[int, IndexState] = OrderedDict()  # index-root size -> the index it commits
        self.mismatches: list[tuple[int, str]] = []  # index roots (log index, why) that do not match our index
        self._buffer: list[tuple[int, Record | None]] = []  # applied, not yet in index (see flush)
        self.kept_roots = KEPT_ROOTS

    # ── upkeep ──────────────────────────────────────────────────────────────
    def trailer(self, plan: BatchPlan) -> bytes:
        """Log.trailer: the index-root record after plan's entries (runs in integrate's thread)."""
        items: list[tuple[int, Record | None]] = [(i, None) for i in range(self.index.size, plan.old_size)]  # earlier roots
        for k, (entry, h) in enumerate(zip(plan.new_entries, plan.new_leaf_hashes, strict=True)):
            items.append((plan.old_size + k, self._pending(h) or _record(entry)))
        self._tentative = self.index.with_records(items, plan.state.size)
        return IndexRoot(self.log.origin, plan.state.size, self._tentative.root).encode()

    def add(self, index: int, record: Record | None) -> None:
        """Entry index (a namespace record, or None) was applied, in index order (indexed at the next flush)."""
        if self._tentative is not None and index < self._tentative.size:
            return  # the trailer already indexed this batch
        self._buffer.append((index, record))

    def flush(self) -> None:
        """Index what add() buffered: one map update per key, however many records it got."""
        if self._buffer:
            end = self._buffer[-1][0] + 1
            self.index = self.index.with_records(_with_gaps(self.index.size, self._buffer), end)
            self._buffer = []

    def adopt(self, computed: IndexState) -> None:
        """Our index as of computed.size, computed already from the same records (by the shared registry
        while sequencing them): it replaces the index and what add() buffered, which it covers."""
        assert computed.size >= self.index.size and (not self._buffer or self._buffer[-1][0] < computed.size), (computed.size, self.index.size)
        self.index, self._buffer = computed, []

    def add_root(self, index: int, entry: bytes, computed: IndexState | None = None) -> None:
        """An index-root record at index: check it against our index and keep that state to prove from.
        computed: our index as of index, computed already from the same records (by the shared registry
        while sequencing them): adopted, so the records before index need not be added."""
        self.flush()
        if computed is not None:
            assert computed.size == index, (computed.size, index)
            self.index = computed
        if self._tentative is not None and self._tentative.size == index:
            self.index, self._tentative = self._tentative, None
        if self.index.size < index:
            self.index = self.index.with_records(((i, None) for i in range(self.index.size, index)), index)
        try:
            root = decode_index_root(entry)
        except RecordError as e:
            return self._mismatch(index, f"undecodable: {e}")
        if root.size != index or root.origin != self.log.origin or root.root != self.index.root:
            return self._mismatch(index, f"commits {root.root.hex()[:16]} as of {root.size} in {root.origin}; "
                                         f"the log's records give {self.index.root.hex()[:16]} as of {index}")
        self._at[index] = self.index
        while len(self._at) > self.kept_roots:
            self._at.popitem(last=False)

    def batch_done(self, size: int) -> None:
        """The sequencer's batch up to size (its trailer at size) is applied: adopt the trailer's index."""
        if self._tentative is not None and self._tentative.size == size:
            self.add_root(size, self.log.store.read_entries(size, size + 1)[0])

    def _mismatch(self, index: int, why: str) -> None:
        logger.error("index root at %d does not match the index: %s", index, why)
        self.mismatches.append((index, why))

    # ── status proofs ───────────────────────────────────────────────────────
    def status_proof(self, namespace: str, name: str, release_index: int) -> bytes:
        """The status proof of namespace:name (whose release at release_index is being asked about)
        against the latest published checkpoint. Raises NoIndexRoot."""
        published = self.log.published
        size = published.checkpoint.size
        index = self._at.get(size - 1)
        if index is None or release_index >= index.size:
            raise NoIndexRoot(f"the published checkpoint (size {size}) does not end with an index root covering index {release_index} yet")

        def included(indexes: Sequence[int]) -> list[Included]:
            proofs = inclusion_proofs([*indexes, size - 1], size, self.log.reader)
            return [Included(i, self.log.store.read_entries(i, i + 1)[0], tuple(p)) for i, p in zip([*indexes, size - 1], proofs, strict=True)]

        records = included([])  # the root's own inclusion proof comes last in every batch read
        proof = build_status_proof(index=index, checkpoint=published.note, root=records[-1], namespace=namespace, name=name,
                                   included=lambda ixs: included(ixs)[:-1])
        return proof.encode()


def _with_gaps(start: int, items: list[tuple[int, Record | None]]) -> list[tuple[int, Record | None]]:
    """items, in index order from start, with the entries they skip (earlier index roots) as None."""
    out: list[tuple[int, Record | None]] = []
    for index, record in items:
        out += [(i, None) for i in range(start, index)]
        out.append((index, record))
        start = index + 1
    return out


def _record(entry: bytes) -> Record | None:
    try:
        return decode_entry(entry)
    except TlogError:
        return None  # in no key's history
