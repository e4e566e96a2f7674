"""The auditor's resumable state on disk: one plain, versioned JSON file (never code).

`DIR/audit-state.json` holds how far the audit got (tree size, compact range, the last
verified checkpoint) and the registry state re-derived up to there (namespaces, keys,
revocations, releases with their statements), so an audit resumes where it stopped:

    {"format": "wasmlog-audit-state", "version": 1,
     "follow": {"size": N, "compact": [base64 hash, ...], "checkpoint": "<signed note>"},
     "registry_log": true | false | null,
     "previous": {"ns:name": "<latest version in log order>"},
     "namespaces": {ns: {"keys": [vkey, ...], "revoked": {vkey: index},
                         "releases": {"name@version": {"index": I, "signer": vkey,
                                                       "yanked_at": I | null,
                                                       "statement": "<in-toto statement JSON>"}}}},
     "index": {"size": N, "histories": {key: [[index, type], ...]}}}   # the verifiable index (spec/status-proof.md)

`index` is optional when loading (a state saved before index roots existed): the index then
starts empty at its size, and every index root after it is reported as not matching.

Loading is strict: an unknown format or version, a file that is not this JSON, or values that
do not fit together (a compact range that does not hash to the checkpoint's root, a statement
that does not name its release) raise AuditStateError; nothing is guessed. The older pickle
state (`audit-state.pickle`) is never read: it could run code.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from immutables import Map

from tlog.checkpoint import parse_checkpoint
from tlog.compact import CompactRange
from tlog.errors import TlogError
from tlog.files import atomic_write
from tlog.note import parse_note

from .dsse import strict_json
from .follow import FollowState
from .index import TYPE_CODES, IndexState
from .record import Release, check_label, check_version, parse_statement
from .state import NamespaceState, RegistryState, ReleaseState

FORMAT = "wasmlog-audit-state"
VERSION = 1
FILE_NAME = "audit-state.json"
LEGACY_FILE_NAME = "audit-state.pickle"  # wasmlog before state version 1 of this format


class AuditStateError(TlogError):
    """A state file that cannot be used: corrupt, of an unknown version, or the old pickle."""


@dataclass
class AuditState:
    follow: FollowState = field(default_factory=FollowState)
    registry: RegistryState = field(default_factory=RegistryState)
    registry_log: bool | None = None  # None until an entry is a namespace record or an index root (False: states of older versions)
    previous: dict[str, str] = field(default_factory=dict)  # "ns:name" -> latest version by log order
    index: IndexState = field(default_factory=IndexState)  # the verifiable index recomputed from the log

    def save(self, directory: pathlib.Path) -> None:
        """Replace DIR/audit-state.json atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / FILE_NAME, encode_state(self))

    @classmethod
    def load(cls, directory: pathlib.Path | None) -> AuditState:
        """The state saved in directory; a fresh state when there is none. Raises AuditStateError."""
        if directory is None:
            return cls()
        path = directory / FILE_NAME
        if not path.exists():
            if (directory / LEGACY_FILE_NAME).exists():
                raise AuditStateError(
                    f"{directory / LEGACY_FILE_NAME} is an audit state from an older wasmlog (a pickle, which is never "
                    "loaded: it could run code); delete it and audit again from the start"
                )
            return cls()
        try:
            return decode_state(path.read_bytes())
        except AuditStateError as e:
            raise AuditStateError(f"{path}: {e}; move it away to audit again from the start") from None


def encode_state(state: AuditState) -> bytes:
    namespaces = {
        name: {
            "keys": sorted(ns.keys),
            "revoked": dict(ns.revoked),
            "releases": {
                key: {"index": r.index, "signer": r.signer, "yanked_at": r.yanked_at, "statement": r.release.statement().decode()}
                for key, r in ns.releases.items()
            },
        }
        for name, ns in state.registry.namespaces.items()
    }
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "follow": state.follow.as_json(),
        "registry_log": state.registry_log,
        "previous": state.previous,
        "namespaces": namespaces,
        "index": {"size": state.index.size, "histories": {k: [list(i) for i in h] for k, h in state.index.histories.items()}},
    }
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()


