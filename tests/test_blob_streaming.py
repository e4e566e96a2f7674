"""Blobs are read in pieces (registry/blobs.BlobReader) from both stores: a large blob is served whole and
right, a reader never holds it whole, and a blob stored with other bytes is never handed out whole."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tracemalloc

import aiohttp
import pytest
from aiohttp import web
from helpers import wait_until
from registry_helpers import with_custom_section
from test_shared_registry import EMPTY_MODULE, _published, nodes  # noqa: F401 - the fixture of registry nodes on one database and bucket

from registry.blobs import BlobStore
from registry.bucket_blobs import BucketBlobStore
from registry.record import PackageRef
from tlog.errors import NotFoundError, TlogError
from tlog.httplimits import FILE_CHUNK, send_file
from tlog.note import Ed25519Signer

LARGE = 12 << 20  # far over one FILE_CHUNK, well under MAX_MODULE_BYTES


@pytest.fixture
def bucket_blobs(seaweed, s3_path, monkeypatch):  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    blobs = BucketBlobStore(f"s3://{s3_path}/blobs")
    yield blobs
    blobs.close()


def _read_all(reader, n: int) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """Everything reader gives, n bytes asked at a time, and the largest piece it gave."""
    pieces = []
    while piece := reader.read(n):
        pieces.append(piece)
    return b"".join(pieces), max(map(len, pieces), default=0)


async def test_a_large_release_is_served_whole_by_every_node_from_the_bucket(nodes) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    (first, _), (second, _) = await nodes(), await nodes()
    alice = Ed25519Signer.generate("alice")
    module = with_custom_section(EMPTY_MODULE, LARGE, random=True)
    ref = PackageRef("acme", "big", "1.0.0")
    await first.publish(alice, ref, module)
    path = second.package_path(ref)
    await wait_until(lambda: _published(second, path), "the release visible through the second node")
    for api in (first, second):
        served = await api.get(path + "/module.wasm")
        assert len(served) == len(module) and hashlib.sha256(served).digest() == hashlib.sha256(module).digest()


def test_a_bucket_blob_is_read_in_pieces_without_holding_it_whole(bucket_blobs) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(LARGE)
    digest = bucket_blobs.put(data)
    tracemalloc.start()
    try:
        with bucket_blobs.open(digest) as reader:
            assert reader.size == LARGE
            h, total, largest = hashlib.sha256(), 0, 0
            while piece := reader.read(FILE_CHUNK):
                h.update(piece)
                total += len(piece)
                largest = max(largest, len(piece))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == LARGE and h.hexdigest() == digest
    assert largest <= FILE_CHUNK
    assert peak < LARGE // 4, f"reading a {LARGE}-byte blob took {peak} bytes at the peak"  # a few pieces, not the blob


@pytest.mark.parametrize("stored", ["other bytes of the same length", "a prefix", "a longer body"])
def test_a_bucket_blob_with_other_bytes_is_never_handed_out_whole(bucket_blobs, stored: str) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3 * FILE_CHUNK + 5)
    digest = hashlib.sha256(data).hexdigest()
    body = {"other bytes of the same length": data[:-1] + bytes([data[-1] ^ 1]), "a prefix": data[:-7], "a longer body": data + b"x"}[stored]
    bucket_blobs.objects.put(f"sha256/{digest}", body, immutable=True, remember=False)  # as a bucket gone wrong would hold it
    got = b""
    with pytest.raises(TlogError, match="other bytes"), bucket_blobs.open(digest) as reader:
        while piece := reader.read(FILE_CHUNK):
            got += piece
    assert len(got) < len(data)  # the last piece is withheld


def test_a_missing_bucket_blob_is_not_found(bucket_blobs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFoundError):
        bucket_blobs.open("0" * 64)


def test_a_file_blob_is_read_in_pieces_of_its_size(tmp_path: pathlib.Path) -> None:
    blobs = BlobStore(str(tmp_path))
    data = os.urandom(2 * FILE_CHUNK + 1)
    digest = blobs.put(data)
    with blobs.open(digest) as reader:
        assert reader.size == len(data)
        assert _read_all(reader, FILE_CHUNK) == (data, FILE_CHUNK)
    with pytest.raises(NotFoundError):
        blobs.open("0" * 64)


async def test_a_body_that_fails_after_its_head_cuts_the_connection(bucket_blobs, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """The client sees a short body and an error, never a complete response with the wrong bytes."""
    data = os.urandom(3 * FILE_CHUNK)
    digest = hashlib.sha256(data).hexdigest()
    bucket_blobs.objects.put(f"sha256/{digest}", data[:-1] + b"\x00", immutable=True, remember=False)

    async def serve(request: web.Request) -> web.StreamResponse:
        return await send_file(request, bucket_blobs.open(digest), {"Content-Type": "application/octet-stream"})

    app = web.Application()
    app.router.add_get("/blob", serve)
    client = await aiohttp_client(app)
    async with client.get("/blob") as r:
        assert r.status == 200 and r.content_length == len(data)
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
