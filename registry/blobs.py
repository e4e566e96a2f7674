"""Content-addressed blob files: ``<root>/sha256/<hex>``, written atomically and durably.

Paths come from digests only; no user string ever reaches the filesystem.

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
from typing import Any, BinaryIO

from tlog.errors import MalformedError, NotFoundError
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


class BlobStore:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "sha256")
        os.makedirs(self.dir, exist_ok=True)
        self._tmp_ids = itertools.count()

    def _path(self, digest: str) -> str:
        if not _HEX64.fullmatch(digest):
            raise MalformedError("a blob digest is 64 lowercase hex characters")
        return os.path.join(self.dir, digest)

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

    def open(self, digest: str) -> BinaryIO:
        """The blob's file, open for reading (the caller closes it); blobs never change once written."""
        try:
            return open(self._path(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None

    def get(self, digest: str) -> bytes:
        try:
            with open(self._path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None
