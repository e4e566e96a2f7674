"""The status-proof file (spec/status-proof.md): what an edge node needs, offline, to know that a
release is not yanked and its signer not revoked, as of a cosigned checkpoint. Pure.

Canonical CBOR (deterministic encoding, as log entries):

    {"v": 1,
     "checkpoint": <the checkpoint note, verbatim, with its cosignatures>,
     "root": {"index": I, "entry": <index-root record>, "proof": [<inclusion hash>, ...]},
     "keys": [{"key": NS, "other": null, "proof": [<sibling>, ...], "types": <one byte per record>,
               "indexes": [<first log index>, <increase>, ...]}, {"key": "NS:NAME", ...}],
     "records": [{"index": I, "entry": <log entry>, "proof": [...]}, ...]}   # revocations and yanks, in index order

Parsing is strict and bounded: exactly these fields and types, nothing that does not
re-encode to the same bytes. Before any Python object is built, one pass over the CBOR heads
(scan_heads) refuses a file with more items, containers or nesting than the largest valid status proof
has: a hostile file of tiny maps would otherwise cost some 70 bytes of memory per input byte.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from tlog.errors import MalformedError, TooLargeError
from tlog.merkle import MAX_PROOF_HASHES, MAX_TREE_SIZE
from tlog.note import MAX_NOTE_BYTES
from tlog.tiles import MAX_ENTRY_SIZE

from .index import TYPE_CODES, History, IndexState
from .index_map import HASH_SIZE, MAX_DEPTH, MapProof
from .record import MAX_LABEL, RECORD_TYPES

MAX_STATUS_PROOF_BYTES = 4 << 20
MAX_RECORDS = 1024  # grants, revocations and yanks of one namespace and package
MAX_HISTORY = 1 << 17  # records under one key
_MAX_KEY = 2 * MAX_LABEL + 1

# The largest valid status proof, counted in CBOR data items (each map key and value, each array
# element and each container itself is one), containers and nesting, from the bounds above.
_INCLUDED_ITEMS = 1 + 2 * 3 + MAX_PROOF_HASHES  # the map, its keys and values, the proof's hashes
_KEY_ITEMS = 1 + 2 * 5 + 2 + MAX_DEPTH + MAX_HISTORY  # the map, its keys and values, other's pair, siblings, indexes
# The top map, its 5 keys, v, checkpoint, the keys and records arrays; the root; 2 keys; the records.
MAX_ITEMS = 1 + 5 + 4 + _INCLUDED_ITEMS + 2 * _KEY_ITEMS + MAX_RECORDS * _INCLUDED_ITEMS
MAX_CONTAINERS = 1 + 2 + 1 + 2 * 4 + 1 + MAX_RECORDS * 2  # top; root, its proof; keys, 2 x (map, other, proof, indexes); records, each map and proof
MAX_NESTING = 4  # top map > keys > a key's map > other
MAX_PAIRS = 5  # the largest map: the top one, and a key's
MAX_ARRAY = max(MAX_HISTORY, MAX_RECORDS, MAX_DEPTH, MAX_PROOF_HASHES)  # the longest array


class StatusProofError(MalformedError):
    """A status-proof file that is not as spec/status-proof.md describes."""


@dataclass(frozen=True)
class Included:
    """A log entry at index with its inclusion proof to the status proof's checkpoint."""

    index: int
    entry: bytes
    proof: tuple[bytes, ...]

    def as_cbor(self) -> dict[str, Any]:
        return {"index": self.index, "entry": self.entry, "proof": list(self.proof)}


@dataclass(frozen=True)
class KeyProof:
    """A key's complete history and the map proof of its value hash."""

    key: str
    history: History
    proof: MapProof

    def as_cbor(self) -> dict[str, Any]:
        other = None if self.proof.other is None else list(self.proof.other)
        indexes = [i for i, _ in self.history]
        return {"key": self.key, "other": other, "proof": list(self.proof.siblings), "types": bytes(c for _, c in self.history),
                "indexes": indexes[:1] + list(map(operator.sub, indexes[1:], indexes))}


@dataclass(frozen=True)
class StatusProof:
    checkpoint: bytes
    root: Included  # the index-root record
    namespace: KeyProof
    package: KeyProof
    records: tuple[Included, ...]

    def encode(self) -> bytes:
        return cbor2.dumps({
            "v": 1, "checkpoint": self.checkpoint, "root": self.root.as_cbor(),
            "keys": [self.namespace.as_cbor(), self.package.as_cbor()], "records": [r.as_cbor() for r in self.records],
        }, canonical=True)


