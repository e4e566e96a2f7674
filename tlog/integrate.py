"""Pure batch integration: what appending a batch changes, computed without I/O.

A store applies a BatchPlan inside one transaction; see storage/base.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .compact import CompactRange
from .hashes import HASH_SIZE, leaf_hash
from .merkle import range_nodes
from .tiles import TILE_HEIGHT, TileBuilder, TileNodeReader, partial_width, tile_summary


@dataclass(frozen=True)
class TreeState:
    """What the appender needs to extend the tree: the compact range and the partial tiles."""

    size: int
    compact_hashes: tuple[bytes, ...] = ()
    partial_tiles: Mapping[int, bytes] = field(default_factory=dict)

    @property
    def root_hash(self) -> bytes:
        return CompactRange(self.size, self.compact_hashes).root()

    def tile_index(self, level: int) -> int | None:
        """Index of the partial tile at level, or None if that level has no partial tile."""
        if not partial_width(self.size, level):
            return None
        return self.size >> (TILE_HEIGHT * (level + 1))


def state_from_tiles(size: int, fetch: Callable[[int, int], bytes]) -> TreeState:
    """Rebuild the appender state of a stored tree from its tiles (used at start-up)."""
    if size == 0:
        return TreeState(0)
    reader = TileNodeReader(fetch, cache_tiles=64)
    compact = tuple(reader.read_nodes(range_nodes(0, size)))
    partial: dict[int, bytes] = {}
    level = 0
    while size >> (TILE_HEIGHT * level):
        width = partial_width(size, level)
        if width:
            tile = fetch(level, size >> (TILE_HEIGHT * (level + 1)))
            partial[level] = tile[: width * HASH_SIZE]
        level += 1
    return TreeState(size, compact, partial)


@dataclass(frozen=True)
class BatchPlan:
    """The result of appending a batch to a tree.

    indexes[i] is the log index of the i-th submitted entry (a duplicate gets
    its earlier index); new_entries are the entries actually appended, in order,
    from old_size; tiles are the full contents of every hash tile that changed.
    """

    old_size: int
    indexes: tuple[int, ...]
    new_entries: tuple[bytes, ...]
    new_leaf_hashes: tuple[bytes, ...]
    tiles: Mapping[tuple[int, int], bytes]
    state: TreeState
    summaries: Mapping[tuple[int, int], bytes] = field(default_factory=dict)  # tile_summary of each changed tile


def plan_batch(
    state: TreeState, entries: Sequence[bytes], lookup: Callable[[bytes], int | None], *, dedup: bool = True,
    leaf_hashes: Sequence[bytes] | None = None,
) -> BatchPlan:
    """Append entries that are not already logged; lookup(leaf hash) returns an earlier index or None.

    dedup=False appends every entry as given (a mirror copying another log, duplicates included).
    leaf_hashes, if the caller has them, are the entries' leaf hashes (not computed again).
    """
    compact = CompactRange(state.size, state.compact_hashes)
    builder = TileBuilder(state.partial_tiles)
    seen: dict[bytes, int] = {}
    indexes: list[int] = []
    new_entries: list[bytes] = []
    new_hashes: list[bytes] = []
    hashes = leaf_hashes if leaf_hashes is not None else [leaf_hash(e) for e in entries]
    for entry, h in zip(entries, hashes, strict=True):
        index = seen.get(h) if dedup else None
        if index is None and dedup:
            index = lookup(h)
        if index is None:
            index = compact.size
            compact.append(h, builder.add_node)
            new_entries.append(entry)
            new_hashes.append(h)
        seen[h] = index
        indexes.append(index)
    new_state = TreeState(compact.size, compact.hashes, builder.partial_tiles(compact.size))
    tiles = {k: bytes(v) for k, v in builder.changed.items()}
    summaries = {k: tile_summary(v) for k, v in tiles.items()}
    return BatchPlan(state.size, tuple(indexes), tuple(new_entries), tuple(new_hashes), tiles, new_state, summaries)


def extend_plan(plan: BatchPlan, entries: Sequence[bytes]) -> BatchPlan:
    """plan followed by entries, appended as given (no dedup), as one plan: one commit for both."""
    more = plan_batch(plan.state, entries, lambda _: None, dedup=False)
    return BatchPlan(plan.old_size, plan.indexes, plan.new_entries + more.new_entries, plan.new_leaf_hashes + more.new_leaf_hashes,
                     {**plan.tiles, **more.tiles}, more.state, {**plan.summaries, **more.summaries})
