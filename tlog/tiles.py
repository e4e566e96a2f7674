"""c2sp.org/tlog-tiles: tile coordinates and paths, hash tiles, entry bundles.

A hash tile at level L holds up to 256 hashes of nodes at height 8*L; tile N
at level L holds the nodes with indexes [N*256, N*256 + 256). Entry bundles use
the same numbering as level 0 and are named with ``level == ENTRIES``.
"""

from __future__ import annotations

import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .errors import MalformedError, NotFoundError, TooLargeError
from .hashes import HASH_SIZE, node_hash
from .merkle import Node
from .syntax import decimal, positive_decimal

TILE_HEIGHT = 8  # c2sp.org/tlog-tiles: full tiles hold 2**8 hashes
TILE_WIDTH = 1 << TILE_HEIGHT
TILE_HEIGHT_BITS = 3  # TILE_HEIGHT == 1 << TILE_HEIGHT_BITS: level and height in a tile by shift and mask
FULL_TILE_BYTES = TILE_WIDTH * HASH_SIZE  # 8,192
MAX_LEVEL = 63  # c2sp.org/tlog-tiles: "between 0 and 63"
ENTRIES = -1  # the level we give entry bundles (tile/entries/...)
MAX_ENTRY_SIZE = 0xFFFF  # entry bundles carry a big-endian uint16 length
IMMUTABLE = "public, max-age=31536000, immutable"  # Cache-Control of full tiles: they never change once served
CHECKPOINT_CACHE = "public, max-age=2"  # c2sp.org/tlog-tiles: no caching of the checkpoint beyond a few seconds
MAX_TILE_PATH = 128  # longest canonical path is under 100 characters

_LEVEL = re.compile(decimal(2))
_WIDTH = re.compile(positive_decimal(3))
_ELEMENT = re.compile(r"[0-9]{3}")


