"""Namespace state as a pure reducer over the log's records.

Anyone replaying the log applies every record in index order and gets the same
state; a record that fails a rule changes nothing (replay reports it).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from immutables import Map

from tlog.errors import TlogError
from tlog.note import verifier_from_vkey

from .record import Action, PackageRef, Record, Release


class ValidationError(TlogError):
    """A record that breaks a namespace rule: it changes nothing. No HTTP status here (registry/server.py maps them)."""


class InvalidSignature(ValidationError):
    """The record's envelope is not validly signed by the key it names."""


class Unauthorized(ValidationError):
    """The signer may not act in this namespace (never granted, or revoked)."""


class VersionExists(ValidationError):
    """The package version is already published."""


class KeyAlreadyGranted(ValidationError):
    """The key (its public key, under any name) is already granted in the namespace."""


class AlreadyYanked(ValidationError):
    """The release was already yanked."""


class UnknownRelease(ValidationError):
    """A yank names a version that was never published."""


class UnknownKey(ValidationError):
    """A revocation names a key that is not granted in the namespace."""


class LastKey(ValidationError):
    """A revocation that would leave the namespace with no key: nobody could ever act in it again."""


PENDING = -1  # the index of a record checked or reserved but not yet integrated


def _at(index: int) -> str:
    """Where a record is, for messages: its log index, or that it is still pending."""
    return f"at index {index}" if index >= 0 else "by a record not yet integrated"


@functools.lru_cache(maxsize=4096)
def public_key(vkey: str) -> bytes:
    """The Ed25519 public key of a vkey: a key's identity (its name is only a label)."""
    return verifier_from_vkey(vkey).public_key


@dataclass(frozen=True)
class ReleaseState:
    index: int
    release: Release
    signer: str
    yanked_at: int | None = None


# States are persistent maps (immutables.Map, a HAMT): applying a record costs O(log n) and
# shares everything else with the previous state, so replaying N records is O(N log N). apply()
# builds each new state with its constructor (every field named): dataclasses.replace costs 2-3x.
@dataclass(frozen=True)
class NamespaceState:
    keys: frozenset[str] = frozenset()  # vkeys that may act in the namespace (one per public key)
    revoked: Map[str, int] = field(default_factory=Map)  # vkey as granted -> revocation index (PENDING if not yet logged)
    releases: Map[str, ReleaseState] = field(default_factory=Map)  # "name@version"

    def versions(self, name: str) -> list[str]:
        """The versions of name in publication (log index) order."""
        return [k.split("@", 1)[1] for k in self.in_log_order() if k.split("@", 1)[0] == name]

    def granted_as(self, vkey: str) -> str | None:
        """The granted vkey with vkey's public key, whatever its name, or None."""
        pk = public_key(vkey)
        return next((k for k in self.keys if public_key(k) == pk), None)

    def revoked_as(self, vkey: str) -> str | None:
        """The revoked vkey with vkey's public key, whatever its name, or None."""
        pk = public_key(vkey)
        return next((k for k in self.revoked if public_key(k) == pk), None)

    def in_log_order(self) -> list[str]:
        """Every "name@version" in publication (log index) order (the maps themselves are unordered)."""
        return sorted(self.releases, key=lambda k: self.releases[k].index)


