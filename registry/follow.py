"""Read a tlog-tiles log from its tiles and bundles, recomputing every hash as it goes.

The Follower reads only the tiles that exist for the checkpoint it audits (c2sp.org/tlog-tiles):
full tiles, and at each level the one partial tile of that checkpoint's width. It builds the tree
twice from the audited size on, once from the entry bundles and once from the log's level-0 tiles,
and compares every upper-level tile with both; the signed root then says which side is wrong, so
a finding names the resource that lies. Hashes below the audited size (the start of the tiles a
resumed audit continues) are checked against the saved compact range. Its state (size, compact
range) can be saved and resumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.client import TileClient
from tlog.compact import CompactRange, NodeSink
from tlog.errors import MalformedError, TlogError
from tlog.hashes import leaf_hash
from tlog.merkle import range_nodes
from tlog.note import Verifier, b64decode_strict, b64encode, open_note
from tlog.tiles import (
    ENTRIES,
    TILE_HEIGHT,
    TILE_WIDTH,
    TileID,
    expand_tile,
    partial_width,
    split_hashes,
)

T = TypeVar("T")


@dataclass
class Finding:
    # tile-mismatch, bundle-mismatch, malformed-tile, root-mismatch, fetch-failed, rollback, checkpoint-signature,
    # void-record, blob-mismatch, blob-unavailable, index-root-mismatch
    kind: str
    message: str
    where: str = ""

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "message": self.message}


@dataclass
class FollowState:
    """How far a follower got: tree size, compact range, and the checkpoint it last verified."""

    size: int = 0
    compact: tuple[bytes, ...] = ()
    checkpoint: str = ""

    def as_json(self) -> dict[str, Any]:
        """The state as JSON values (registry/audit_state.py stores it)."""
        return {"size": self.size, "compact": [b64encode(h) for h in self.compact], "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, obj: object) -> FollowState:
        """Parse as_json's output. Raises MalformedError."""
        if type(obj) is not dict or obj.keys() != {"size", "compact", "checkpoint"} or type(obj["size"]) is not int \
                or obj["size"] < 0 or type(obj["checkpoint"]) is not str or type(obj["compact"]) is not list \
                or not all(type(h) is str for h in obj["compact"]):
            raise MalformedError("a follow state is {size: int >= 0, compact: [base64 hash, ...], checkpoint: str}")
        return cls(obj["size"], tuple(b64decode_strict(h) for h in obj["compact"]), obj["checkpoint"])


def subtree_hash(hashes: Sequence[bytes]) -> bytes:
    """MTH of a perfect subtree given the 2**k hashes at its bottom."""
    return expand_tile(b"".join(hashes))[-1][0]


@dataclass
class _Run:
    """The hashes one upper level gets in this audit, for the one tile they are filling.

    by_entries come from the entry bundles, by_tiles from the log's level-0 tiles; both start at
    position first of the tile (the positions before it are below the audited size).
    """

    tile: int
    first: int
    by_entries: list[bytes] = field(default_factory=list)
    by_tiles: list[bytes] = field(default_factory=list)


@dataclass
class _Disagreement:
    """A tile position whose hash is not the one the entries give, or not the one the level-0 tiles give."""

    tile: TileID
    vs_entries: list[int]
    vs_tiles: list[int]
    bundle: TileID | None = None  # for level 0: the bundle whose entries vs_entries names


