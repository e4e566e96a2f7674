"""`wasmlog log migrate`: copy a log (and a registry's blobs) between LMDB and the shared engine.

Every entry is read from the source and its tree recomputed (plan_batch, as when it was first
logged); the copy is refused if the source's checkpoint (or published checkpoint) is not signed by
the log's key, if the recomputed root is not the one in the source's checkpoint, if the target
already has a checkpoint the log's key did not sign, or if the target holds anything that is not a
prefix of the source. Batches are committed with the
source's final checkpoint, which matches the target's tree only once the last batch is in: a half
copied target is refused by `serve` (the stored checkpoint does not match the stored tree), and
running migrate again resumes from the target's size. Blobs are copied (and their digests checked)
before the batch whose entries name them, as a registry writes them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from registry.blobs import BlobStore
from registry.bucket_blobs import BucketBlobStore
from registry.record import RecordError, Release, decode_entry
from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.errors import SignatureError, TlogError, UnverifiedNoteError
from tlog.hashes import leaf_hash
from tlog.integrate import TreeState, plan_batch
from tlog.merkle import tree_hash
from tlog.note import Verifier, open_note
from tlog.storage.base import LogStore
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.objects import objects_url_under
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TILE_WIDTH, TileNodeReader

BATCH = 16 * TILE_WIDTH  # entries per committed batch
Blobs = BlobStore | BucketBlobStore


@dataclass
class Report:
    size: int  # the copied tree's size
    copied: int  # entries copied by this run (0: the target already held the whole source)
    blobs: int  # blobs copied (or found intact) by this run


def _reader(store: LogStore, state: TreeState) -> TileNodeReader:
    """Nodes of the stored tree (its partial tiles from state, as Log reads them)."""

    def fetch(level: int, index: int) -> bytes:
        return state.partial_tiles[level] if state.tile_index(level) == index else store.read_tile(level, index)

    return TileNodeReader(fetch, cache_tiles=64)


def _signed(note: bytes, verifier: Verifier, whose: str) -> Checkpoint:
    """The checkpoint in note, which the log's key (verifier) must have signed. Raises TlogError."""
    try:
        text = open_note(note, [verifier])[0].text
    except (SignatureError, UnverifiedNoteError) as e:
        raise type(e)(f"{whose} checkpoint is not signed by the log's key {verifier.name}+{verifier.key_id:08x} ({e}): refusing to copy") from None
    return parse_checkpoint(text)


def _source_checkpoint(source: LogStore, verifier: Verifier) -> tuple[TreeState, Checkpoint, bytes]:
    state, note = source.load()
    if note is None:
        raise TlogError("the source log is empty (no checkpoint)")
    cp = _signed(note, verifier, "the source's")
    if (cp.size, cp.root_hash) != (state.size, state.root_hash):
        raise TlogError("the source's checkpoint does not match its own tree")
    return state, cp, note


def copy_blobs(entries: Sequence[bytes], source: Blobs, target: Blobs) -> int:
    """Copy the module and SBOM of every release among entries, each checked against its digest."""
    copied = 0
    for entry in entries:
        try:
            body = decode_entry(entry).body
        except RecordError:
            continue  # a void record names no blob
        if isinstance(body, Release):
            for digest in (body.module_sha256, body.sbom_sha256):
                if digest is not None:
                    if target.put(source.get(digest)) != digest:
                        raise TlogError(f"blob {digest} in the source does not have its digest")
                    copied += 1
    return copied


def copy_log(source: LogStore, target: LogStore, verifier: Verifier, *, before_batch: Callable[[Sequence[bytes]], int] | None = None,
             progress: Callable[[int, int], None] | None = None, batch: int = BATCH) -> Report:
    """Copy source's tree into target, resuming from target's size; every checkpoint read (the source's,
    its published one, the target's) must be signed by the log's key, verifier. See the module
    docstring. Raises TlogError."""
    source_state, cp, note = _source_checkpoint(source, verifier)
    published = source.published()
    if published is not None:
        _signed(published, verifier, "the source's published")
    state, target_note = target.load()
    if target_note is not None:
        _signed(target_note, verifier, "the target's")
    if state.size > cp.size or (state.size and tree_hash(state.size, _reader(source, source_state)) != state.root_hash):
        raise TlogError(f"the target's tree of size {state.size} is not a prefix of the source's (size {cp.size}): refusing to copy into it")
    shared = target if isinstance(target, SharedLogStore) else None
    start, blobs = state.size, 0
    while state.size < cp.size:
        first = state.size
        entries = source.read_entries(first, min(cp.size, first - first % TILE_WIDTH + batch))
        hashes = [leaf_hash(e) for e in entries]
        if before_batch is not None:
            blobs += before_batch(entries)
        if shared is not None and shared.sequence(entries, hashes) != list(range(first, first + len(entries))):
            raise TlogError(f"the target's database sequenced other entries from {first} on: refusing to copy into it")
        plan = plan_batch(state, entries, lambda _: None, dedup=False, leaf_hashes=hashes)
        if plan.state.size == cp.size and plan.state.root_hash != cp.root_hash:
            raise TlogError("the recomputed root is not the source checkpoint's: refusing to finish the copy")
        target.commit(plan, note)
        state = plan.state
        if progress is not None:
            progress(state.size, cp.size)
    if state.root_hash != cp.root_hash:
        raise TlogError("the target's root is not the source checkpoint's")
    if shared is not None:
        shared.put_checkpoint(note)  # only now: the bucket's checkpoint covers tiles that are all there
    if published is not None:
        target.publish(published)
    return Report(cp.size, cp.size - start, blobs)


def open_lmdb(directory: pathlib.Path, registry: bool) -> tuple[LMDBLogStore, BlobStore | None]:
    if not registry and (directory / "log" / "data.mdb").exists():
        raise TlogError(f"{directory} is a registry's data directory (log/ and blobs/): add --registry")
    store = LMDBLogStore(str(directory / "log" if registry else directory))
    return store, BlobStore(str(directory / "blobs")) if registry else None


def open_shared(dsn: str, objects: str, registry: bool) -> tuple[SharedLogStore, BucketBlobStore | None]:
    store = SharedLogStore(dsn, objects_url_under(objects, "log") if registry else objects, publish_integrated=False)
    return store, BucketBlobStore(objects_url_under(objects, "blobs")) if registry else None


def migrate(source: tuple[LogStore, Blobs | None], target: tuple[LogStore, Blobs | None], verifier: Verifier,
            progress: Callable[[int, int], None] | None = None) -> Report:
    """Copy the log whose key is verifier, and with registry blob stores on both sides every blob its releases name."""
    (source_log, source_blobs), (target_log, target_blobs) = source, target
    hook = None
    if source_blobs is not None and target_blobs is not None:
        hook = lambda entries: copy_blobs(entries, source_blobs, target_blobs)
    return copy_log(source_log, target_log, verifier, before_batch=hook, progress=progress)
