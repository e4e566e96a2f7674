"""tlog/storage/bucket_http.py against a real S3 server (SeaweedFS): what it writes is what boto3 reads back."""

from __future__ import annotations

import hashlib

import pytest

from tlog.errors import MalformedError, NotFoundError, StorageUnavailableError
from tlog.storage.bucket_http import AsyncBucket
from tlog.storage.objects import SHORT_LIVED, ObjectStore
from tlog.tiles import IMMUTABLE


@pytest.fixture
def s3_env(seaweed, monkeypatch):  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    return seaweed


async def test_an_immutable_object_is_written_once_with_its_headers(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    bucket = AsyncBucket(f"s3://{s3_path}/blobs")
    try:
        body = b"\x00asm\x01\x00\x00\x00" * 100
        path = f"sha256/{hashlib.sha256(body).hexdigest()}"
        assert await bucket.put(path, body, immutable=True)
        assert not await bucket.put(path, b"other bytes", immutable=True)  # 412: there already, never overwritten
    finally:
        await bucket.aclose()
    assert ObjectStore(f"s3://{s3_path}/blobs").get(path) == body
    bucket_name, prefix = s3_path.split("/", 1)
    head = s3_env.client().head_object(Bucket=bucket_name, Key=f"{prefix}/blobs/{path}")
    assert head["CacheControl"] == IMMUTABLE
    assert head["ContentType"] == "application/octet-stream"


async def test_a_mutable_object_is_overwritten(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    bucket = AsyncBucket(f"s3://{s3_path}")
    try:
        assert await bucket.put("checkpoint", b"one\n", immutable=False, content_type="text/plain; charset=utf-8")
        assert await bucket.put("checkpoint", b"two\n", immutable=False, content_type="text/plain; charset=utf-8")
    finally:
        await bucket.aclose()
    assert ObjectStore(f"s3://{s3_path}").get("checkpoint") == b"two\n"
    bucket_name, prefix = s3_path.split("/", 1)
    head = s3_env.client().head_object(Bucket=bucket_name, Key=f"{prefix}/checkpoint")
    assert head["CacheControl"] == SHORT_LIVED
    assert head["ContentType"] == "text/plain; charset=utf-8"


async def test_a_refused_signature_is_storage_unavailable_naming_the_status(s3_env, s3_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bucket = AsyncBucket(f"s3://{s3_path}")
    try:
        with pytest.raises(StorageUnavailableError, match="HTTP 403"):
            await bucket.put("sha256/" + "0" * 64, b"x", immutable=True)
    finally:
        await bucket.aclose()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.env["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(NotFoundError):  # nothing was written
        ObjectStore(f"s3://{s3_path}").get("sha256/" + "0" * 64)


async def test_an_unreachable_bucket_is_storage_unavailable_after_retries(s3_env, s3_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    bucket = AsyncBucket(f"s3://{s3_path}")
    try:
        with pytest.raises(StorageUnavailableError, match=r"ConnectionRefusedError|Connect call failed"):
            await bucket.put("checkpoint", b"x", immutable=False)
    finally:
        await bucket.aclose()


@pytest.mark.parametrize("path", ["test$file", "a//b", "/a", "a/", "a b", "..%2f", ""])
async def test_a_path_outside_unreserved_characters_is_refused_before_any_request(s3_env, s3_path, path: str) -> None:  # type: ignore[no-untyped-def]
    bucket = AsyncBucket(f"s3://{s3_path}")
    try:
        with pytest.raises(MalformedError):
            await bucket.put(path, b"x", immutable=True)
    finally:
        await bucket.aclose()


async def test_a_blob_store_resolves_its_endpoint_once_and_an_endpoint_of_another_prefix_is_refused(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    from registry.bucket_blobs import BucketBlobStore

    blobs = BucketBlobStore(f"s3://{s3_path}/blobs")
    try:
        assert blobs.bucket._endpoint is blobs.objects.endpoint  # one botocore resolution (~0.1 s) for both clients
        digest = await blobs.put_async(b"\x00asm\x01\x00\x00\x00")
        assert blobs.objects.get(f"sha256/{digest}") == b"\x00asm\x01\x00\x00\x00"
        with pytest.raises(ValueError, match="not s3://"):
            AsyncBucket(f"s3://{s3_path}/other", endpoint=blobs.objects.endpoint)
    finally:
        await blobs.aclose()
        blobs.close()