def parse_status_proof(data: bytes) -> StatusProof:
    """Parse a status-proof file. Raises StatusProofError (TooLargeError past the size bound)."""
    if len(data) > MAX_STATUS_PROOF_BYTES:
        raise TooLargeError(f"status proof of {len(data)} bytes is over {MAX_STATUS_PROOF_BYTES}")
    scan_heads(data)
    try:
        obj = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as e:
        raise StatusProofError(f"status proof is not CBOR: {e}") from None
    top = _fields(obj, ["v", "keys", "root", "records", "checkpoint"], "status proof")
    if top["v"] != 1 or type(top["v"]) is not int:
        raise StatusProofError("status proof v must be 1")
    checkpoint = _bytes(top["checkpoint"], "checkpoint", MAX_NOTE_BYTES)
    keys = _list(top["keys"], "keys", 2)
    if len(keys) != 2:
        raise StatusProofError("keys holds exactly two: the namespace's, then the package's")
    records = tuple(_included(r, "record") for r in _list(top["records"], "records", MAX_RECORDS))
    if any(a.index >= b.index for a, b in itertools.pairwise(records)):
        raise StatusProofError("records must be in increasing index order")
    proof = StatusProof(checkpoint, _included(top["root"], "root"), _key_proof(keys[0]), _key_proof(keys[1]), records)
    # Every map's keys are in canonical order (_fields) and cbor2 writes shortest forms and definite
    # lengths, so the plain encoder gives the canonical bytes (cheaper than canonical=True's sorting).
    if cbor2.dumps(obj) != data:
        raise StatusProofError("status proof is not canonical CBOR")
    return proof


def scan_heads(data: bytes) -> None:
    """Walk the heads of the one CBOR item that must fill data, without building it: only unsigned
    integers, byte and text strings, arrays, maps and null, definite lengths, and no more items,
    containers, nesting or entries per container than a valid status proof has. A container's
    declared length counts against the bounds at its head, before its items are read."""
    pos, end = 0, len(data)
    items, containers = 1, 0  # items: declared so far
    open_counts: list[int] = []  # items left to read in each enclosing container
    left = 1  # items left to read at this level
    while True:
        while not left:
            if not open_counts:
                if pos != end:
                    raise StatusProofError(f"status proof has {end - pos} bytes after its end")
                return
            left = open_counts.pop()
        left -= 1
        if pos >= end:
            raise StatusProofError("status proof is not CBOR: it ends inside an item")
        at, head = pos, data[pos]
        pos += 1
        if head < 24:  # an unsigned integer in its head (the commonest item: history increases)
            continue
        major, info = head >> 5, head & 31
        if info < 24:
            arg = info
        elif info < 28:
            pos += 1 << (info - 24)
            if pos > end:
                raise StatusProofError("status proof is not CBOR: it ends inside an item's head")
            if major == 0:
                continue
            arg = int.from_bytes(data[at + 1:pos], "big")
        else:
            raise StatusProofError(f"status proof: an indefinite length or reserved head {head:#04x} at byte {at}")
        if major in (2, 3):
            if arg > end - pos:
                raise StatusProofError("status proof is not CBOR: a string runs past its end")
            pos += arg
            continue
        if head == 0xF6:  # null
            continue
        if major not in (4, 5):
            raise StatusProofError(f"status proof: {_KINDS[major]} at byte {at} (only unsigned integers, strings, arrays, maps and null)")
        if (arg > MAX_ARRAY) if major == 4 else (arg > MAX_PAIRS):
            raise StatusProofError(f"status proof: {_KINDS[major]} of {arg} entries, more than any in a valid status proof")
        containers += 1
        items += arg if major == 4 else 2 * arg
        if containers > MAX_CONTAINERS or items > MAX_ITEMS or len(open_counts) >= MAX_NESTING:
            raise StatusProofError(f"status proof has more items, arrays and maps or nesting than a valid one "
                                   f"(at most {MAX_ITEMS} items, {MAX_CONTAINERS} arrays and maps, nested {MAX_NESTING} deep)")
        open_counts.append(left)
        left = arg if major == 4 else 2 * arg


_KINDS = ("an integer", "a negative integer", "a byte string", "a text string", "an array", "a map", "a tag", "a float or simple value")