@dataclass(frozen=True, order=True)
class TileID:
    """One tile: level (ENTRIES for an entry bundle), index, and width (256 when full)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not (ENTRIES <= self.level <= MAX_LEVEL and self.index >= 0 and 1 <= self.width <= TILE_WIDTH):
            raise ValueError(f"invalid tile {self.level}/{self.index}/{self.width}")

    @property
    def is_full(self) -> bool:
        return self.width == TILE_WIDTH

    def path(self) -> str:
        """The resource path below the log prefix, e.g. ``tile/0/x001/x234/067.p/3``."""
        level = "entries" if self.level == ENTRIES else str(self.level)
        suffix = "" if self.is_full else f".p/{self.width}"
        return f"tile/{level}/{format_index(self.index)}{suffix}"


def format_index(n: int) -> str:
    """Split n into 3-digit path elements, all but the last prefixed with x (1234067 → x001/x234/067)."""
    elements = [f"{n % 1000:03d}"]
    n //= 1000
    while n > 0:
        elements.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(elements))


def parse_tile_path(path: str) -> TileID:
    """Parse ``tile/<L>/<N>[.p/<W>]`` or ``tile/entries/<N>[.p/<W>]`` in canonical form only.

    Raises MalformedError for anything that does not re-encode to the same path.
    """
    if len(path) > MAX_TILE_PATH or not path.isascii():
        raise MalformedError("malformed tile path")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise MalformedError("malformed tile path")
    if parts[1] == "entries":
        level = ENTRIES
    elif _LEVEL.fullmatch(parts[1]) and int(parts[1]) <= MAX_LEVEL:
        level = int(parts[1])
    else:
        raise MalformedError(f"malformed tile level {parts[1]!r}")
    rest = parts[2:]
    width = TILE_WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        if not _WIDTH.fullmatch(rest[-1]) or int(rest[-1]) >= TILE_WIDTH:
            raise MalformedError(f"malformed tile width {rest[-1]!r}")
        width = int(rest[-1])
        rest = rest[:-2] + [rest[-2][:-2]]
    index = 0
    for i, element in enumerate(rest):
        last = i == len(rest) - 1
        if not last:
            if not element.startswith("x"):
                raise MalformedError("malformed tile index")
            element = element[1:]
        if not _ELEMENT.fullmatch(element):
            raise MalformedError("malformed tile index")
        index = index * 1000 + int(element)
    tile = TileID(level, index, width)
    if tile.path() != path:  # rejects leading x000 elements and other non-canonical spellings
        raise MalformedError("non-canonical tile path")
    return tile


def partial_width(size: int, level: int) -> int:
    """Width of the partial tile at level for a tree of this size (0: none). Entry bundles use level 0."""
    return (size >> (TILE_HEIGHT * max(level, 0))) % TILE_WIDTH


def tile_for_size(size: int, level: int, index: int) -> TileID:
    """The tile (level, index) as it exists for a tree of this size.

    Raises NotFoundError if the tree has no hashes in it.
    """
    stored = size >> (TILE_HEIGHT * max(level, 0))  # hashes at this level
    start = index * TILE_WIDTH
    if stored <= start:
        raise NotFoundError(f"tile {level}/{index} does not exist at size {size}")
    return TileID(level, index, min(TILE_WIDTH, stored - start))


def tiles_for_size(size: int) -> Iterator[TileID]:
    """Every hash tile of a tree of this size, by level then index (not entry bundles)."""
    level = 0
    while size >> (TILE_HEIGHT * level):
        stored = size >> (TILE_HEIGHT * level)
        for index in range((stored + TILE_WIDTH - 1) // TILE_WIDTH):
            yield TileID(level, index, min(TILE_WIDTH, stored - index * TILE_WIDTH))
        level += 1


def encode_entry_bundle(entries: Sequence[bytes]) -> bytes:
    """Concatenate entries, each behind a big-endian uint16 length."""
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_SIZE:
            raise TooLargeError(f"entry of {len(entry)} bytes is over {MAX_ENTRY_SIZE}")
        out += struct.pack(">H", len(entry))
        out += entry
    return bytes(out)


def parse_entry_bundle(data: bytes, width: int) -> list[bytes]:
    """Split an entry bundle of exactly width entries. Raises MalformedError."""
    entries: list[bytes] = []
    i = 0
    while i < len(data):
        if len(entries) == width or i + 2 > len(data):
            raise MalformedError("entry bundle has trailing data")
        (n,) = struct.unpack_from(">H", data, i)
        if i + 2 + n > len(data):
            raise MalformedError("entry bundle is truncated")
        entries.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    if len(entries) != width:
        raise MalformedError(f"entry bundle has {len(entries)} entries, want {width}")
    return entries


def split_hashes(tile: bytes) -> list[bytes]:
    """The hashes in a hash tile's bytes. Raises MalformedError."""
    if len(tile) % HASH_SIZE or not 0 < len(tile) <= FULL_TILE_BYTES:
        raise MalformedError(f"hash tile of {len(tile)} bytes")
    return [tile[i : i + HASH_SIZE] for i in range(0, len(tile), HASH_SIZE)]


def expand_tile(tile: bytes) -> list[list[bytes]]:
    """All node hashes inside a tile: [0] the tile's hashes, [k] their parents at height k above."""
    levels = [split_hashes(tile)]
    while len(levels[-1]) > 1:
        row = levels[-1]
        levels.append([node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)])
    return levels


TileFetch = Callable[[int, int], bytes]  # (level, index) -> stored hashes (a prefix of the full tile)


SUMMARY_HEIGHT = 4  # a tile summary holds the nodes 4 levels above the tile's hashes: 16 per full tile
TileSummaryFetch = Callable[[int, int], "bytes | None"]  # (level, index) -> tile_summary() bytes, or None


def tile_summary(tile: bytes) -> bytes:
    """The hashes of each complete run of 16 tile hashes (2 bytes per entry stored, 10x cheaper cold proofs)."""
    hashes = split_hashes(tile) if tile else []
    out = bytearray()
    for start in range(0, len(hashes) - len(hashes) % 16, 16):
        row = hashes[start : start + 16]
        while len(row) > 1:
            row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
        out += row[0]
    return bytes(out)


class _Expanded:
    """Every node inside a tile, computed at once."""

    def __init__(self, tile: bytes) -> None:
        self.rows = expand_tile(tile)

    def node(self, k: int, position: int) -> bytes | None:
        row = self.rows[k] if k < len(self.rows) else []
        return row[position] if position < len(row) else None


