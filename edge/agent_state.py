"""The agent's state on disk, under its data directory:

- state.json: per configured module its state (admitted | refused | quarantined), reason, the
  release it resolved to, digest, log index, profile, since; replaced atomically (temp file,
  fsync, rename), and always written before the state is acted on, so it survives a SIGKILL;
- modules/sha256/<hex>: the admitted modules, content-addressed (written the same way);
- checkpoints/: the newest checkpoint trusted per log (registry/edge_state.py, as `wasmlog verify --state`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from tlog.files import atomic_write, is_regular_file, remove_entry

ADMITTED, REFUSED, QUARANTINED = "admitted", "refused", "quarantined"
STATES = (ADMITTED, REFUSED, QUARANTINED)
MAX_STATE_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class StateError(Exception):
    """state.json cannot be used (not ours, or damaged): the agent will not guess."""


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

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _module_state(obj: object) -> ModuleState:
    if type(obj) is not dict or set(obj) != set(ModuleState.__dataclass_fields__):
        raise StateError(f"a module entry has the wrong fields: {obj!r:.200}")
    m = ModuleState(**obj)
    if m.state not in STATES or (m.digest is not None and not _HEX64.fullmatch(str(m.digest))):
        raise StateError(f"a module entry is damaged: {obj!r:.200}")
    return m


class StateFile:
    """state.json: {"version": 1, "modules": {ref: ModuleState}}."""

    def __init__(self, data: pathlib.Path) -> None:
        self.path = data / "state.json"

    def load(self) -> dict[str, ModuleState]:
        if not self.path.exists():
            return {}
        try:
            if self.path.stat().st_size > MAX_STATE_BYTES:
                raise StateError(f"{self.path} is over {MAX_STATE_BYTES} bytes")
            obj = json.loads(self.path.read_bytes())
            if type(obj) is not dict or obj.get("version") != 1 or type(obj.get("modules")) is not dict:
                raise StateError(f"{self.path} is not an agent state file")
            return {ref: _module_state(m) for ref, m in obj["modules"].items()}
        except (OSError, ValueError, TypeError) as e:
            raise StateError(f"{self.path}: {e}") from None

    def save(self, modules: dict[str, ModuleState]) -> None:
        body = json.dumps({"version": 1, "modules": {ref: m.as_json() for ref, m in sorted(modules.items())}}, indent=1)
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

