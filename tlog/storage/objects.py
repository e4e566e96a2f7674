"""The log's objects in an S3-compatible bucket, in the c2sp.org/tlog-tiles layout under a prefix.

    PREFIX/checkpoint                       short-lived (Cache-Control: CHECKPOINT_CACHE)
    PREFIX/tile/<L>/<N>[.p/<W>]             hash tiles
    PREFIX/tile/entries/<N>[.p/<W>]         entry bundles (uncompressed)

Full tiles and bundles are immutable: written with If-None-Match: * (a 412 means it is there;
its bytes are then compared, and a difference is a fork, refused). Partial ones are short-lived and
overwritten (their content is fixed by their path once entries are sequenced, so rewriting is safe).
The checkpoint is replaced by compare-and-swap (put_unless, If-Match), so that it never goes back.
The client is storage/s3_sync.py (http.client, kept-alive connections, requests signed as
storage/s3_endpoint.py resolves the endpoint and credentials the standard way: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, or any other source botocore reads).
Blocking: call from worker threads.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import MalformedError, NotFoundError, StorageUnavailableError, TlogError
from ..tiles import CHECKPOINT_CACHE, IMMUTABLE, TileID
from .s3_endpoint import S3Endpoint
from .s3_sync import Answer, ObjectStream, SyncBucket

SHORT_LIVED = "public, max-age=60"  # partial tiles and bundles: superseded as the tree grows
PUT_THREADS = 8
TIMEOUT = 10.0  # seconds (botocore's default, 60, with 3 attempts, left a bucket that went silent hanging every request for minutes)
SWAP_ATTEMPTS = 16  # put_unless: conditional writes before giving up on a path others keep writing
CACHE_BYTES = 64 << 20  # immutable objects kept in memory, least recently used first out (a full tile is 8 KiB)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules (dots and hyphens inside)
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_PREFIX = 512


def parse_objects_url(url: str) -> tuple[str, str]:
    """Split s3://BUCKET[/PREFIX] into (bucket, prefix). PREFIX is slash-separated segments of letters,
    digits, '.', '_' and '-' (no empty, '.' or '..' segment). Raises MalformedError."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    segments = prefix.split("/") if prefix else []
    if (
        scheme != "s3" or not _BUCKET.fullmatch(bucket) or len(prefix) > MAX_PREFIX
        or not all(_PREFIX_SEGMENT.fullmatch(p) and p not in (".", "..") for p in segments)
    ):
        shown = re.sub(r"^([^/]*//)[^/]*@", r"\1***@", url[:100])  # credentials, if someone wrote them in, are not echoed
        raise MalformedError(f"objects URL {shown!r}: want s3://BUCKET[/PREFIX] (credentials come from AWS_* variables)")
    return bucket, prefix


def objects_url_under(url: str, part: str) -> str:
    """The objects URL of part under url's prefix: s3://BUCKET/PREFIX/part. Raises MalformedError."""
    bucket, prefix = parse_objects_url(url)
    return f"s3://{bucket}/{prefix}/{part}" if prefix else f"s3://{bucket}/{part}"


