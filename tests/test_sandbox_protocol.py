"""edge.sandbox_protocol: frames between the agent and its workers are strict and bounded; and the pure
import matcher the sandbox and admission share."""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.sandbox import imports_granted
from edge.sandbox_protocol import (
    MAX_BLOB,
    MAX_HEADER,
    ProtocolError,
    encode,
    read_frame,
    read_frame_async,
)


def reader(data: bytes):
    stream = io.BytesIO(data)

    def read_exactly(n: int) -> bytes:
        chunk = stream.read(n)
        if chunk and len(chunk) < n:
            raise EOFError("short read")
        return chunk
    return read_exactly


def raw(header: object) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
       st.dictionaries(st.text(min_size=1, max_size=8), st.binary(max_size=64), max_size=4))
def test_frames_round_trip(header: dict[str, object], blobs: dict[str, bytes]) -> None:
    header.pop("blobs", None)
    frame = encode(header, blobs)
    assert read_frame(reader(frame + encode({"next": 1}))) == (header, blobs)

    async def read_async() -> tuple[dict[str, object], dict[str, bytes]]:
        stream = asyncio.StreamReader()
        stream.feed_data(frame)
        stream.feed_eof()
        return await read_frame_async(stream)
    assert asyncio.run(read_async()) == (header, blobs)


def test_clean_end_of_stream() -> None:
    assert read_frame(reader(b"")) is None


@pytest.mark.parametrize("frame", [
    struct.pack(">I", MAX_HEADER + 1),
    raw({"op": "run"}),  # no blob list
    raw(["not", "an", "object"]),
    raw({"blobs": [["a", MAX_BLOB + 1]]}),
    raw({"blobs": [["a", -1]]}),
    raw({"blobs": [["a", 1.5]]}),
    raw({"blobs": [["a", True]]}),
    raw({"blobs": [["a", 1, 2]]}),
    raw({"blobs": [[1, 1]]}),
    raw({"blobs": [["a", 0]] * 5}),
    struct.pack(">I", 3) + b"{x}",
])
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        read_frame(reader(frame + b"\0" * 16))


# imports_granted is pure: tested here, beside the other pure parts of the sandbox, against a naive reference.
NAMES = st.sampled_from(["wasi_snapshot_preview1", "wasi", "env", "fd_write", "fd_read", "path_open", "a.b", "", "x*"])
PATTERN_PARTS = st.sampled_from(["wasi_snapshot_preview1", "wasi*", "*", "fd_*", "fd_write", "?nv", "a.b", "[ef]*", ""])


def naive_granted(imports: list[tuple[str, str]], patterns: list[str]) -> list[str]:
    """Per pattern: split on its first '.', glob module and field separately (no '.': grants no core import)."""
    def grants(pattern: str, module: str, name: str) -> bool:
        if "." not in pattern:
            return False
        pm, _, pf = pattern.partition(".")
        return fnmatch.fnmatchcase(module, pm) and fnmatch.fnmatchcase(name, pf)
    return [f"{m}.{n}" for m, n in imports if not any(grants(p, m, n) for p in patterns)]


@given(st.lists(st.tuples(NAMES, NAMES), max_size=6),
       st.lists(st.tuples(PATTERN_PARTS, st.sampled_from([".", ""]), PATTERN_PARTS).map("".join), max_size=4))
def test_imports_granted_matches_the_naive_reference(imports: list[tuple[str, str]], patterns: list[str]) -> None:
    assert imports_granted(imports, patterns) == naive_granted(imports, patterns)


def test_imports_granted_examples() -> None:
    wasi = "wasi_snapshot_preview1"
    imports = [(wasi, "fd_write"), (wasi, "sock_accept"), ("env", "f")]
    assert imports_granted(imports, [f"{wasi}.fd_write"]) == [f"{wasi}.sock_accept", "env.f"]
    assert imports_granted(imports, [f"{wasi}.*"]) == ["env.f"]
    assert imports_granted(imports, ["*.*"]) == []
    assert imports_granted(imports, ["*"]) == [f"{wasi}.fd_write", f"{wasi}.sock_accept", "env.f"]  # no '.': no core import
    assert imports_granted(imports, ["wasi_snapshot_preview1.fd*", "env.f"]) == [f"{wasi}.sock_accept"]
    assert imports_granted([("wasi.x", "y")], ["wasi.x.y"]) == ["wasi.x.y"]  # split on the pattern's first '.'
    assert imports_granted([], []) == []