@dataclass
class Follower:
    tiles: TileClient
    verifiers: list[Verifier]
    state: FollowState = field(default_factory=FollowState)
    findings: list[Finding] = field(default_factory=list)

    async def latest(self) -> tuple[Checkpoint, bytes] | None:
        """Fetch and verify the latest checkpoint; None (and a finding) if it does not verify."""
        try:
            note = await self.tiles.checkpoint()
            opened, _ = open_note(note, self.verifiers)
            return parse_checkpoint(opened.text), note
        except TlogError as e:
            self.findings.append(Finding("checkpoint-signature", str(e), "checkpoint"))
            return None

    async def entries(self, cp: Checkpoint, progress: Callable[[int, int], None] | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (index, entry) from the state's size up to cp.size, each checked against the tiles.

        Fetches only tiles that exist at cp.size. The state advances to cp only if every tile
        could be read and the entries give cp's root; every disagreement is a finding.
        """
        if cp.size < self.state.size:
            self.findings.append(Finding("rollback", f"checkpoint size {cp.size} is below the audited size {self.state.size}", "checkpoint"))
            return
        audit = _Audit(cp, self.state.size, self.state.compact, self.findings)
        start = self.state.size
        while start < cp.size:
            n = start // TILE_WIDTH
            width = min(TILE_WIDTH, cp.size - n * TILE_WIDTH)
            bundle_id, tile_id = TileID(ENTRIES, n, width), TileID(0, n, width)
            bundle, tile = await asyncio.gather(self._fetch(bundle_id, self.tiles.entries(bundle_id)), self._fetch(tile_id, self.tiles.tile(tile_id)))
            if bundle is None or tile is None:
                audit.finish(read_all=False)
                return
            offset = start - n * TILE_WIDTH
            for i, entry in audit.level0(bundle_id, tile_id, bundle, split_hashes(tile), offset):
                yield n * TILE_WIDTH + i, entry
            start = n * TILE_WIDTH + width
            if progress is not None:
                progress(start, cp.size)
            for level, run in audit.full_runs():
                await self._check_run(audit, level, run, TILE_WIDTH)
        for level, run in audit.partial_runs():
            await self._check_run(audit, level, run, partial_width(cp.size, level))
        if audit.finish(read_all=True):
            self.state = FollowState(cp.size, audit.by_entries.hashes, self.state.checkpoint)

    async def _fetch(self, tile: TileID, fetch: Awaitable[T]) -> T | None:
        """Await one tile or bundle; None (and a finding naming it) if the log does not serve it well-formed."""
        try:
            return await fetch
        except MalformedError as e:
            self.findings.append(Finding("malformed-tile", str(e), tile.path()))
        except TlogError as e:
            self.findings.append(Finding("fetch-failed", str(e), tile.path()))
        return None

    async def _check_run(self, audit: _Audit, level: int, run: _Run, width: int) -> None:
        tile_id = TileID(level, run.tile, width)
        data = await self._fetch(tile_id, self.tiles.tile(tile_id))
        if data is None:
            audit.incomplete = True
            return
        audit.compare_upper(tile_id, run, split_hashes(data))


class _Audit:
    """The pure bookkeeping of one Follower.entries call: two trees, the open runs, the disagreements."""

    def __init__(self, cp: Checkpoint, start: int, compact: Sequence[bytes], findings: list[Finding]) -> None:
        self.size, self.root = cp.size, cp.root_hash
        self.start = start
        self.start_nodes = dict(zip(range_nodes(0, start), compact, strict=True)) if start else {}
        self.by_entries = CompactRange(start, compact)
        self.by_tiles = CompactRange(start, compact)
        self.runs: dict[int, _Run] = {}
        self.disagreements: list[_Disagreement] = []
        self.findings = findings
        self.incomplete = False
        self._entries_sink = self._sink(lambda run: run.by_entries)
        self._tiles_sink = self._sink(lambda run: run.by_tiles)

    def _sink(self, column: Callable[[_Run], list[bytes]]) -> NodeSink:
        def on_node(height: int, index: int, h: bytes) -> None:
            if height == 0 or height % TILE_HEIGHT:
                return
            level = height // TILE_HEIGHT
            tile, position = divmod(index, TILE_WIDTH)
            run = self.runs.get(level)
            if run is None:
                run = self.runs[level] = _Run(tile, position)
            assert run.tile == tile, "a full run is checked before the next tile starts"
            column(run).append(h)

        return on_node

    def below_start_ok(self, level: int, hashes: Sequence[bytes]) -> bool:
        """Whether a tile's hashes below the audited size fold into the audited compact range."""
        base = (self.start >> (TILE_HEIGHT * level)) & ~(TILE_WIDTH - 1)
        for (height, index), h in self.start_nodes.items():
            k = height - TILE_HEIGHT * level
            if 0 <= k < TILE_HEIGHT:
                first = (index << k) - base
                if subtree_hash(hashes[first : first + (1 << k)]) != h:
                    return False
        return True

    def level0(self, bundle_id: TileID, tile_id: TileID, bundle: list[bytes], tile: list[bytes], offset: int) -> list[tuple[int, bytes]]:
        """Add a bundle's entries from offset on to both trees; return (position, entry) for each."""
        hashes = [leaf_hash(e) for e in bundle]
        if offset:
            if not self.below_start_ok(0, hashes[:offset]):
                self.findings.append(Finding("bundle-mismatch", f"entries before {self.start} are not the ones audited", bundle_id.path()))
            if not self.below_start_ok(0, tile[:offset]):
                self.findings.append(Finding("tile-mismatch", f"hashes before {self.start} are not the ones audited", tile_id.path()))
        differ = []
        for i in range(offset, len(bundle)):
            self.by_entries.append(hashes[i], self._entries_sink)
            self.by_tiles.append(tile[i], self._tiles_sink)
            if hashes[i] != tile[i]:
                differ.append(i)
        if differ:
            self.disagreements.append(_Disagreement(tile_id, differ, [], bundle_id))
        return [(i, bundle[i]) for i in range(offset, len(bundle))]

    def full_runs(self) -> list[tuple[int, _Run]]:
        """Remove and return the runs whose tile is now full."""
        full = [(level, run) for level, run in self.runs.items() if run.first + len(run.by_entries) == TILE_WIDTH]
        for level, _ in full:
            del self.runs[level]
        return full

    def partial_runs(self) -> list[tuple[int, _Run]]:
        """The runs left at the end: each fills exactly the partial tile of its level at the audited size."""
        for level, run in self.runs.items():
            assert run.first + len(run.by_entries) == partial_width(self.size, level), "tile math"
        runs, self.runs = list(self.runs.items()), {}
        return runs

    def compare_upper(self, tile_id: TileID, run: _Run, theirs: list[bytes]) -> None:
        if run.first and not self.below_start_ok(tile_id.level, theirs[: run.first]):
            self.findings.append(Finding("tile-mismatch", f"hashes before {self.start} are not the ones audited", tile_id.path()))
        mine = range(run.first, tile_id.width)
        vs_entries = [p for p in mine if theirs[p] != run.by_entries[p - run.first]]
        vs_tiles = [p for p in mine if theirs[p] != run.by_tiles[p - run.first]]
        if vs_entries or vs_tiles:
            self.disagreements.append(_Disagreement(tile_id, vs_entries, vs_tiles))

    def finish(self, *, read_all: bool) -> bool:
        """Turn the disagreements into findings, judged by the signed root.

        True if every tile was read and the entries give the checkpoint's root.
        """
        entries_ok = read_all and self.by_entries.root() == self.root
        tiles_ok = read_all and self.by_tiles.root() == self.root
        undecided = "the signed root does not say which is wrong" if read_all else "the audit stopped before the root"
        for d in self.disagreements:
            self._report(d, entries_ok, tiles_ok, undecided)
        if read_all and not entries_ok:
            self.findings.append(Finding("root-mismatch", f"the entries hash to a different root than the checkpoint of size {self.size}",
                                         "checkpoint"))
        return entries_ok and not self.incomplete

    def _report(self, d: _Disagreement, entries_ok: bool, tiles_ok: bool, undecided: str) -> None:
        """One finding for d, naming the resource the root shows to be wrong (both, when it cannot tell)."""
        if d.bundle is not None:  # a bundle and its level-0 tile: vs_entries lists the positions
            p = d.vs_entries[0]
            index = d.tile.index * TILE_WIDTH + p
            more = f" ({len(d.vs_entries) - 1} more)" if len(d.vs_entries) > 1 else ""
            mismatch = f"entry {index} does not hash to hash {p} of {d.tile.path()}{more}"
            if entries_ok:
                self.findings.append(Finding("tile-mismatch", f"hash {p} is not the hash of entry {index}{more}", d.tile.path()))
            elif tiles_ok:
                self.findings.append(Finding("bundle-mismatch", f"{mismatch}; the tiles give the signed root, the entries do not", d.bundle.path()))
            else:
                self.findings.append(Finding("bundle-mismatch", f"{mismatch}; {undecided}", f"{d.bundle.path()} {d.tile.path()}"))
            return
        if entries_ok:
            wrong, source = d.vs_entries, "the entries give"
        elif tiles_ok:
            wrong, source = d.vs_tiles, "the level-0 tiles give"
        else:  # no side gives the root: blame this tile only where it agrees with neither
            wrong, source = [p for p in d.vs_entries if p in d.vs_tiles], "the entries or the level-0 tiles give"
        if wrong:
            more = f" ({len(wrong) - 1} more)" if len(wrong) > 1 else ""
            self.findings.append(Finding("tile-mismatch", f"hash {wrong[0]}{more} is not the hash {source}", d.tile.path()))
