"""Read a tlog-tiles log from its tiles and bundles, recomputing every hash as it goes.

The Follower keeps a compact range over the entries it has checked: each entry
bundle must hash to its level-0 tile, every tile the range completes must match
the log's tile at the level above, and the root must match the signed checkpoint.
Its state (size, compact range) can be saved and resumed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.client import TileClient
from tlog.compact import CompactRange
from tlog.errors import MalformedError, TlogError
from tlog.hashes import HASH_SIZE, leaf_hash
from tlog.note import Verifier, b64decode_strict, b64encode, open_note
from tlog.tiles import ENTRIES, TILE_HEIGHT, TILE_WIDTH, TileID, split_hashes


@dataclass
class Finding:
    kind: str  # tile-mismatch, root-mismatch, fetch-failed, checkpoint-signature, void-record, blob-mismatch, ...
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
        """Yield (index, entry) from the state's size up to cp.size, each checked against the tiles."""
        if cp.size < self.state.size:
            self.findings.append(Finding("rollback", f"checkpoint size {cp.size} is below the audited size {self.state.size}", "checkpoint"))
            return
        compact = CompactRange(self.state.size, self.state.compact)
        # tiles above level 0 that our range filled: (level, tile) -> (first position, hashes from there)
        completed: dict[tuple[int, int], tuple[int, bytearray]] = {}

        def on_node(height: int, index: int, h: bytes) -> None:
            if height % TILE_HEIGHT or height == 0:
                return
            tile_index, position = divmod(index, TILE_WIDTH)
            completed.setdefault((height // TILE_HEIGHT, tile_index), (position, bytearray()))[1].extend(h)

        start = self.state.size
        while start < cp.size:
            n = start // TILE_WIDTH
            width = min(TILE_WIDTH, cp.size - n * TILE_WIDTH)
            bundle_id, tile_id = TileID(ENTRIES, n, width), TileID(0, n, width)
            try:
                bundle = await self.tiles.entries(bundle_id)
                tile = split_hashes(await self.tiles.tile(tile_id))
            except TlogError as e:
                self.findings.append(Finding("fetch-failed", str(e), tile_id.path()))
                return
            hashes = [leaf_hash(e) for e in bundle]
            for i, (got, want) in enumerate(zip(hashes, tile, strict=True)):
                if got != want:
                    self.findings.append(Finding("tile-mismatch", f"hash {i} is not the hash of entry {n * TILE_WIDTH + i}", tile_id.path()))
                    break
            for i in range(start - n * TILE_WIDTH, width):
                compact.append(hashes[i], on_node)
                yield n * TILE_WIDTH + i, bundle[i]
            start = n * TILE_WIDTH + width
            if progress is not None:
                progress(start, cp.size)
            await self._check_upper(completed)
        if compact.root() != cp.root_hash:
            self.findings.append(Finding("root-mismatch", f"the entries hash to a different root than the checkpoint of size {cp.size}", "checkpoint"))
            return
        self.state = FollowState(cp.size, compact.hashes, self.state.checkpoint)

    async def _check_upper(self, completed: dict[tuple[int, int], tuple[int, bytearray]]) -> None:
        """Compare the upper-level hashes our range computed with the log's tiles, tile by tile."""
        for (level, index), (first, mine) in list(completed.items()):
            tile = TileID(level, index, first + len(mine) // HASH_SIZE)
            try:
                theirs = await self.tiles.tile(tile)
            except TlogError as e:
                self.findings.append(Finding("fetch-failed", str(e), tile.path()))
                continue
            if bytes(mine) != theirs[first * HASH_SIZE :]:
                self.findings.append(Finding("tile-mismatch", "hashes differ from the ones the entries give", tile.path()))
            if tile.is_full:
                del completed[(level, index)]  # a full tile is final; a partial one grows and is checked again