class ObjectStore:
    """A bucket and prefix holding one log's tlog-tiles objects."""

    def __init__(self, url: str, *, connections: int = PUT_THREADS * 2, timeout: float = TIMEOUT, endpoint_url: str | None = None) -> None:
        """connections: idle connections kept (at least as many as threads that call this store at once);
        timeout: seconds to connect, and between bytes read, before a request is failed (or retried);
        endpoint_url: the bucket's endpoint, instead of the one botocore resolves (AWS_ENDPOINT_URL, ...)."""
        self.bucket, self.prefix = parse_objects_url(url)
        self.endpoint = S3Endpoint(self.bucket, self.prefix, endpoint_url=endpoint_url)  # resolved once: AsyncBucket may share it
        self._s3 = SyncBucket(self.endpoint, connections=connections, timeout=timeout)
        self._pool = ThreadPoolExecutor(PUT_THREADS, thread_name_prefix="s3-put")
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._swapped: dict[str, tuple[str, bytes]] = {}  # put_unless: path -> (ETag, bytes) of our last write

    def _call(self, what: str, method: str, path: str, expect: int, *, body: bytes = b"", headers: dict[str, str] | None = None,
              stream: bool = False) -> Answer | None:
        """The bucket's 2xx answer, or None for the expected failure status (404 or 412). Raises StorageUnavailableError."""
        answer = self._s3.request(method, path, body=body, headers=headers, stream=stream)
        if 200 <= answer.status < 300:
            return answer
        if answer.status == expect and answer.code != "NoSuchBucket":  # a missing bucket is missing storage, not a missing object
            return None
        raise StorageUnavailableError(f"{what}: {answer.describe()}")

    def get(self, path: str, *, immutable: bool = False) -> bytes:
        """The object's bytes (kept in memory if immutable). Raises NotFoundError or StorageUnavailableError."""
        with self._cache_lock:
            cached = self._cache.get(path)
            if cached is not None:
                self._cache.move_to_end(path)
                return cached
        answer = self._call(f"reading {path}", "GET", path, 404)
        if answer is None:
            raise NotFoundError(f"{path} is not in the bucket")
        body = answer.body
        if immutable:
            self.remember(path, body)
        return body

    def open(self, path: str) -> tuple[ObjectStream, int]:
        """The object's body to read in pieces, and its length (the caller closes the stream; blocking:
        read it from a worker thread). Raises NotFoundError or StorageUnavailableError."""
        answer = self._call(f"reading {path}", "GET", path, 404, stream=True)
        if answer is None:
            raise NotFoundError(f"{path} is not in the bucket")
        assert answer.stream is not None
        try:
            return answer.stream, _content_length(answer, f"reading {path}")
        except StorageUnavailableError:
            answer.stream.close()
            raise

    def size(self, path: str) -> int:
        """The object's length, from a HEAD request (its bytes are not read). Raises NotFoundError or
        StorageUnavailableError (a HEAD answer has no body: a missing bucket is a 404 like a missing object)."""
        answer = self._call(f"reading {path}", "HEAD", path, 404)
        if answer is None:
            raise NotFoundError(f"{path} is not in the bucket")
        return _content_length(answer, f"reading {path}")

    def remember(self, path: str, body: bytes) -> None:
        """Keep an object's bytes in memory (for an object whose path fixes its content: not the checkpoint)."""
        with self._cache_lock:
            if path in self._cache:
                return
            self._cache[path] = body
            self._cached_bytes += len(body)
            while self._cached_bytes > CACHE_BYTES:
                self._cached_bytes -= len(self._cache.popitem(last=False)[1])

    def _put(self, path: str, body: bytes, *, immutable: bool, condition: dict[str, str]) -> Answer | None:
        """PUT with the object's cache headers and condition; None if the condition failed (412)."""
        cache = IMMUTABLE if immutable else (CHECKPOINT_CACHE if path == "checkpoint" else SHORT_LIVED)
        content_type = "text/plain; charset=utf-8" if path == "checkpoint" else "application/octet-stream"
        return self._call(f"writing {path}", "PUT", path, 412, body=body, headers={"Cache-Control": cache, "Content-Type": content_type, **condition})

    def put(self, path: str, body: bytes, *, immutable: bool, remember: bool = True) -> None:
        """Write one object (see the module docstring); an immutable one is kept in memory unless remember is False.
        Raises StorageUnavailableError, or TlogError for a fork."""
        written = self._put(path, body, immutable=immutable, condition={"If-None-Match": "*"} if immutable else {})
        if written is None and self.get(path) != body:  # 412: it is there already
            raise TlogError(f"{path} is already in the bucket with other bytes: refusing to fork")
        if immutable and remember:
            self.remember(path, body)

    def put_unless(self, path: str, body: bytes, keep: Callable[[bytes], bool]) -> bool:
        """Overwrite a short-lived object with body unless keep(the bytes there now) says to keep them, as a
        compare-and-swap (If-Match on the ETag read, If-None-Match: * if there is none): a write by another
        process in between is read and judged again. True if body was written. Raises StorageUnavailableError."""
        last = self._swapped.get(path)  # (ETag, bytes) of our last write: still there unless someone wrote since
        for _ in range(SWAP_ATTEMPTS):
            if last is None:
                answer = self._call(f"reading {path}", "GET", path, 404)
                last = None if answer is None else (_etag(answer, f"reading {path}"), answer.body)
            if last is not None and keep(last[1]):
                return False
            condition = {"If-None-Match": "*"} if last is None else {"If-Match": last[0]}
            written = self._put(path, body, immutable=False, condition=condition)
            if written is not None:
                self._swapped[path] = (_etag(written, f"writing {path}"), body)
                return True
            last = None  # someone else wrote it: read what is there now
        raise StorageUnavailableError(f"writing {path}: it changed under each of {SWAP_ATTEMPTS} conditional writes")

    def put_tiles(self, objects: Iterable[tuple[TileID, bytes]]) -> None:
        """Write tiles and bundles concurrently; return once every one is written (or raise the first failure).
        Each is then kept in memory, partial ones too: a tile's or bundle's path fixes its content."""
        written = [(tile.path(), tile.is_full, body) for tile, body in objects]
        futures = [self._pool.submit(self.put, path, body, immutable=full) for path, full, body in written]
        for f in futures:
            f.result()
        for path, _, body in written:
            self.remember(path, body)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._s3.close()


def _content_length(answer: Answer, what: str) -> int:
    """The answer's Content-Length header. Raises StorageUnavailableError if it has none (or not a decimal)."""
    length = answer.headers.get("Content-Length", "")
    if not (length.isascii() and length.isdigit()):
        raise StorageUnavailableError(f"{what}: the bucket's answer has no Content-Length")
    return int(length)


def _etag(answer: Answer, what: str) -> str:
    """The answer's ETag header (for If-Match). Raises StorageUnavailableError if it has none."""
    etag = answer.headers.get("ETag")
    if not etag:
        raise StorageUnavailableError(f"{what}: the bucket's answer has no ETag")
    return etag

