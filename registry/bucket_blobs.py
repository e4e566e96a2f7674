"""Content-addressed blobs in an S3-compatible bucket: ``PREFIX/sha256/<hex>``, immutable.

The same interface as blobs.BlobStore (put, write, sync, open, get), for a registry on shared
storage, plus put_async for the event loop. An object is written with If-None-Match: *, so it is
durable and confirmed when a write returns: sync() has nothing left to do. A 412 means the blob is
there already, and its path (its SHA-256) fixes its bytes. put_async goes through
tlog/storage/bucket_http.py (no boto3 client: a publish writes a blob, and boto3 costs more CPU than
the rest of the publish); the other methods through ObjectStore and block: call them from worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
from typing import BinaryIO

from tlog.errors import MalformedError, TlogError
from tlog.storage.bucket_http import AsyncBucket
from tlog.storage.objects import ObjectStore
from tlog.syntax import lower_hex

_HEX64 = re.compile(lower_hex(64))
WRITE_CONNECTIONS = 128  # concurrent blob writes from the event loop: a PUT mostly waits for the bucket
HASH_INLINE_BYTES = 64 << 10  # larger blobs are hashed in a worker thread


class BucketBlobStore:
    """Blobs under a bucket prefix (objects_url: s3://BUCKET/PREFIX)."""

    def __init__(self, objects_url: str, objects: ObjectStore | None = None) -> None:
        self.objects = objects if objects is not None else ObjectStore(objects_url)
        self.bucket = AsyncBucket(objects_url, connections=WRITE_CONNECTIONS)

    def _path(self, digest: str) -> str:
        if not _HEX64.fullmatch(digest):
            raise MalformedError("a blob digest is 64 lowercase hex characters")
        return f"sha256/{digest}"

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

    def open(self, digest: str) -> BinaryIO:
        """The blob in an anonymous temporary file, open for reading (the caller closes it)."""
        data = self.get(digest)
        f = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
        try:
            f.write(data)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

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
