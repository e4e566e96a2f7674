"""The frames the agent and its sandbox workers exchange over a pipe, and the engine settings both sides share.

A frame is a 4-byte big-endian header length, a JSON object, then the raw bytes of each blob the header lists
under "blobs" as [name, length] pairs, in that order. Both sides bound every length before reading it.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

MAX_HEADER = 1 << 20
MAX_BLOB = 256 << 20
MAX_BLOBS = 4
MODULE_LRU = 64  # compiled modules a worker keeps loaded; the agent mirrors the worker's LRU to know which

# Every engine a worker builds uses exactly these wasmtime.Config settings; a compiled artifact is only
# valid for the settings (and the Wasmtime version) that produced it, so both are part of its cache key.
WORKER_DATA_MB = 4096  # RLIMIT_DATA of a worker process
WORKER_OVERHEAD_MB = 512  # what a worker needs besides a module's linear memory
MAX_PROFILE_MEMORY_MB = WORKER_DATA_MB - WORKER_OVERHEAD_MB  # the largest memory_mb a profile may ask for

# Every module is compiled with its first memory also exported under this name (edge.memory_export), so that a
# run that trapped can be told to have hit its memory cap even when the module keeps its memory to itself.
MEMORY_EXPORT = "\x00wasmlog:memory"

ENGINE_SETTINGS: Mapping[str, object] = {
    "wasmlog_memory_export": MEMORY_EXPORT,  # ours, not a wasmtime.Config setting: part of what an artifact is
    "epoch_interruption": True,
    "consume_fuel": True,
    "cranelift_opt_level": "speed",
    "wasm_threads": False,
    "parallel_compilation": False,
}


class ProtocolError(Exception):
    """A frame that breaks the format or its bounds (the peer is broken or hostile)."""


def wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def engine_settings_id(version: str) -> str:
    """A short hash of the Wasmtime version and ENGINE_SETTINGS: the part of an artifact's key not its digest."""
    text = json.dumps({"wasmtime": version, "settings": dict(ENGINE_SETTINGS)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(header: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None) -> bytes:
    """One frame: header (without its "blobs" key) and the named blobs."""
    blobs = blobs or {}
    body = json.dumps({**header, "blobs": [[name, len(data)] for name, data in blobs.items()]}).encode()
    return b"".join([struct.pack(">I", len(body)), body, *blobs.values()])


def _parse_header(raw: bytes) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ProtocolError(f"frame header is not JSON: {e}") from None
    listed = header.pop("blobs", None) if isinstance(header, dict) else None
    if not isinstance(listed, list) or len(listed) > MAX_BLOBS:
        raise ProtocolError("frame header lacks a bounded blob list")
    sizes: list[tuple[str, int]] = []
    for item in listed:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or type(item[1]) is not int or not 0 <= item[1] <= MAX_BLOB):
            raise ProtocolError(f"bad blob entry in frame header: {str(item)[:80]}")
        sizes.append((item[0], item[1]))
    return header, sizes


def _header_length(prefix: bytes) -> int:
    length = int.from_bytes(prefix, "big")
    if len(prefix) != 4 or length > MAX_HEADER:
        raise ProtocolError(f"frame header of {length} bytes exceeds {MAX_HEADER}")
    return length


def read_frame(read_exactly: Callable[[int], bytes]) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """Read one frame with a blocking read_exactly(n) (which returns b"" only at a clean end of stream).
    Returns None at a clean end of stream before a frame."""
    prefix = read_exactly(4)
    if not prefix:
        return None
    header, sizes = _parse_header(read_exactly(_header_length(prefix)))
    return header, {name: read_exactly(size) for name, size in sizes}


async def read_frame_async(reader: asyncio.StreamReader) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read one frame from an asyncio stream. Raises asyncio.IncompleteReadError at the end of the stream."""
    header, sizes = _parse_header(await reader.readexactly(_header_length(await reader.readexactly(4))))
    return header, {name: await reader.readexactly(size) for name, size in sizes}
