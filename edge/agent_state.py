"""The agent's state on disk, under its data directory:

- state.json: per configured module its state (admitted | refused | quarantined), reason, the
  release it resolved to, digest, log index, profile, since, and the cosigned time of the newest
  status proof that verified for it (status_as_of); replaced atomically (temp file,
  fsync, rename), and always written before the state is acted on, so it survives a SIGKILL.
  It carries an HMAC-SHA256 under a key derived from the node's artifact key (state_key): a file
  edited on disk, or written by another node, does not check, and is not used (StateError);
- modules/sha256/<hex>: the admitted modules, content-addressed (written the same way);
- checkpoints/: the newest checkpoint trusted per log (registry/edge_state.py, as `wasmlog verify --state`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pathlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from registry.dsse import strict_json
from tlog.errors import MalformedError
from tlog.files import atomic_write, is_regular_file, remove_entry

ADMITTED, REFUSED, QUARANTINED = "admitted", "refused", "quarantined"
STATES = (ADMITTED, REFUSED, QUARANTINED)
MAX_STATE_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


STATE_VERSION = 3  # 1 had no MAC; 2 no status_as_of (read as None)
READ_VERSIONS = (2, 3)


class StateError(Exception):
    """state.json cannot be used (its MAC does not check, or it is damaged): the agent will not guess."""


def state_key(artifact_key: bytes) -> bytes:
    """The key state.json is MACed under: derived from the node-local artifact key (edge/artifacts.py), so one
    0600 file holds the node's secret, and a MAC of one purpose is never one of the other."""
    return hmac.new(artifact_key, b"wasmlog agent state.json key", hashlib.sha256).digest()


@dataclass(frozen=True)
class ModuleState:
    ref: str  # as configured
    state: str
    reason: str | None  # why it is refused or quarantined (a reason code), None when admitted
    message: str | None
    profile: str
    since: int  # POSIX seconds of the last change of state
    version: str | None = None  # the release it resolved to
    digest: str | None = None  # sha256 hex of the module
    log_index: int | None = None
    status_as_of: int | None = None  # POSIX seconds: the cosigned time of the newest status proof that verified

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _module_state(obj: object, version: int) -> ModuleState:
    fields = set(ModuleState.__dataclass_fields__) - ({"status_as_of"} if version == 2 else set())
    if type(obj) is not dict or set(obj) != fields:
        raise StateError(f"a module entry has the wrong fields: {obj!r:.200}")
    m = ModuleState(**obj)
    if m.state not in STATES or (m.digest is not None and not _HEX64.fullmatch(str(m.digest))) \
            or (m.status_as_of is not None and type(m.status_as_of) is not int):
        raise StateError(f"a module entry is damaged: {obj!r:.200}")
    return m


class StateFile:
    """state.json: {"version": 3, "modules": {ref: ModuleState}, "mac": hex HMAC-SHA256 under key of the
    canonical JSON (sorted keys, no spaces) of the rest}."""

    def __init__(self, data: pathlib.Path, key: bytes) -> None:
        self.path = data / "state.json"
        self._key = key

    def _mac(self, content: dict[str, object]) -> str:
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return hmac.new(self._key, b"wasmlog agent state\0" + canonical, hashlib.sha256).hexdigest()

    def load(self) -> dict[str, ModuleState] | None:
        """The states in the file, None when there is no file. Raises StateError for a file that is
        malformed, of another version, or whose MAC does not check under this node's key."""
        if not (self.path.is_symlink() or self.path.exists()):
            return None
        try:
            if not is_regular_file(self.path) or self.path.stat().st_size > MAX_STATE_BYTES:
                raise StateError(f"{self.path} is not a regular file of at most {MAX_STATE_BYTES} bytes")
            obj = strict_json(self.path.read_bytes(), str(self.path))
        except (OSError, MalformedError) as e:
            raise StateError(f"{self.path}: {e}") from None
        if type(obj) is not dict or set(obj) != {"version", "modules", "mac"} or type(obj["version"]) is not int \
                or obj["version"] not in READ_VERSIONS or type(obj["modules"]) is not dict or type(obj["mac"]) is not str:
            raise StateError(f"{self.path} is not an agent state file of version {' or '.join(map(str, READ_VERSIONS))}")
        mac = obj.pop("mac")
        if not hmac.compare_digest(mac.encode(), self._mac(obj).encode()):
            raise StateError(f"{self.path}: its MAC does not check under this node's key (edited, or another node's)")
        try:
            return {ref: _module_state(m, obj["version"]) for ref, m in obj["modules"].items()}
        except TypeError as e:
            raise StateError(f"{self.path}: {e}") from None

    def save(self, modules: dict[str, ModuleState]) -> None:
        content: dict[str, object] = {"version": STATE_VERSION, "modules": {ref: m.as_json() for ref, m in sorted(modules.items())}}
        body = json.dumps({**content, "mac": self._mac(content)}, indent=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, body.encode())


class ModuleStore:
    """modules/sha256/<hex>: admitted module bytes, named by their SHA-256."""

    def __init__(self, data: pathlib.Path) -> None:
        self.root = data / "modules" / "sha256"

    def path(self, digest: str) -> pathlib.Path:
        assert _HEX64.fullmatch(digest), digest
        return self.root / digest

    def put(self, digest: str, module: bytes) -> pathlib.Path:
        assert hashlib.sha256(module).hexdigest() == digest
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(digest)
        atomic_write(path, module)
        return path

    def get(self, digest: str) -> bytes | None:
        """The stored bytes if they hash to digest; None if absent or if they do not (see check)."""
        path = self.path(digest)
        try:
            data = path.read_bytes() if is_regular_file(path) else None
        except OSError:
            return None
        return data if data is not None and hashlib.sha256(data).hexdigest() == digest else None

    def digests(self) -> Iterator[str]:
        if self.root.exists():
            for p in sorted(self.root.iterdir()):
                if _HEX64.fullmatch(p.name):
                    yield p.name

    def check(self) -> list[str]:
        """Re-hash every stored module; remove and return the digests whose entry does not hash to its name,
        or cannot be read at all (a directory, a file without read permission): one bad entry never stops
        the check of the others."""
        bad = []
        for digest in self.digests():
            path = self.path(digest)
            h = hashlib.sha256()
            try:
                if is_regular_file(path):  # never follow a link or block on a FIFO planted under a digest's name
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
            except OSError:
                pass  # unreadable: its hash cannot be its name
            if h.hexdigest() != digest:
                bad.append(digest)
                remove_entry(path)
        return bad