def _key_proof(obj: object) -> KeyProof:
    d = _fields(obj, ["key", "other", "proof", "types", "indexes"], "a key's proof")
    key = d["key"]
    if type(key) is not str or not 0 < len(key) <= _MAX_KEY:
        raise StatusProofError(f"a key is text of at most {_MAX_KEY} characters")
    gaps = _list(d["indexes"], f"indexes of {key}", MAX_HISTORY)
    codes = d["types"]
    if type(codes) is not bytes or len(codes) != len(gaps) or (codes and max(codes) >= len(RECORD_TYPES)):
        raise StatusProofError(f"the types of {key} are one byte 0..{len(RECORD_TYPES) - 1} per index")
    history: History = ()
    if gaps:  # checked a column at a time (C loops: a history can be long)
        if set(map(type, gaps)) != {int} or gaps[0] < 0 or min(gaps[1:], default=1) < 1:
            raise StatusProofError(f"the indexes of {key} are a log index, then increases of at least 1")
        indexes = tuple(itertools.accumulate(gaps))
        if indexes[-1] >= MAX_TREE_SIZE:
            raise StatusProofError(f"the indexes of {key} go past the largest log index")
        history = tuple(zip(indexes, codes, strict=True))
    siblings = _hashes(d["proof"], f"map proof of {key}", MAX_DEPTH)
    other = d["other"]
    if other is not None:
        pair = _list(other, "other leaf", 2)
        if len(pair) != 2:
            raise StatusProofError("other is [key hash, value hash] or null")
        other = (_hash(pair[0], "other key hash"), _hash(pair[1], "other value hash"))
    return KeyProof(key, history, MapProof(siblings, other))


def _included(obj: object, what: str) -> Included:
    d = _fields(obj, ["entry", "index", "proof"], what)
    if not _is_index(d["index"]):
        raise StatusProofError(f"{what} index must be a log index")
    entry = _bytes(d["entry"], f"{what} entry", MAX_ENTRY_SIZE)
    return Included(d["index"], entry, _hashes(d["proof"], f"{what} proof", MAX_PROOF_HASHES))


def _is_index(v: object) -> bool:
    return type(v) is int and 0 <= v < MAX_TREE_SIZE


def _fields(obj: object, names: list[str], what: str) -> dict[str, Any]:
    """obj is a map of exactly these keys, in this (canonical: shorter first, then bytewise) order."""
    if type(obj) is not dict or list(obj) != names:
        if type(obj) is dict and obj.keys() == set(names):
            raise StatusProofError(f"{what}: keys not in canonical order")
        raise StatusProofError(f"{what} must have exactly the fields {', '.join(sorted(names))}")
    return obj


def _list(obj: object, what: str, limit: int) -> list[Any]:
    if type(obj) is not list or len(obj) > limit:
        raise StatusProofError(f"{what} must be a list of at most {limit}")
    return obj


def _bytes(obj: object, what: str, limit: int) -> bytes:
    if type(obj) is not bytes or not 0 < len(obj) <= limit:
        raise StatusProofError(f"{what} must be 1 to {limit} bytes")
    return obj


def _hashes(obj: object, what: str, limit: int) -> tuple[bytes, ...]:
    """A list of at most limit hashes (checked a column at a time)."""
    hashes = _list(obj, what, limit)
    if hashes and (set(map(type, hashes)) != {bytes} or set(map(len, hashes)) != {HASH_SIZE}):
        raise StatusProofError(f"{what} must be a list of {HASH_SIZE}-byte hashes")
    return tuple(hashes)


def _hash(obj: object, what: str) -> bytes:
    if type(obj) is not bytes or len(obj) != HASH_SIZE:
        raise StatusProofError(f"{what} must be {HASH_SIZE} bytes")
    return obj


# The records a status proof carries: revocations and yanks (what can make a release refused). Grants
# and releases are listed in the histories but not carried: a status proof stays small, and a void
# revocation or yank can only make a verifier refuse more, never accept more.
CARRIED = frozenset({TYPE_CODES["key-revocation"], TYPE_CODES["yank"]})


def build_status_proof(
    *, index: IndexState, checkpoint: bytes, root: Included, namespace: str, name: str,
    included: Callable[[Sequence[int]], list[Included]],
) -> StatusProof:
    """The status proof of namespace:name from the index committed by the index-root record
    `root` (index: the index as of that record's size); included(indexes) reads those entries
    with their inclusion proofs to the checkpoint."""
    package = f"{namespace}:{name}"
    ns_history, pkg_history = index.history(namespace), index.history(package)
    needed = sorted({i for i, code in (*ns_history, *pkg_history) if code in CARRIED})
    return StatusProof(checkpoint, root, KeyProof(namespace, ns_history, index.prove(namespace)),
                       KeyProof(package, pkg_history, index.prove(package)), tuple(included(needed)))
