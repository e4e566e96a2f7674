"""The attested cache of Wasmtime's compiled artifacts.

Deserializing a compiled artifact trusts its bytes completely (it is native code), so each artifact file carries
an HMAC-SHA256 under a node-local key, over the module digest, the engine settings id and the artifact; an
artifact is handed out only after its MAC checks, and one that does not check is deleted. The key never leaves
this process: the sandbox workers get artifacts that were already checked.

File layout: cache_dir/<digest>.<settings id>.cwasm = MAGIC, 32-byte MAC, artifact bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pathlib
import re
import secrets
import stat
import tempfile
import time

from tlog.files import is_regular_file, remove_entry

MAGIC = b"wlcwasm1"
KEY_SIZE = 32
STALE_TMP = 600  # seconds after which a temporary file of the cache is an interrupted store
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"([0-9a-f]{64})\.([0-9a-f]{16})\.cwasm")


class KeyFileError(Exception):
    """The node-local artifact key file is unusable (wrong size, or readable by others)."""


def load_or_create_key(path: pathlib.Path) -> bytes:
    """The key in path, which is created (mode 0600, 32 random bytes) when missing.

    Creation is atomic (a crash leaves no key or the whole key, never an empty one): the bytes are written
    and fsynced under a temporary name, then linked to path (another process that got there first wins).
    The key is read through no symbolic link, and must be a regular file of ours that nobody else can read.
    """
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_SIZE))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise KeyFileError(f"artifact key {path} cannot be opened ({e.strerror}; a symbolic link is refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise KeyFileError(f"artifact key {path} is not a regular file owned by this user")
        if st.st_mode & 0o077:
            raise KeyFileError(f"artifact key {path} has mode {stat.filemode(st.st_mode)}: it must be readable by its owner only (0600)")
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"artifact key {path} holds {len(key)} bytes, not {KEY_SIZE}")
    return key


class ArtifactCache:
    def __init__(self, cache_dir: pathlib.Path, key: bytes, settings_id: str) -> None:
        self.dir = cache_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = key
        self.settings_id = settings_id

    def path(self, digest: str) -> pathlib.Path:
        return self.dir / f"{digest}.{self.settings_id}.cwasm"

    def _mac(self, digest: str, settings_id: str, artifact: bytes) -> bytes:
        mac = hmac.new(self._key, b"wasmlog compiled artifact\0%s\0%s\0" % (digest.encode(), settings_id.encode()), hashlib.sha256)
        mac.update(artifact)
        return mac.digest()

    def _checked(self, data: bytes, digest: str, settings_id: str) -> bytes | None:
        if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
            return None
        mac, artifact = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
        return artifact if hmac.compare_digest(mac, self._mac(digest, settings_id, artifact)) else None

    def load(self, digest: str) -> tuple[bytes | None, bool]:
        """(the artifact for digest if present and its MAC checks, whether a bad one was found and deleted)."""
        path = self.path(digest)
        if not os.path.lexists(path):
            return None, False
        try:
            data = path.read_bytes() if is_regular_file(path) else None
        except FileNotFoundError:
            return None, False
        except OSError:
            data = None
        artifact = None if data is None else self._checked(data, digest, self.settings_id)
        if artifact is None:
            remove_entry(path)
            return None, True
        return artifact, False

    def discard(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def store(self, digest: str, artifact: bytes) -> None:
        """Write the artifact with its MAC, atomically (a reader sees the old file, the new one or none)."""
        path = self.path(digest)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + self._mac(digest, self.settings_id, artifact) + artifact)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def verify_all(self) -> list[str]:
        """Re-MAC every cached artifact (of any settings id); delete the bad ones and stale temporary files;
        return the digests whose artifact was bad (sorted, without duplicates). Safe to run in another thread
        while artifacts are loaded and stored."""
        bad: set[str] = set()
        for path in self.dir.iterdir():
            m = _NAME_RE.fullmatch(path.name)
            if m is None:
                with contextlib.suppress(FileNotFoundError):
                    if path.name.endswith(".tmp") and time.time() - path.stat().st_mtime > STALE_TMP:
                        path.unlink()  # left by a store that was interrupted (a fresh one may be in progress)
                continue
            try:
                data: bytes | None = path.read_bytes() if is_regular_file(path) else None
            except FileNotFoundError:
                continue
            except OSError:  # a directory, a file we may not read: bad, and never a reason to stop the others
                data = None
            if data is None or self._checked(data, m[1], m[2]) is None:
                remove_entry(path)
                bad.add(m[1])
        return sorted(bad)
