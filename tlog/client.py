"""An async client for any c2sp.org/tlog-tiles log: checkpoints, tiles, bundles, computed proofs.

It trusts nothing it fetches: callers verify checkpoints with their keys, and
proofs computed from tiles only verify if the tiles are honest.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp

from .errors import MalformedError, NotFoundError, TlogError, TooLargeError
from .hashes import HASH_SIZE
from .merkle import Node, Range, consistency_ranges, inclusion_ranges, range_nodes
from .merkle import consistency_proof as _consistency_proof
from .merkle import inclusion_proof as _inclusion_proof
from .merkle import tree_hash as _tree_hash
from .note import MAX_NOTE_BYTES
from .tiles import (
    ENTRIES,
    FULL_TILE_BYTES,
    TILE_HEIGHT,
    TileID,
    TileNodeReader,
    parse_entry_bundle,
    tile_for_size,
)

MAX_BUNDLE_BYTES = 256 * (2 + 0xFFFF)


class FetchError(TlogError):
    """A server did not serve a resource (network error or non-200)."""


UNREACHABLE = "unreachable"  # no connection, connection lost, or timed out
BAD_RESPONSE = "bad-response"  # an error status, or a body that is not what was asked for
INTERNAL = "internal"  # our own failure, not the server's


def failure_kind(e: BaseException) -> str:
    """Say what a failed exchange with a server was: UNREACHABLE, BAD_RESPONSE or INTERNAL."""
    cause = e.__cause__ if isinstance(e, FetchError) and e.__cause__ is not None else e
    if isinstance(cause, (aiohttp.ClientConnectionError, TimeoutError)):
        return UNREACHABLE
    if isinstance(cause, (aiohttp.ClientError, FetchError, MalformedError, NotFoundError, ValueError)):
        return BAD_RESPONSE
    return INTERNAL


async def read_bounded(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or at most limit + 1 bytes of it (one read may return fewer bytes than asked)."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await r.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def fetch(session: aiohttp.ClientSession, url: str, limit: int, *, what: str, headers: dict[str, str] | None = None) -> bytes:
    """GET url's body of at most limit bytes. Raises NotFoundError (404), FetchError (no answer, or
    another status than 200), TooLargeError (a longer body). what names the resource in errors."""
    try:
        async with session.get(url, headers=headers) as r:
            if r.status == 404:
                raise NotFoundError(f"{what}: not found")
            if r.status != 200:
                raise FetchError(f"{what}: HTTP {r.status}")
            body = await read_bounded(r, limit)
    except aiohttp.ClientError as e:
        raise FetchError(f"{what}: {e!r}") from e
    if len(body) > limit:
        raise TooLargeError(f"{what}: response over {limit} bytes")
    return body


class TileClient:
    """Reads a tlog-tiles log at prefix (e.g. ``http://127.0.0.1:7380``)."""

    def __init__(self, prefix: str, session: aiohttp.ClientSession) -> None:
        self.prefix = prefix.rstrip("/")
        self.session = session

    async def _get(self, path: str, limit: int) -> bytes:
        return await fetch(self.session, f"{self.prefix}/{path}", limit, what=path, headers={"Accept-Encoding": "gzip, identity"})

    async def checkpoint(self) -> bytes:
        return await self._get("checkpoint", MAX_NOTE_BYTES)

    async def _get_tile(self, tile: TileID, limit: int) -> tuple[TileID, bytes]:
        """Fetch a tile or bundle; a partial one the log no longer has is read from the full one.

        c2sp.org/tlog-tiles lets a log delete a partial tile once the full tile exists, and lets
        clients fall back to the full tile. Returns the tile actually read and its bytes.
        """
        try:
            return tile, await self._get(tile.path(), limit)
        except NotFoundError:
            if tile.is_full:
                raise
            full = TileID(tile.level, tile.index)
            try:
                return full, await self._get(full.path(), limit)
            except NotFoundError:
                raise NotFoundError(f"{tile.path()}: not found, nor {full.path()}") from None

    async def tile(self, tile: TileID) -> bytes:
        """A hash tile, checked to be exactly width hashes (the first width of the full tile if need be)."""
        read, data = await self._get_tile(tile, FULL_TILE_BYTES)
        if len(data) != read.width * HASH_SIZE:
            raise MalformedError(f"{read.path()}: {len(data)} bytes, want {read.width * HASH_SIZE}")
        return data[: tile.width * HASH_SIZE]

    async def entries(self, tile: TileID) -> list[bytes]:
        """An entry bundle's entries (the caller checks them against the level-0 tile)."""
        if tile.level != ENTRIES:
            raise ValueError("not an entry bundle")
        read, data = await self._get_tile(tile, MAX_BUNDLE_BYTES)
        return parse_entry_bundle(data, read.width)[: tile.width]

    async def reader_for(self, size: int, nodes: Iterable[Node]) -> TileNodeReader:
        """Fetch the tiles (as they exist at size) that hold nodes; return a reader over them."""
        wanted: dict[tuple[int, int], TileID] = {}
        for height, index in nodes:
            level, k = divmod(height, TILE_HEIGHT)
            tile_index = (index << k) >> TILE_HEIGHT
            wanted[(level, tile_index)] = tile_for_size(size, level, tile_index)
        fetched = {key: await self.tile(t) for key, t in wanted.items()}

        def fetch(level: int, index: int) -> bytes:
            try:
                return fetched[(level, index)]
            except KeyError:
                raise NotFoundError(f"tile {level}/{index} was not fetched") from None

        return TileNodeReader(fetch, cache_tiles=len(fetched) + 1)

    async def _reader(self, size: int, ranges: list[Range]) -> TileNodeReader:
        return await self.reader_for(size, [n for lo, hi in ranges for n in range_nodes(lo, hi)])

    async def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Compute the consistency proof old_size -> new_size from the log's tiles."""
        ranges = consistency_ranges(old_size, new_size)
        return _consistency_proof(old_size, new_size, await self._reader(new_size, ranges))

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        ranges = inclusion_ranges(index, size)
        return _inclusion_proof(index, size, await self._reader(size, ranges))

    async def tree_hash(self, size: int, at: int | None = None) -> bytes:
        """The root of the first size entries, read from the tiles as they exist at tree size at (default: size)."""
        return _tree_hash(size, await self._reader(size if at is None else at, [(0, size)] if size else []))
