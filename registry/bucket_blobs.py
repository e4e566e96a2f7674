"""Content-addressed blobs in an S3-compatible bucket: ``PREFIX/sha256/<hex>``, immutable.

The same interface as blobs.BlobStore (put, write, sync, open, size, get), for a registry on shared
storage, plus put_async for the event loop. An object is written with If-None-Match: *, so it is
durable and confirmed when a write returns: sync() has nothing left to do. A 412 means the blob is
there already, and its path (its SHA-256) fixes its bytes. put_async goes through
tlog/storage/bucket_http.py (no boto3 client: a publish writes a blob, and boto3 costs more CPU than
the rest of the publish); open() streams from the bucket, checking the digest on the way; size() is a HEAD request; the other
methods go through ObjectStore and block: call them from worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib

from tlog.errors import TlogError
from tlog.storage.bucket_http import AsyncBucket
from tlog.storage.objects import ObjectStore

from .blobs import BlobReader, checked_digest

WRITE_CONNECTIONS = 128  # concurrent blob writes from the event loop: a PUT mostly waits for the bucket
HASH_INLINE_BYTES = 64 << 10  # larger blobs are hashed in a worker thread


class BucketBlobStore:
    """Blobs under a bucket prefix (objects_url: s3://BUCKET/PREFIX)."""

    def __init__(self, objects_url: str, objects: ObjectStore | None = None) -> None:
        self.objects = objects if objects is not None else ObjectStore(objects_url)
        self.bucket = AsyncBucket(objects_url, connections=WRITE_CONNECTIONS, endpoint=self.objects.endpoint)

    def _path(self, digest: str) -> str:
        return f"sha256/{checked_digest(digest)}"

    def put(self, data: bytes) -> str:
        """Store data under its SHA-256 and return the hex digest; durable when this returns."""
        digest = hashlib.sha256(data).hexdigest()
        self.objects.put(self._path(digest), data, immutable=True, remember=False)
        return digest

    write = put  # a bucket write is durable on its own: no group sync to share

    async def put_async(self, data: bytes) -> str:
        """put() from the event loop (no worker thread). Raises StorageUnavailableError."""
        if len(data) > HASH_INLINE_BYTES:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        else:
            digest = hashlib.sha256(data).hexdigest()
        await self.bucket.put(self._path(digest), data, immutable=True, sha256=digest)
        return digest

    def sync(self) -> None:
        """Nothing to do: every write() was confirmed by the bucket when it returned."""

    def open(self, digest: str, *, verify: bool = True) -> BlobReader:
        """The blob, read from the bucket as it is asked for (the caller closes it), checked against its
        digest on the way (see BlobReader), whatever verify says. Raises NotFoundError, StorageUnavailableError."""
        stream, size = self.objects.open(self._path(digest))
        return BlobReader(stream, size, digest)

    def size(self, digest: str) -> int:
        """The blob's length, from a HEAD request (its bytes are not read). Raises NotFoundError, StorageUnavailableError."""
        return self.objects.size(self._path(digest))

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its digest. Raises NotFoundError, StorageUnavailableError, TlogError."""
        data = self.objects.get(self._path(digest))
        if hashlib.sha256(data).hexdigest() != digest:
            raise TlogError(f"blob {digest} in the bucket does not have its digest")
        return data

    async def aclose(self) -> None:
        """Close put_async's connections (on the loop that used them)."""
        await self.bucket.aclose()

    def close(self) -> None:
        self.objects.close()
