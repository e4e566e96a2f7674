"""The log over a store: integrate batches, sign checkpoints, serve tiles and proofs.

Synchronous and blocking (it calls the store): the sequencer and the HTTP
handlers call it from worker threads. One writer (integrate) at a time;
readers may run concurrently and see either the old or the new tree.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .checkpoint import Checkpoint, is_valid_origin, parse_checkpoint
from .errors import NotFoundError, ProofError, TlogError
from .hashes import EMPTY_ROOT, HASH_SIZE, leaf_hash
from .integrate import BatchPlan, TreeState, extend_plan, plan_batch
from .merkle import consistency_proof, inclusion_proof, inclusion_proofs, tree_hash
from .note import Ed25519Signer, Ed25519Verifier, b64encode, open_note, sign_note
from .proof_file import TlogProof
from .storage.base import LogStore
from .tiles import ENTRIES, TILE_WIDTH, TileID, TileNodeReader, encode_entry_bundle, tile_for_size


class _Base64Memo(dict[bytes, str]):
    """The base64 of each hash asked for, computed on first use."""

    def __missing__(self, h: bytes) -> str:
        s = self[h] = b64encode(h)
        return s


@dataclass(frozen=True)
class Published:
    """The latest signed checkpoint: parsed, and as the exact note bytes served."""

    checkpoint: Checkpoint
    note: bytes


class Log:
    """A transparency log with one signing key, over a LogStore."""

    def __init__(
        self, store: LogStore, signer: Ed25519Signer | None, *, origin: str | None = None,
        witnessed: bool = False, cache_tiles: int = 4096, verifier: Ed25519Verifier | None = None,
    ) -> None:
        """witnessed: checkpoints are published only through publish() (after a witness quorum);
        otherwise every integrated checkpoint is published at once.

        A mirror has no signer: it passes the source log's verifier, and integrate() takes the
        source's (already verified) checkpoint note for each batch.
        """
        self.store = store
        self.signer = signer
        self.witnessed = witnessed
        if signer is not None:
            verifier = Ed25519Verifier(signer.name, signer.public_key)
        if verifier is None:
            raise TlogError("a log needs a signer, or a mirror the source log's verifier")
        self.verifier = verifier
        self.origin = verifier.name if origin is None else origin
        if not is_valid_origin(self.origin):
            raise TlogError(f"invalid origin {self.origin!r}: want a schema-less URL, no spaces or '+'")
        self._write_lock = threading.Lock()
        # Called (in integrate's thread, under its lock) with each batch's plan: an entry it returns
        # is appended after the batch, in the same commit (the registry's index-root record).
        self.trailer: Callable[[BatchPlan], bytes | None] | None = None
        self._state, note = store.load()
        self.reader = TileNodeReader(self._fetch_tile, cache_tiles=cache_tiles, summary=self._fetch_summary)
        if note is None:
            self._published = Published(Checkpoint(self.origin, 0, EMPTY_ROOT), b"")
            self._integrated = self._published
            if signer is not None:
                self.integrate([])  # an empty log still signs its size-0 checkpoint
        else:
            self._integrated = self._check_stored(note)
            published = store.published()
            self._published = self._check_published(published) if published else self._integrated
            if not witnessed:
                self._published = self._integrated

    def _check_stored(self, note: bytes, state: TreeState | None = None) -> Published:
        """Refuse to serve a database whose checkpoint is not ours or does not match its tiles (state: the
        tree it is to match, if not the one served: checked before it is taken up)."""
        state = state if state is not None else self._state
        opened, _ = open_note(note, [self.signer_verifier()])
        cp = parse_checkpoint(opened.text)
        if cp.origin != self.origin:
            raise TlogError(f"stored log has origin {cp.origin!r}, not {self.origin!r}")
        if cp.size != state.size or cp.root_hash != state.root_hash:
            raise TlogError("stored checkpoint does not match the stored tree")
        return Published(cp, note)

    def _check_published(self, note: bytes) -> Published:
        opened, _ = open_note(note, [self.signer_verifier()])
        cp = parse_checkpoint(opened.text)
        if cp.origin != self.origin or cp.size > self._state.size:
            raise TlogError("stored published checkpoint does not belong to the stored tree")
        if cp.size and tree_hash(cp.size, self.reader) != cp.root_hash:
            raise TlogError("stored published checkpoint does not match the stored tree")
        return Published(cp, note)

    def signer_verifier(self) -> Ed25519Verifier:
        return self.verifier

    @property
    def published(self) -> Published:
        """The checkpoint served at /checkpoint: quorum-cosigned when the log is witnessed."""
        return self._published

    @property
    def integrated(self) -> Published:
        """The latest checkpoint signed by the log over the committed tree (maybe not yet published)."""
        return self._integrated

    @property
    def state(self) -> TreeState:
        return self._state

    def _fetch_tile(self, level: int, index: int) -> bytes:
        state = self._state
        if state.tile_index(level) == index:
            return state.partial_tiles[level]
        return self.store.read_tile(level, index)

    def _fetch_summary(self, level: int, index: int) -> bytes | None:
        if self._state.tile_index(level) == index:
            return None  # the hot partial tile: expanded once per width, in memory
        return self.store.read_summary(level, index)

    def sign(self, state: TreeState) -> bytes:
        if self.signer is None:
            raise TlogError("a mirror does not sign checkpoints")
        cp = Checkpoint(self.origin, state.size, state.root_hash)
        return sign_note(cp.text(), [self.signer])

    def integrate(
        self, entries: Sequence[bytes], *, note: bytes | None = None, leaf_hashes: Sequence[bytes] | None = None,
        dedup: bool = True,
    ) -> tuple[tuple[int, ...], Published]:
        """Append entries (duplicates get their first index) durably; return indexes and the new checkpoint.

        With note (a mirror), every entry is appended as given and note must be a checkpoint,
        verified by the caller, of exactly the resulting tree. dedup=False appends entries as given
        too, signed by this log (entries a shared store already sequenced, deduplicated). Raises
        StorageFullError or TlogError; then nothing is published and the in-memory state is
        reloaded from the store.
        """
        with self._write_lock:
            dedup = dedup and note is None
            hashes = leaf_hashes if leaf_hashes is not None else [leaf_hash(e) for e in entries]
            known = self.store.lookup(hashes) if dedup else {}
            plan = plan_batch(self._state, entries, known.get, dedup=dedup, leaf_hashes=hashes)
            if note is None:
                trailer = self.trailer(plan) if self.trailer is not None and plan.new_entries else None
                if trailer is not None:
                    plan = extend_plan(plan, [trailer])
                note = self.sign(plan.state)
            else:
                cp = parse_checkpoint(open_note(note, [self.verifier])[0].text)
                if (cp.origin, cp.size, cp.root_hash) != (self.origin, plan.state.size, plan.state.root_hash):
                    raise TlogError(f"the source checkpoint does not match the copied tree of size {plan.state.size}")
            try:
                self.store.commit(plan, note)
            except BaseException:
                # The commit may or may not have happened (a failure after the
                # commit point): take the truth from the store, never from memory.
                state, stored = self.store.load()
                integrated = self._check_stored(stored, state) if stored is not None else None
                self._state = state
                if integrated is not None:
                    self._integrated = integrated
                    if not self.witnessed:
                        self._published = self._integrated
                raise
            self._state = plan.state
            self._integrated = Published(Checkpoint(self.origin, plan.state.size, plan.state.root_hash), note)
            if not self.witnessed:
                self._published = self._integrated
            return plan.indexes, self._integrated

    def refresh(self) -> bool:
        """Take up a tree (and, witnessed, a published checkpoint) another process committed to a
        shared store; True if either moved on."""
        with self._write_lock:
            state, note = self.store.load()
            moved = note is not None and (state.size != self._state.size or note != self._integrated.note)
            if moved:
                assert note is not None
                if state.size < self._state.size:
                    raise TlogError(f"the store's tree ({state.size}) is smaller than this process's ({self._state.size})")
                integrated = self._check_stored(note, state)  # before the tree is served
                self._state, self._integrated = state, integrated
            if not self.witnessed:
                self._published = self._integrated
                return moved
            published = self.store.published()
            if published and published != self._published.note:
                checked = self._check_published(published)
                if checked.checkpoint.size >= self._published.checkpoint.size:
                    self._published, moved = checked, True
            return moved

    def publish(self, published: Published) -> None:
        """Durably publish a cosigned checkpoint of the integrated tree; never moves backwards."""
        with self._write_lock:
            if published.checkpoint.size < self._published.checkpoint.size:
                raise TlogError("refusing to publish a smaller tree than the published one")
            self.store.publish(published.note)
            self._published = published

    def _check_size(self, size: int, limit: Published | None = None) -> None:
        if size > (limit or self._published).checkpoint.size:
            raise NotFoundError(f"tree size {size} is beyond the latest checkpoint")

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Inclusion proof of entry index in the published tree of this size."""
        self._check_size(size)
        return inclusion_proof(index, size, self.reader)

    def consistency_proof(self, old_size: int, new_size: int, *, unpublished: bool = False) -> list[bytes]:
        """Consistency proof between two published (or, for witnesses, integrated) sizes; old_size >= 1."""
        self._check_size(new_size, self._integrated if unpublished else None)
        if old_size > new_size:
            raise ProofError(f"old size {old_size} is beyond new size {new_size}")
        return consistency_proof(old_size, new_size, self.reader)

    def tlog_proofs(
        self, indexes: Sequence[int], published: Published, extras: Sequence[bytes | None] | None = None
    ) -> list[bytes]:
        """c2sp.org/tlog-proofs of many entries against one published checkpoint (extras: each one's extra line)."""
        proofs = inclusion_proofs(indexes, published.checkpoint.size, self.reader)
        b64 = _Base64Memo().__getitem__  # neighbours share most proof hashes: each encoded once, looked up in C
        extras = extras if extras is not None else [None] * len(indexes)
        return [
            TlogProof(i, tuple(p), published.note, x).encode(b64)
            for i, p, x in zip(indexes, proofs, extras, strict=True)
        ]

    def check_tile(self, tile: TileID) -> None:
        size = self._published.checkpoint.size
        if tile_for_size(size, tile.level, tile.index).width < tile.width:  # raises NotFoundError if absent
            raise NotFoundError(f"{tile.path()} does not exist at size {size}")

    def read_tile(self, tile: TileID) -> bytes:
        """The bytes of a hash tile or entry bundle that exists at the published size."""
        self.check_tile(tile)
        if tile.level == ENTRIES:
            start = tile.index * TILE_WIDTH
            return encode_entry_bundle(self.store.read_entries(start, start + tile.width))
        return self._fetch_tile(tile.level, tile.index)[: tile.width * HASH_SIZE]

