"""Content-addressed blob files: ``<root>/sha256/<hex>``, written atomically and durably.

Paths come from digests only; no user string ever reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import os
import re

from tlog.errors import MalformedError, NotFoundError
from tlog.files import atomic_write

_HEX64 = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "sha256")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, digest: str) -> str:
        if not _HEX64.fullmatch(digest):
            raise MalformedError("a blob digest is 64 lowercase hex characters")
        return os.path.join(self.dir, digest)

    def put(self, data: bytes) -> str:
        """Store data under its SHA-256 and return the hex digest; durable when this returns."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if os.path.exists(path):
            return digest
        atomic_write(path, data)
        return digest

    def get(self, digest: str) -> bytes:
        try:
            with open(self._path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} not found") from None
