"""Durable file replacement (write a temporary file, fsync, rename, fsync the directory), and removal of
whatever stands at a path."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
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


def remove_entry(path: pathlib.Path) -> None:
    """Remove what stands at path, a file or a directory, as far as we may (a tamperer's leftovers)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def is_regular_file(path: pathlib.Path) -> bool:
    """Whether path itself (not what a link points to) is a regular file: never a directory, a FIFO
    that would block a reader, or a link to /dev/zero that would never end."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