@dataclass(frozen=True)
class RegistryState:
    namespaces: Map[str, NamespaceState] = field(default_factory=Map)

    def release(self, ref: PackageRef) -> ReleaseState | None:
        ns = self.namespaces.get(ref.namespace)
        return None if ns is None else ns.releases.get(f"{ref.name}@{ref.version}")

    def check(self, record: Record) -> None:
        """Raise the ValidationError that apply() would raise, without building a new state."""
        self.apply(record, PENDING)

    def apply(self, record: Record, index: int) -> RegistryState:
        """Return the state after the record at this log index (PENDING: not yet integrated).
        Raises ValidationError; self never changes.

        A key is its public key: a revoked public key never acts or comes back under any name,
        and one public key holds at most one grant. Every change is one-way (a grant can only be
        revoked, a revocation and a yank are final, a version never changes), so a replayed
        statement, whatever its `issued`, is always refused (spec/registry.md).
        """
        if not record.signed_by_signer:
            raise InvalidSignature(f"the envelope is not signed by {record.signer}")
        ns_name = record.namespace
        ns = self.namespaces.get(ns_name)
        body = record.body
        if ns is None:
            # The first key to act in a namespace claims it, and only by granting itself.
            if isinstance(body, Action) and body.action == "key-grant" and body.key == record.signer:
                return self._with(ns_name, NamespaceState(keys=frozenset({record.signer})))
            raise Unauthorized(f"namespace {ns_name} is unclaimed: its first record must be a key grant to the signer itself")
        if record.signer not in ns.keys:
            revoked = ns.revoked_as(record.signer)
            if revoked is not None:
                raise Unauthorized(f"key {record.signer} was revoked in {ns_name} {_at(ns.revoked[revoked])}" + _alias(revoked, record.signer))
            raise Unauthorized(f"key {record.signer} may not act in namespace {ns_name}")
        if isinstance(body, Release):
            key = f"{body.ref.name}@{body.ref.version}"
            if key in ns.releases:
                raise VersionExists(f"{body.ref} is already published {_at(ns.releases[key].index)}")
            released = ReleaseState(index=index, release=body, signer=record.signer)
            return self._with(ns_name, NamespaceState(keys=ns.keys, revoked=ns.revoked, releases=ns.releases.set(key, released)))
        if body.action == "key-grant":
            assert body.key is not None
            revoked = ns.revoked_as(body.key)
            if revoked is not None:
                raise Unauthorized(f"key {body.key} was revoked in {ns_name} {_at(ns.revoked[revoked])}{_alias(revoked, body.key)}"
                                   " and cannot be granted again under any name")
            granted = ns.granted_as(body.key)
            if granted is not None:
                raise KeyAlreadyGranted(f"key {body.key} is already granted in {ns_name}{_alias(granted, body.key)}")
            return self._with(ns_name, NamespaceState(keys=ns.keys | {body.key}, revoked=ns.revoked, releases=ns.releases))
        if body.action == "key-revocation":
            assert body.key is not None
            granted = ns.granted_as(body.key)
            if granted is None:
                raise UnknownKey(f"key {body.key} is not granted in {ns_name}")
            if ns.keys == {granted}:
                raise LastKey(f"key {granted} is the last key of {ns_name}: revoking it would leave nobody able to act there; "
                              "grant its successor first")
            return self._with(ns_name, NamespaceState(keys=ns.keys - {granted}, revoked=ns.revoked.set(granted, index), releases=ns.releases))
        # yank
        key = f"{body.name}@{body.version}"
        current = ns.releases.get(key)
        if current is None:
            raise UnknownRelease(f"{body.ref} is not published")
        if current.yanked_at is not None:
            raise AlreadyYanked(f"{body.ref} was already yanked {_at(current.yanked_at)}")
        yanked = ReleaseState(index=current.index, release=current.release, signer=current.signer, yanked_at=index)
        return self._with(ns_name, NamespaceState(keys=ns.keys, revoked=ns.revoked, releases=ns.releases.set(key, yanked)))

    def _with(self, name: str, ns: NamespaceState) -> RegistryState:
        return RegistryState(self.namespaces.set(name, ns))


def _alias(vkey: str, named: str) -> str:
    return "" if vkey == named else f" (the same public key as {vkey})"


def replay(records: Iterable[tuple[int, Record]]) -> tuple[RegistryState, list[tuple[int, ValidationError]]]:
    """Apply records in index order; return the state and the records that were rejected."""
    state = RegistryState()
    rejected: list[tuple[int, ValidationError]] = []
    for index, record in records:
        try:
            state = state.apply(record, index)
        except ValidationError as e:
            rejected.append((index, e))
    return state, rejected