def decode_state(data: bytes) -> AuditState:
    """Parse encode_state's output. Raises AuditStateError naming what is wrong."""
    try:
        obj = strict_json(data, "audit state")
    except TlogError as e:
        raise AuditStateError(str(e)) from None
    if type(obj) is not dict or obj.get("format") != FORMAT:
        raise AuditStateError(f"not a {FORMAT} file")
    if obj.get("version") != VERSION:
        raise AuditStateError(f"audit state version {str(obj.get('version'))[:20]} is not {VERSION}, the one this wasmlog reads")
    try:
        names = {"format", "version", "follow", "registry_log", "previous", "namespaces"}
        top = _fields(obj, names | ({"index"} if "index" in obj else set()), "the state")
        if top["registry_log"] not in (True, False, None):
            raise AuditStateError("registry_log must be true, false or null")
        follow = FollowState.from_json(top["follow"])
        _check_follow(follow)
        namespaces = Map({check_label(name, "namespace"): _namespace(name, ns) for name, ns in _dict(top["namespaces"], "namespaces").items()})
        previous = {_package(k): check_version(v) for k, v in _dict(top["previous"], "previous").items()}
    except AuditStateError:
        raise
    except TlogError as e:  # a label, version, statement or checkpoint that does not parse
        raise AuditStateError(str(e)) from None
    index = _index(top["index"]) if "index" in top else IndexState(follow.size)
    return AuditState(follow, RegistryState(namespaces), top["registry_log"], previous, index)


def _index(obj: object) -> IndexState:
    d = _fields(obj, {"size", "histories"}, "index")
    if not _is_index(d["size"]):
        raise AuditStateError("index: size must be a log size")
    histories = {}
    for key, items in _dict(d["histories"], "index histories").items():
        if type(items) is not list or not all(type(i) is list and len(i) == 2 and _is_index(i[0]) and _is_index(i[1])
                                              and i[0] < d["size"] and i[1] < len(TYPE_CODES) for i in items) \
                or any(a[0] >= b[0] for a, b in itertools.pairwise(items)):
            raise AuditStateError(f"index: the history of {str(key)[:80]!r} is not [[index, type], ...] in index order below its size")
        histories[key] = tuple((i[0], i[1]) for i in items)
    return IndexState.from_histories(d["size"], histories)


def _check_follow(follow: FollowState) -> None:
    """The compact range hashes to the root of the saved checkpoint, of the same size."""
    try:
        root = CompactRange(follow.size, follow.compact).root()
    except ValueError as e:
        raise AuditStateError(f"follow: {e}") from None
    if not follow.checkpoint:
        if follow.size:
            raise AuditStateError("follow: a size without the checkpoint it was verified against")
        return
    cp = parse_checkpoint(parse_note(follow.checkpoint.encode()).text)
    if (cp.size, cp.root_hash) != (follow.size, root):
        raise AuditStateError("follow: the compact range is not the tree of the saved checkpoint")


def _namespace(name: str, obj: object) -> NamespaceState:
    ns = _fields(obj, {"keys", "revoked", "releases"}, f"namespace {name}")
    keys = ns["keys"]
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise AuditStateError(f"namespace {name}: keys must be a list of vkeys")
    revoked = _dict(ns["revoked"], f"namespace {name} revoked")
    if not all(_is_index(i) for i in revoked.values()):
        raise AuditStateError(f"namespace {name}: a revocation index is not a log index")
    releases = {key: _release(name, key, r) for key, r in _dict(ns["releases"], f"namespace {name} releases").items()}
    return NamespaceState(frozenset(keys), Map(revoked), Map(releases))


def _release(namespace: str, key: str, obj: object) -> ReleaseState:
    r = _fields(obj, {"index", "signer", "yanked_at", "statement"}, f"release {namespace}:{key}")
    if not _is_index(r["index"]) or not (r["yanked_at"] is None or _is_index(r["yanked_at"])) or type(r["signer"]) is not str \
            or type(r["statement"]) is not str:
        raise AuditStateError(f"release {namespace}:{key}: want an index, a signer, yanked_at (index or null) and a statement")
    release: Release = parse_statement(r["statement"].encode())
    if f"{release.ref.namespace}:{release.ref.name}@{release.ref.version}" != f"{namespace}:{key}":
        raise AuditStateError(f"release {namespace}:{key}: its statement is for {release.ref}")
    return ReleaseState(r["index"], release, r["signer"], r["yanked_at"])


def _package(key: object) -> str:
    """A "ns:name" key of previous."""
    namespace, colon, name = key.partition(":") if type(key) is str else ("", "", "")
    if not colon:
        raise AuditStateError("previous: keys are ns:name")
    check_label(namespace, "namespace")
    check_label(name, "name")
    return str(key)


def _is_index(v: object) -> bool:
    return type(v) is int and v >= 0


def _dict(obj: object, what: str) -> dict[str, Any]:
    if type(obj) is not dict:
        raise AuditStateError(f"{what} must be a JSON object")
    return obj


def _fields(obj: object, names: set[str], what: str) -> dict[str, Any]:
    if type(obj) is not dict or obj.keys() != names:
        raise AuditStateError(f"{what} must have exactly the fields {', '.join(sorted(names))}")
    return obj

