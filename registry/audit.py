"""Auditing and monitoring a log from its tiles: recompute everything, replay the registry's records."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tlog.client import TileClient
from tlog.errors import TlogError
from tlog.note import Verifier

from .audit_state import AuditState
from .client import RegistryClient
from .diff import component_changes, sbom_components
from .follow import Finding, Follower, FollowState
from .index import IndexState
from .record import (
    Action,
    ImportsMismatch,
    ModuleDigestMismatch,
    Record,
    Release,
    check_module,
    decode_entry,
    decode_index_root,
    is_index_root,
)
from .state import ValidationError


@dataclass
class Event:
    """A monitor event: one record in a watched namespace, an unexpected signer, a capability escalation
    or an SBOM change."""

    kind: str
    index: int
    namespace: str
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"event": self.kind, "index": self.index, "namespace": self.namespace, **self.detail}


def events_for(record: Record, index: int, previous_imports: frozenset[str] | None, expected_keys: frozenset[str]) -> list[Event]:
    """What a monitor reports about one valid record."""
    body = record.body
    ns = record.namespace
    if isinstance(body, Release):
        detail: dict[str, Any] = {"package": str(body.ref), "signer": record.signer, "module_sha256": body.module_sha256}
        events = [Event("release", index, ns, detail)]
        if expected_keys and record.signer not in expected_keys:
            events.append(Event("unexpected-key", index, ns, {"package": str(body.ref), "signer": record.signer}))
        imports = frozenset(i.qualified for i in body.imports)
        if previous_imports is not None and imports - previous_imports:
            events.append(Event("capability-escalation", index, ns, {"package": str(body.ref), "added_imports": sorted(imports - previous_imports)}))
        return events
    assert isinstance(body, Action)
    detail = {"signer": record.signer}
    if body.action == "yank":
        detail["package"] = str(body.ref)
        detail["reason"] = body.reason
    else:
        detail["key"] = body.key
    if expected_keys and record.signer not in expected_keys:
        return [Event(body.action, index, ns, detail), Event("unexpected-key", index, ns, detail)]
    return [Event(body.action, index, ns, detail)]


@dataclass
class Auditor:
    follower: Follower
    state: AuditState
    registry: RegistryClient | None = None  # where blobs can be fetched
    sbom_source: RegistryClient | None = None  # where a monitor fetches SBOMs to report what a release changes in them
    on_event: Callable[[Event], None] | None = None
    namespaces: frozenset[str] = frozenset()  # watched (monitor); empty: none
    expected_keys: frozenset[str] = frozenset()
    findings: list[Finding] = field(default_factory=list)
    releases_checked: int = 0
    _origin: str = ""
    _last_root_index: IndexState | None = None  # the index at the previous index root (the monitor's index-root events)
    _index_buffer: list[tuple[int, Record | None]] = field(default_factory=list)  # read, not yet indexed (_flush_index)
    _undecodable_from: int | None = None  # the first entry that did not decode, read while registry_log was undecided

    async def run(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Audit up to the latest checkpoint; return its size (or the audited size if it failed)."""
        latest = await self.follower.latest()
        if latest is None:
            return self.state.follow.size
        cp, note = latest
        self.follower.state = self.state.follow
        self._origin = cp.origin
        replayed_from = self.state.registry, self.state.registry_log, dict(self.state.previous), self.state.index
        self._undecodable_from = None
        async for index, entry in self.follower.entries(cp, progress):
            await self._entry(index, entry)
        self._flush_index()
        self.findings.extend(self.follower.findings)
        self.follower.findings.clear()
        if self.follower.state.size == cp.size:
            self.state.follow = FollowState(cp.size, self.follower.state.compact, note.decode())
        else:  # not all verified: the next run replays these entries again, onto the state they started from
            self.state.registry, self.state.registry_log, self.state.previous, self.state.index = replayed_from
        return self.state.follow.size

    async def _entry(self, index: int, entry: bytes) -> None:
        if self.state.registry_log is False:  # a state saved when a first entry that did not decode settled it: only the tree
            return
        if is_index_root(entry):
            self._registry_record_at(index)
            self._index_root(index, entry)
            return
        try:
            record = decode_entry(entry)
        except TlogError as e:
            if self.state.registry_log:
                self.findings.append(Finding("void-record", f"entry does not decode: {e}", f"index {index}"))
                self._index_buffer.append((index, None))
            elif self._undecodable_from is None:
                self._undecodable_from = index
            return
        self._registry_record_at(index)
        self._index_buffer.append((index, record))
        try:
            self.state.registry = self.state.registry.apply(record, index)
        except ValidationError as e:
            self.findings.append(Finding("void-record", f"the registry logged a record its rules refuse: {e}", f"index {index}"))
            return
        body = record.body
        previous: Release | None = None
        if isinstance(body, Release):
            key = f"{body.ref.namespace}:{body.ref.name}"
            prev_version = self.state.previous.get(key)
            if prev_version is not None:
                previous = self.state.registry.namespaces[body.ref.namespace].releases[f"{body.ref.name}@{prev_version}"].release
            self.state.previous[key] = body.ref.version
            if self.registry is not None:
                await self._check_blobs(body, index)
        if self.on_event is not None and record.namespace in self.namespaces:
            previous_imports = None if previous is None else frozenset(i.qualified for i in previous.imports)
            events = events_for(record, index, previous_imports, self.expected_keys)
            if isinstance(body, Release) and previous is not None and self.sbom_source is not None:
                events += await self._sbom_change(previous, body, index)
            for event in events:
                self.on_event(event)

    def _registry_record_at(self, index: int) -> None:
        """The entry at index is a namespace record or an index root: this is a registry's log, whatever came
        before (so a registry cannot escape the audit by opening its log with an entry that decodes as nothing)."""
        if self.state.registry_log is None:
            self.state.registry_log = True
            if self._undecodable_from is not None:
                self.findings.append(Finding("void-record", f"entries {self._undecodable_from} to {index - 1} do not decode "
                                             "(before the log's first namespace record or index root)", f"index {self._undecodable_from}"))

    def _index_root(self, index: int, entry: bytes) -> None:
        """Check an index-root record against the index recomputed from every entry before it."""
        self._flush_index()
        ours = self.state.index
        self.state.index = ours.with_records([(index, None)], index + 1)
        where = f"index {index} (index-root record)"
        try:
            root = decode_index_root(entry)
        except TlogError as e:
            self.findings.append(Finding("index-root-mismatch", f"the index-root record does not decode: {e}", where))
            return
        if root.size != index or root.origin != self._origin or root.root != ours.root:
            self.findings.append(Finding(
                "index-root-mismatch",
                f"the registry's index root {root.root.hex()} as of size {root.size} in {root.origin!r} is not the index "
                f"recomputed from the log, {ours.root.hex()} as of size {index} in {self._origin!r}", where))
        if self.on_event is not None and self.namespaces and self._watched_changed(ours):
            self.on_event(Event("index-root", index, ",".join(sorted(self.namespaces)),
                                {"root": root.root.hex(), "size": root.size, "matches": root.root == ours.root}))
        self._last_root_index = ours

    def _flush_index(self) -> None:
        """Index the records read since the last flush (one map update per key)."""
        if self._index_buffer:
            self.state.index = self.state.index.with_records(self._index_buffer, self._index_buffer[-1][0] + 1)
            self._index_buffer = []

    def _watched_changed(self, ours: IndexState) -> bool:
        """Whether a watched namespace's index keys changed since the previous index root (the monitor's index-root event)."""
        return any(key.split(":", 1)[0] in self.namespaces for key, _ in ours.changed(self._last_root_index))
    async def _sbom_change(self, old: Release, new: Release, index: int) -> list[Event]:
        """An "sbom-change" event when new's SBOM differs from old's (the components it adds, removes or
        changes); none when both carry the same SBOM digest. An SBOM that cannot be fetched, or is not
        its logged digest, is a finding instead."""
        if old.sbom_sha256 == new.sbom_sha256:
            return []
        assert self.sbom_source is not None
        where = f"index {index} ({new.ref})"
        components = []
        for release in (old, new):
            sbom = None
            if release.sbom_sha256 is not None:
                try:
                    sbom = await self.sbom_source.get(self.sbom_source.package_path(release.ref) + "/sbom")
                except (TlogError, aiohttp.ClientError) as e:
                    self.findings.append(Finding("blob-unavailable", f"SBOM of {release.ref}: {e}", where))
                    return []
                if hashlib.sha256(sbom).hexdigest() != release.sbom_sha256:
                    self.findings.append(Finding("blob-mismatch", f"the served SBOM of {release.ref} is not the logged digest", where))
                    return []
            try:
                components.append(sbom_components(release.sbom_media_type, sbom))
            except TlogError as e:
                self.findings.append(Finding("blob-mismatch", f"the SBOM of {release.ref} does not parse: {e}", where))
                return []
        detail = {"package": str(new.ref), "previous": str(old.ref), "components": component_changes(components[0], components[1])}
        return [Event("sbom-change", index, new.ref.namespace, detail)]

    async def _check_blobs(self, release: Release, index: int) -> None:
        assert self.registry is not None
        path = self.registry.package_path(release.ref)
        where = f"index {index} ({release.ref})"
        try:
            module = await self.registry.get(path + "/module.wasm")
        except (TlogError, aiohttp.ClientError) as e:
            self.findings.append(Finding("blob-unavailable", str(e), where))
            return
        self.releases_checked += 1
        try:
            check_module(release, module)
        except ModuleDigestMismatch:
            self.findings.append(Finding("blob-mismatch", "the served module is not the logged digest", where))
            return
        except ImportsMismatch:
            self.findings.append(Finding("blob-mismatch", "the logged import list is not the module's", where))
        except TlogError as e:
            self.findings.append(Finding("blob-mismatch", f"the logged module is not valid wasm: {e}", where))
            return
        if release.sbom_sha256 is not None:
            try:
                sbom = await self.registry.get(path + "/sbom")
            except (TlogError, aiohttp.ClientError) as e:
                self.findings.append(Finding("blob-unavailable", f"SBOM: {e}", where))
                return
            if hashlib.sha256(sbom).hexdigest() != release.sbom_sha256:
                self.findings.append(Finding("blob-mismatch", "the served SBOM is not the logged digest", where))

    def report(self, origin_url: str) -> dict[str, Any]:
        ns = self.state.registry.namespaces
        return {
            "log": origin_url,
            "tree_size": self.state.follow.size,
            "checkpoint": self.state.follow.checkpoint,
            "registry_log": bool(self.state.registry_log),
            "namespaces": len(ns),
            "releases": sum(len(n.releases) for n in ns.values()),
            "blobs_checked": self.releases_checked,
            "index_keys": len(self.state.index.histories),
            "findings": [f.as_json() for f in self.findings],
        }


def make_auditor(
    *, log_url: str, session: aiohttp.ClientSession, verifiers: Sequence[Verifier], state: AuditState,
    registry_url: str | None = None, **kw: Any,
) -> Auditor:
    follower = Follower(TileClient(log_url, session), list(verifiers))
    registry = RegistryClient(registry_url, session) if registry_url else None
    return Auditor(follower, state, registry, **kw)


def dumps_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True)
