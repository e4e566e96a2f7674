"""Durable file replacement: write a temporary file, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import pathlib
import tempfile


def atomic_write(path: str | pathlib.Path, data: bytes) -> None:
    """Make path hold data; a crash at any point leaves the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.fspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