class _Summarized:
    """A tile plus its stored summary: nodes below height 4 from the hashes, above from the summary."""

    def __init__(self, tile: bytes, summary: bytes) -> None:
        self.hashes = split_hashes(tile)
        self.upper = expand_tile(summary) if summary else []
        self.computed: dict[tuple[int, int], bytes] = {}  # low nodes hashed so far: a hot tile fills up

    def node(self, k: int, position: int) -> bytes | None:
        if k == 0:
            return self.hashes[position] if position < len(self.hashes) else None
        if k >= SUMMARY_HEIGHT:
            row = self.upper[k - SUMMARY_HEIGHT] if k - SUMMARY_HEIGHT < len(self.upper) else []
            return row[position] if position < len(row) else None
        h = self.computed.get((k, position))
        if h is None:
            left, right = self.node(k - 1, 2 * position), self.node(k - 1, 2 * position + 1)
            if left is None or right is None:
                return None
            h = self.computed[(k, position)] = node_hash(left, right)
        return h


class TileNodeReader:
    """A merkle.NodeReader over hash tiles, with an LRU of expanded tiles.

    fetch(level, index) returns the stored bytes of that hash tile; a longer
    prefix than needed is fine, since a tile only ever grows. With summary
    (the stored tile_summary of a tile, or None), a cold tile costs at most
    26 hashes per proof instead of 255.
    """

    def __init__(self, fetch: TileFetch, cache_tiles: int = 4096, summary: TileSummaryFetch | None = None) -> None:
        self._fetch = fetch
        self._summary = summary
        self._cache: OrderedDict[tuple[int, int, int], _Expanded | _Summarized] = OrderedDict()
        self._cache_tiles = cache_tiles
        self._lock = threading.Lock()  # proofs are computed in worker threads

    def _tile(self, level: int, index: int) -> _Expanded | _Summarized:
        with self._lock:
            full = self._cache.get((level, index, TILE_WIDTH))  # full tiles never change: no fetch
            if full is not None:
                self._cache.move_to_end((level, index, TILE_WIDTH))
                return full
        tile = self._fetch(level, index)
        key = (level, index, len(tile) // HASH_SIZE)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        summary = self._summary(level, index) if self._summary is not None else None
        # Use a summary only if it is the one for exactly these hashes.
        if summary is not None and len(summary) == (len(tile) // HASH_SIZE // 16) * HASH_SIZE:
            view: _Expanded | _Summarized = _Summarized(tile, summary)
        else:
            view = _Expanded(tile)
        with self._lock:
            self._cache[key] = view
            if len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return view

    def read_nodes(self, nodes: Sequence[Node], /) -> list[bytes]:
        out = []
        tiles: dict[tuple[int, int], _Expanded | _Summarized] = {}  # each tile looked up once per call
        for height, index in nodes:
            level, k = height >> TILE_HEIGHT_BITS, height & (TILE_HEIGHT - 1)
            first = index << k  # index of the node's first hash at this tile level
            key = (level, first >> TILE_HEIGHT)
            view = tiles.get(key)
            if view is None:
                view = tiles[key] = self._tile(*key)
            h = view.node(k, (first & (TILE_WIDTH - 1)) >> k)
            if h is None:
                raise NotFoundError(f"node {height}/{index} is not stored")
            out.append(h)
        return out


class TileBuilder:
    """Collects the hash tiles that appends change, on top of the current partial tiles.

    Use add_node as the compact.CompactRange node sink. partial maps level to
    the bytes of that level's partial tile at the starting size.
    """

    def __init__(self, partial: Mapping[int, bytes]) -> None:
        self._partial = dict(partial)
        self.changed: dict[tuple[int, int], bytearray] = {}

    def add_node(self, height: int, index: int, h: bytes) -> None:
        if height % TILE_HEIGHT:
            return
        level = height // TILE_HEIGHT
        tile_index, offset = divmod(index, TILE_WIDTH)
        buf = self.changed.get((level, tile_index))
        if buf is None:
            buf = bytearray(self._partial.get(level, b"") if offset else b"")
            self.changed[(level, tile_index)] = buf
        if len(buf) != offset * HASH_SIZE:
            raise AssertionError("tlog: bad math in TileBuilder")
        buf += h

    def partial_tiles(self, size: int) -> dict[int, bytes]:
        """The partial tile of every level for the new size."""
        out: dict[int, bytes] = {}
        level = 0
        while size >> (TILE_HEIGHT * level):
            if partial_width(size, level):
                index = size >> (TILE_HEIGHT * (level + 1))
                buf = self.changed.get((level, index))
                out[level] = bytes(buf) if buf is not None else self._partial[level]
            level += 1
        return out
