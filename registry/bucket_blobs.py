"""Content-addressed blobs in an S3-compatible bucket: ``PREFIX/sha256/<hex>``, immutable.

The same interface as blobs.BlobStore (put, write, sync, open, get), for a registry on shared
storage; open() streams from the bucket, checking the digest on the way. An object is written with
If-None-Match: * (tlog/storage/objects.py), so it is durable and confirmed when write() returns:
sync() has nothing left to do. Blocking: call from worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

from tlog.errors import TlogError
from tlog.storage.objects import ObjectStore

from .blobs import BlobReader, checked_digest

WRITE_THREADS = 32  # concurrent blob writes, apart from the default executor: a PUT mostly waits for the bucket


class BucketBlobStore:
    """Blobs under a bucket prefix (objects_url: s3://BUCKET/PREFIX)."""

    def __init__(self, objects_url: str, objects: ObjectStore | None = None) -> None:
        self.objects = objects if objects is not None else ObjectStore(objects_url, connections=WRITE_THREADS + 8)
        self._writers = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="blob-put")

    def _path(self, digest: str) -> str:
        return f"sha256/{checked_digest(digest)}"

    def put(self, data: bytes) -> str:
        """Store data under its SHA-256 and return the hex digest; durable when this returns."""
        digest = hashlib.sha256(data).hexdigest()
        self.objects.put(self._path(digest), data, immutable=True, remember=False)
        return digest

    write = put  # a bucket write is durable on its own: no group sync to share

    async def put_async(self, data: bytes) -> str:
        """put() in this store's own writer threads (a blob write never waits behind the log's worker threads)."""
        return await asyncio.get_running_loop().run_in_executor(self._writers, self.put, data)

    def sync(self) -> None:
        """Nothing to do: every write() was confirmed by the bucket when it returned."""

    def open(self, digest: str) -> BlobReader:
        """The blob, read from the bucket as it is asked for (the caller closes it), checked against its
        digest on the way (see BlobReader). Raises NotFoundError, StorageUnavailableError."""
        stream, size = self.objects.open(self._path(digest))
        return BlobReader(stream, size, digest)

    def get(self, digest: str) -> bytes:
        """The blob's bytes, checked against its digest. Raises NotFoundError, StorageUnavailableError, TlogError."""
        data = self.objects.get(self._path(digest))
        if hashlib.sha256(data).hexdigest() != digest:
            raise TlogError(f"blob {digest} in the bucket does not have its digest")
        return data

    def close(self) -> None:
        self._writers.shutdown(wait=True)
        self.objects.close()
