"""Content-addressed blob files: ``<root>/sha256/<hex>``, written atomically and durably.

Paths come from digests only; no user string ever reaches the filesystem.

Both stores (this one and bucket_blobs.BucketBlobStore) hand a blob out for reading as a BlobReader:
its size and its bytes in pieces, so serving a blob never holds it whole.

Two ways to write: put() is durable when it returns (fsync of the file and the directory);
write() + sync() lets many writers share one filesystem sync (group commit). A file written
by write() may be torn after a crash until sync() returned, so an existing file is trusted
only when its content has its digest; otherwise it is rewritten.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import itertools
import os
import re
from typing import Any, Protocol

from tlog.errors import MalformedError, NotFoundError, TlogError
from tlog.files import atomic_write
from tlog.syntax import lower_hex

_HEX64 = re.compile(lower_hex(64))


def _load_syncfs() -> Any:  # a ctypes function, or None
    """libc syncfs(2) (Linux): flush one filesystem, not every mounted one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def checked_digest(digest: str) -> str:
    """digest if it is 64 lowercase hex characters (a blob's name). Raises MalformedError."""
    if not _HEX64.fullmatch(digest):
        raise MalformedError("a blob digest is 64 lowercase hex characters")
    return digest


class _Stream(Protocol):
    def read(self, n: int, /) -> bytes: ...

    def close(self) -> None: ...


class BlobReader:
    """A blob open for reading (blocking: read from a worker thread; the caller closes it): size bytes
    from stream, read(n) at most n at a time. With a digest, the bytes are hashed as they are read,
    and the read that would return the last of them (or finds the stream ended early) raises TlogError
    if they do not have it: a reader never sees the whole of a blob that is not the one named."""

    def __init__(self, stream: _Stream, size: int, digest: str | None = None) -> None:
        self.size = size
        self._stream = stream
        self._digest = digest
        self._hash = hashlib.sha256() if digest is not None else None
        self._read = 0

    @property
    def checked(self) -> bool:
        """Whether the bytes are checked against a digest as they are read."""
        return self._digest is not None

    def read(self, n: int) -> bytes:
        """Up to n bytes (n > 0); b"" at the end. With a digest, the last bytes are checked before they are returned."""
        if self._read >= self.size:
            return b""
        chunk = self._stream.read(min(n, self.size - self._read))
        self._read += len(chunk)
        if self._hash is not None:
            self._hash.update(chunk)
            if (not chunk or self._read == self.size) and (self._read != self.size or self._hash.hexdigest() != self._digest):
                raise TlogError(f"blob {self._digest} is stored with other bytes ({self._read} of {self.size} read)")
        return chunk

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeReader:
    """Bytes [start, stop) of a blob read through its digest check (blob.checked), as a reader of
    size stop - start: what precedes the range is read and dropped, and the range's last piece is
    returned only once the rest of the blob was read too and the whole had its digest, so a reader
    never sees the whole of a range of a blob that is not the one named (TlogError instead)."""

    def __init__(self, blob: BlobReader, start: int, stop: int) -> None:
        if not blob.checked or not 0 <= start < stop <= blob.size:
            raise ValueError("a range is read from a digest-checked blob, within its size")
        self.size = stop - start
        self._blob, self._start = blob, start
        self._skipped = self._sent = 0

    def read(self, n: int) -> bytes:
        """Up to n bytes of the range (n > 0); b"" at its end. Raises TlogError (see the class), OSError."""
        if self._sent >= self.size:
            return b""
        while self._skipped < self._start:
            self._skipped += len(self._piece(min(n, self._start - self._skipped)))
        chunk = self._piece(min(n, self.size - self._sent))
        self._sent += len(chunk)
        if self._sent == self.size:
            while self._blob.read(n):  # the rest of the blob, through the digest check
                pass
        return chunk

    def _piece(self, n: int) -> bytes:
        chunk = self._blob.read(n)
        if not chunk:  # a checked reader raises first; this is a guard
            raise TlogError("the blob ended before its size")
        return chunk

    def close(self) -> None:
        self._blob.close()


class BlobStore:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "sha256")
        os.makedirs(self.dir, exist_ok=True)
        self._tmp_ids = itertools.count()

    def _path(self, digest: str) -> str:
        return os.path.join(self.dir, checked_digest(digest))

    def _intact(self, path: str, digest: str) -> bool:
        try:
            with open(path, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == digest
        except FileNotFoundError:
            return False

    def put(self, data: bytes) -> str:
        """Store data under its SHA-256 and return the hex digest; durable when this returns."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not self._intact(path, digest):
            atomic_write(path, data)
        return digest

    def write(self, data: bytes) -> str:
        """Store data under its SHA-256 and return the hex digest; durable only after the next sync()."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if self._intact(path, digest):
            return digest
        tmp = os.path.join(self.dir, f".tmp-{digest}-{os.getpid()}-{next(self._tmp_ids)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return digest

    def sync(self) -> None:
        """Make every write() that returned before this call durable (file data and names)."""
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()  # no syncfs here (or it failed): flush everything
        finally:
            os.close(fd)

    def open(self, digest: str, *, verify: bool = False) -> BlobReader:
        """The blob's file, open for reading (the caller closes it); blobs never change once written.
        verify: its bytes are checked against the digest as they are read (see BlobReader); a file is
        trusted otherwise (it had its digest when written), and a client can check a whole blob itself."""
        try:
            f = open(self._path(digest), "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None
        return BlobReader(f, os.fstat(f.fileno()).st_size, digest if verify else None)

    def size(self, digest: str) -> int:
        """The blob's length, from its file's metadata (nothing read). Raises NotFoundError."""
        try:
            return os.stat(self._path(digest)).st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None

    def get(self, digest: str) -> bytes:
        try:
            with open(self._path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None
