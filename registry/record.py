"""Release statements, actions and the log entry that carries them. Pure.

A log entry is deterministic CBOR (text keys, canonical encoding):

    {"v": 1, "type": "release" | "key-grant" | "key-revocation" | "yank",
     "signer": <publisher vkey>,
     "envelope": {"payloadType": str, "payload": bytes,
                  "signatures": [{"keyid": str, "sig": bytes}, ...]}}

A release carries an in-toto Statement v1; the other types carry a wasmlog
action. See spec/registry.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import cbor2

from tlog.errors import MalformedError, TooLargeError
from tlog.note import (
    OWN_KEY_NAME_RULE,
    Ed25519Verifier,
    is_own_key_name,
    verifier_from_vkey,
)
from tlog.syntax import decimal, lower_hex
from tlog.tiles import MAX_ENTRY_SIZE

from .dsse import (
    ACTION_PAYLOAD_TYPE,
    INTOTO_PAYLOAD_TYPE,
    Envelope,
    Signature,
    strict_json,
)
from .wasm import Import, WasmInfo, parse_wasm

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://wasmlog.dev/release/v1"
RECORD_TYPES = ("release", "key-grant", "key-revocation", "yank")
ACTIONS = ("key-grant", "key-revocation", "yank")
SBOM_MEDIA_TYPES = ("application/vnd.cyclonedx+json", "application/spdx+json")
IMPORT_KINDS = ("func", "table", "memory", "global", "tag", "module", "value", "type", "component", "instance")
MAX_IMPORTS = 4096  # keeps a release inside one 64 KiB log entry

_LABEL = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # component-model kebab-case label
# semver 2.0.0 (semver.org's regex, without build metadata): numbers are decimals without leading zeros
_NUMBER = decimal()
_PRERELEASE_ID = f"(?:{_NUMBER}|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
_SEMVER = re.compile(rf"({_NUMBER})\.({_NUMBER})\.({_NUMBER})(?:-({_PRERELEASE_ID}(?:\.{_PRERELEASE_ID})*))?", re.ASCII)
_SHA256_HEX = lower_hex(64)
_HEX64 = re.compile(_SHA256_HEX)
MAX_LABEL = 64
MAX_VERSION = 64
# A release's subject name, namespace:name@version, split and checked in one match.
_SUBJECT_NAME = re.compile(f"(?P<namespace>{_LABEL.pattern}):(?P<name>{_LABEL.pattern})@(?P<version>{_SEMVER.pattern})", re.ASCII)


class RecordError(MalformedError):
    """A statement, action or log entry that does not follow spec/registry.md (HTTP 422)."""


class PackageRef(NamedTuple):
    """``namespace:name@version``."""

    namespace: str
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.namespace}:{self.name}@{self.version}"


def check_label(s: object, what: str) -> str:
    if not isinstance(s, str) or len(s) > MAX_LABEL or not _LABEL.fullmatch(s):
        raise RecordError(f"{what} must be a kebab-case label (a-z, 0-9, '-'), at most {MAX_LABEL} characters")
    return s


def check_version(s: object) -> str:
    if not isinstance(s, str) or len(s) > MAX_VERSION or not _SEMVER.fullmatch(s):
        raise RecordError("version must be a semantic version (MAJOR.MINOR.PATCH[-pre])")
    return s


def parse_package_ref(s: str) -> PackageRef:
    """Parse ``namespace:name@version``. Raises RecordError."""
    ns, colon, rest = s.partition(":")
    name, at, version = rest.partition("@")
    if not colon or not at:
        raise RecordError(f"want NAMESPACE:NAME@VERSION, got {s[:100]!r}")
    return PackageRef(check_label(ns, "namespace"), check_label(name, "name"), check_version(version))


def check_digest(obj: object, what: str) -> str:
    if type(obj) is not dict or obj.keys() != {"sha256"} or type(obj["sha256"]) is not str or not _HEX64.fullmatch(obj["sha256"]):
        raise RecordError(f"{what} must be {{\"sha256\": <64 lowercase hex>}}")
    return obj["sha256"]


def _exact_keys(obj: object, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
    if type(obj) is not dict or not required <= obj.keys() <= required | optional:
        raise RecordError(f"{what} must have the fields {sorted(required)} (optional {sorted(optional)})")
    return obj


class Release(NamedTuple):
    """The predicate of a release statement, with its subject digest."""

    ref: PackageRef
    module_sha256: str
    imports: tuple[Import, ...]
    sbom_sha256: str | None = None
    sbom_media_type: str | None = None

    def statement(self) -> bytes:
        """The in-toto Statement v1 JSON payload (fixed key order, compact)."""
        predicate: dict[str, Any] = {
            "namespace": self.ref.namespace,
            "name": self.ref.name,
            "version": self.ref.version,
            "imports": [{"module": i.module, "name": i.name, "kind": i.kind} for i in self.imports],
        }
        if self.sbom_sha256 is not None:
            predicate["sbom"] = {"digest": {"sha256": self.sbom_sha256}, "mediaType": self.sbom_media_type}
        obj = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": str(self.ref), "digest": {"sha256": self.module_sha256}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": predicate,
        }
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_STATEMENT_KEYS = frozenset({"_type", "subject", "predicateType", "predicate"})
_SUBJECT_KEYS = frozenset({"name", "digest"})
_PREDICATE_KEYS = frozenset({"namespace", "name", "version", "imports"})
_PREDICATE_SBOM_KEYS = _PREDICATE_KEYS | {"sbom"}
_IMPORT_KEYS = frozenset({"module", "name", "kind"})
_IMPORT_KIND_SET = frozenset(IMPORT_KINDS)


# The compact statement Release.statement() writes, with no escapes in its strings, in one match.
_JSON_CHARS = r'[^"\\\x00-\x1f]*'  # a JSON string's characters when it has no escapes (those need the general parser)
_IMPORT_JSON = rf'\{{"module":"{_JSON_CHARS}","name":"{_JSON_CHARS}","kind":"[a-z]+"\}}'
_IMPORT_FIELDS = re.compile(rf'\{{"module":"({_JSON_CHARS})","name":"({_JSON_CHARS})","kind":"([a-z]+)"\}}')
_COMPACT_STATEMENT = re.compile(
    rf'\{{"_type":"https://in-toto\.io/Statement/v1","subject":\[\{{"name":"({_JSON_CHARS})","digest":\{{"sha256":"({_SHA256_HEX})"\}}\}}\],'
    rf'"predicateType":"https://wasmlog\.dev/release/v1","predicate":\{{"namespace":"({_JSON_CHARS})","name":"({_JSON_CHARS})",'
    rf'"version":"({_JSON_CHARS})","imports":\[((?:{_IMPORT_JSON}(?:,{_IMPORT_JSON})*)?)\]'
    rf'(?:,"sbom":\{{"digest":\{{"sha256":"({_SHA256_HEX})"\}},"mediaType":"({_JSON_CHARS})"\}})?\}}\}}'
)


def parse_statement(payload: bytes) -> Release:
    """Parse a release statement. Raises RecordError."""
    try:
        m = _COMPACT_STATEMENT.fullmatch(payload.decode("utf-8"))
    except UnicodeDecodeError:
        m = None
    if m is not None:  # the common case; the general parser decides anything this does not take
        subject_name, digest, namespace, name, version, imports_json, sbom_sha256, sbom_media_type = m.groups()
        ref = _SUBJECT_NAME.fullmatch(subject_name)
        imports = tuple(map(Import._make, _IMPORT_FIELDS.findall(imports_json)))
        if ref is not None and ref.group("namespace", "name", "version") == (namespace, name, version) \
                and len(namespace) <= MAX_LABEL and len(name) <= MAX_LABEL and len(version) <= MAX_VERSION \
                and len(imports) <= MAX_IMPORTS and all(i.kind in _IMPORT_KIND_SET for i in imports) \
                and (sbom_sha256 is None or sbom_media_type in SBOM_MEDIA_TYPES):
            return Release(PackageRef(namespace, name, version), digest, imports, sbom_sha256, sbom_media_type)
    return _parse_statement_generally(payload)


def _parse_statement_generally(payload: bytes) -> Release:
    """parse_statement for any JSON layout: the reference, and the precise reason for a refusal."""
    obj = strict_json(payload, "statement")
    if type(obj) is not dict or obj.keys() != _STATEMENT_KEYS:
        raise RecordError(f"statement must have the fields {sorted(_STATEMENT_KEYS)}")
    if obj["_type"] != STATEMENT_TYPE or obj["predicateType"] != PREDICATE_TYPE:
        raise RecordError(f"want _type {STATEMENT_TYPE} and predicateType {PREDICATE_TYPE}")
    subjects = obj["subject"]
    if type(subjects) is not list or len(subjects) != 1:
        raise RecordError("a release statement has exactly one subject: the module")
    subject = subjects[0]
    if type(subject) is not dict or subject.keys() != _SUBJECT_KEYS:
        raise RecordError(f"subject must have the fields {sorted(_SUBJECT_KEYS)}")
    pred = obj["predicate"]
    if type(pred) is not dict or not (pred.keys() == _PREDICATE_KEYS or pred.keys() == _PREDICATE_SBOM_KEYS):
        raise RecordError(f"predicate must have the fields {sorted(_PREDICATE_KEYS)} (optional ['sbom'])")
    m = _SUBJECT_NAME.fullmatch(subject["name"]) if type(subject["name"]) is str else None
    if m is not None and m.group("namespace", "name", "version") == (pred["namespace"], pred["name"], pred["version"]) \
            and len(m["namespace"]) <= MAX_LABEL and len(m["name"]) <= MAX_LABEL and len(m["version"]) <= MAX_VERSION:
        ref = PackageRef(m["namespace"], m["name"], m["version"])  # the common case: the fields and the subject agree
    else:
        ref = PackageRef(check_label(pred["namespace"], "namespace"), check_label(pred["name"], "name"), check_version(pred["version"]))
        if subject["name"] != str(ref):
            raise RecordError(f"subject name {str(subject['name'])[:100]!r} is not {ref}")
    imports_raw = pred["imports"]
    if type(imports_raw) is not list or len(imports_raw) > MAX_IMPORTS:
        raise RecordError(f"imports must be a list of at most {MAX_IMPORTS}")
    imports = []
    for d in imports_raw:
        if type(d) is not dict or d.keys() != _IMPORT_KEYS or type(d["module"]) is not str or type(d["name"]) is not str \
                or d["kind"] not in _IMPORT_KIND_SET:
            raise RecordError("an import is {module: str, name: str, kind: one of " + ", ".join(IMPORT_KINDS) + "}")
        imports.append(Import(d["module"], d["name"], d["kind"]))
    sbom_sha256 = sbom_media_type = None
    if "sbom" in pred:
        sbom = _exact_keys(pred["sbom"], {"digest", "mediaType"}, set(), "sbom")
        sbom_sha256 = check_digest(sbom["digest"], "sbom digest")
        if sbom["mediaType"] not in SBOM_MEDIA_TYPES:
            raise RecordError(f"sbom mediaType must be one of {', '.join(SBOM_MEDIA_TYPES)}")
        sbom_media_type = sbom["mediaType"]
    return Release(ref, check_digest(subject["digest"], "subject digest"), tuple(imports), sbom_sha256, sbom_media_type)


@dataclass(frozen=True)
class Action:
    """A key grant, key revocation or yank, signed by an authorized key of the namespace."""

    action: str
    namespace: str
    key: str | None = None  # vkey, for grants and revocations
    name: str | None = None  # for yanks
    version: str | None = None
    issued: int = 0  # POSIX seconds: makes a repeated decision a distinct entry
    reason: str = ""

    def payload(self) -> bytes:
        obj: dict[str, Any] = {"action": self.action, "namespace": self.namespace, "issued": self.issued}
        if self.action == "yank":
            obj.update(name=self.name, version=self.version, reason=self.reason)
        else:
            obj["key"] = self.key
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def ref(self) -> PackageRef:
        assert self.name is not None and self.version is not None
        return PackageRef(self.namespace, self.name, self.version)


def parse_action(payload: bytes) -> Action:
    obj = strict_json(payload, "action")
    if not isinstance(obj, dict) or obj.get("action") not in ACTIONS:
        raise RecordError(f"action must be one of {', '.join(ACTIONS)}")
    if obj["action"] == "yank":
        d = _exact_keys(obj, {"action", "namespace", "name", "version", "issued", "reason"}, set(), "yank")
        if not isinstance(d["reason"], str) or len(d["reason"]) > 1024:
            raise RecordError("yank reason must be a string of at most 1024 characters")
        action = Action("yank", check_label(d["namespace"], "namespace"), None, check_label(d["name"], "name"),
                        check_version(d["version"]), _issued(d["issued"]), d["reason"])
    else:
        d = _exact_keys(obj, {"action", "namespace", "key", "issued"}, set(), str(obj["action"]))
        if not isinstance(d["key"], str):
            raise RecordError("key must be a vkey")
        publisher_key(d["key"], "key")
        action = Action(d["action"], check_label(d["namespace"], "namespace"), d["key"], issued=_issued(d["issued"]))
    return action


def publisher_key(vkey: str, what: str) -> Ed25519Verifier:
    """The verifier of a publisher vkey: an Ed25519 note key whose name follows our policy
    (is_own_key_name: printable ASCII, so a name prints as itself). Raises RecordError."""
    verifier = verifier_from_vkey(vkey)
    if not is_own_key_name(verifier.name):
        raise RecordError(f"{what}: {OWN_KEY_NAME_RULE}, not {verifier.name[:80]!r}")
    return verifier


def _issued(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise RecordError("issued must be a non-negative integer (POSIX seconds)")
    return v


@dataclass(frozen=True)
class Record:
    """A decoded log entry. body is the parsed payload (Release or Action)."""

    type: str
    signer: str
    envelope: Envelope
    body: Release | Action

    @property
    def namespace(self) -> str:
        return self.body.ref.namespace if isinstance(self.body, Release) else self.body.namespace

    @functools.cached_property
    def signer_verifier(self) -> Ed25519Verifier:
        return verifier_from_vkey(self.signer)

    @functools.cached_property
    def signed_by_signer(self) -> bool:
        """Whether the envelope verifies with the signer's key (computed once per record)."""
        return self.envelope.verified_by(self.signer_verifier)

    @functools.cached_property
    def entry(self) -> bytes:
        """The log entry bytes (computed once per record)."""
        return encode_entry(self.type, self.signer, self.envelope)

    def encode(self) -> bytes:
        return self.entry


def encode_entry(record_type: str, signer: str, envelope: Envelope) -> bytes:
    """The deterministic CBOR of a record (spec/registry.md).

    Keys are inserted in deterministic order (shorter first, then bytewise), so the plain
    encoder, which always writes shortest forms and definite lengths, gives exactly what
    cbor2.dumps(..., canonical=True) gives, without sorting (tests/test_record.py checks).
    """
    obj = {
        "v": 1,
        "type": record_type,
        "signer": signer,
        "envelope": {
            "payload": envelope.payload,
            "signatures": [{"sig": s.sig, "keyid": s.keyid} for s in envelope.signatures],
            "payloadType": envelope.payload_type,
        },
    }
    data = cbor2.dumps(obj)
    if len(data) > MAX_ENTRY_SIZE:
        raise TooLargeError(f"log entry of {len(data)} bytes is over {MAX_ENTRY_SIZE}")
    return data


def record_for(record_type: str, signer: str, envelope: Envelope) -> Record:
    """Check that the envelope's payload is what record_type says and parse it. Raises RecordError.

    A record carries exactly one signature, with the signer's key ID as its keyid: keyids are
    not signed, so fixing them is what makes one signed statement one entry, byte for byte.
    """
    keyid = _keyid(record_type, signer)
    if len(envelope.signatures) != 1:
        raise RecordError("a record's envelope carries exactly one signature, by its signer")
    envelope = Envelope(envelope.payload_type, envelope.payload, (Signature(keyid, envelope.signatures[0].sig),))
    return Record(record_type, signer, envelope, _body(record_type, envelope))


def _keyid(record_type: str, signer: str) -> str:
    """The keyid a record's one signature carries: the signer's key ID. Raises RecordError."""
    if record_type not in RECORD_TYPES:
        raise RecordError(f"unknown record type {record_type[:40]!r}")
    return publisher_key(signer, "signer").key_id_hex


def _body(record_type: str, envelope: Envelope) -> Release | Action:
    if record_type == "release":
        if envelope.payload_type != INTOTO_PAYLOAD_TYPE:
            raise RecordError(f"a release is signed as {INTOTO_PAYLOAD_TYPE}")
        return parse_statement(envelope.payload)
    if envelope.payload_type != ACTION_PAYLOAD_TYPE:
        raise RecordError(f"a {record_type} is signed as {ACTION_PAYLOAD_TYPE}")
    body = parse_action(envelope.payload)
    if body.action != record_type:
        raise RecordError(f"the payload is a {body.action}, not a {record_type}")
    return body


# Deterministic key order (shorter keys first, then bytewise), which decode_entry requires.
_ENTRY_KEYS = ["v", "type", "signer", "envelope"]
_ENVELOPE_KEYS = ["payload", "signatures", "payloadType"]
_SIGNATURE_KEYS = ["sig", "keyid"]


def _fields_error(obj: object, keys: list[str], what: str) -> RecordError:
    """Why a CBOR map does not have exactly these keys in this order."""
    if type(obj) is dict and obj.keys() == set(keys):
        return RecordError("log entry is not canonical CBOR")
    return RecordError(f"{what} must have the fields {sorted(keys)}")


class _NotCanonicalLayout(Exception):
    """The bytes are not the one canonical layout _read_canonical_entry reads (the general decoder decides)."""


# The canonical layout as (fixed bytes, then a string whose head has this major type: 0x40 bytes,
# 0x60 text): see _read_canonical_entry.
_LAYOUT = (
    (b"\xa4\x61v\x01\x64type", 0x60),
    (b"\x66signer", 0x60),
    (b"\x68envelope\xa3\x67payload", 0x40),
    (b"\x6asignatures\x81\xa2\x63sig", 0x40),
    (b"\x65keyid", 0x60),
    (b"\x6bpayloadType", 0x60),
)


def _read_canonical_entry(data: bytes) -> tuple[str, str, bytes, bytes, str, str]:
    """(type, signer, payload, sig, keyid, payloadType) of an entry in the one canonical layout of
    spec/registry.md with one signature, read without a general CBOR decoder:

        A4 61"v" 01 64"type" tstr 66"signer" tstr 68"envelope" A3 67"payload" bstr
        6A"signatures" 81 A2 63"sig" bstr 65"keyid" tstr 6B"payloadType" tstr

    with every head in its shortest form. Raises _NotCanonicalLayout (or IndexError,
    UnicodeDecodeError) for anything else, which the general decoder then judges.
    """
    pos = 0
    strings = []
    for fixed, head_type in _LAYOUT:
        if not data.startswith(fixed, pos):
            raise _NotCanonicalLayout
        # A definite-length string with a shortest-form head. Lengths of 65,536 or more cannot
        # occur in an entry (MAX_ENTRY_SIZE), so 1- and 2-byte lengths suffice.
        pos += len(fixed)
        info = data[pos] - head_type
        if 0 <= info < 24:
            start = pos + 1
            pos = start + info
        elif info == 24 and data[pos + 1] >= 24:
            start = pos + 2
            pos = start + data[pos + 1]
        elif info == 25 and data[pos + 1]:  # the high byte is non-zero: the length needs two bytes
            start = pos + 3
            pos = start + (data[pos + 1] << 8 | data[pos + 2])
        else:
            raise _NotCanonicalLayout
        strings.append(data[start:pos])
    if pos != len(data):  # also when a string ran past the end
        raise _NotCanonicalLayout
    record_type, signer, payload, sig, keyid, payload_type = strings
    return record_type.decode(), signer.decode(), payload, sig, keyid.decode(), payload_type.decode()


def decode_entry(data: bytes) -> Record:
    """Decode a log entry strictly: canonical CBOR only, then the record rules. Raises RecordError."""
    if len(data) > MAX_ENTRY_SIZE:
        raise TooLargeError("log entry too large")
    try:
        fields = _read_canonical_entry(data)
    except (_NotCanonicalLayout, IndexError, UnicodeDecodeError):
        fields = _read_entry_generally(data)
    record_type, signer, payload, sig, keyid, payload_type = fields
    if keyid != _keyid(record_type, signer):
        raise RecordError("the signature's keyid is not the signer's key ID")
    envelope = Envelope(payload_type, payload, (Signature(keyid, sig),))
    return Record(record_type, signer, envelope, _body(record_type, envelope))


def _read_entry_generally(data: bytes) -> tuple[str, str, bytes, bytes, str, str]:
    """_read_canonical_entry's fields with cbor2: the reference for any layout, and the precise
    reason for a refusal. Raises RecordError."""
    try:
        obj = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as e:
        raise RecordError(f"log entry is not CBOR: {e}") from None
    # Every value's type is checked (exact types: no bool for int, no tags, floats or simple
    # values), every map's keys in deterministic order. Such a value re-encodes by the plain
    # encoder to exactly the canonical bytes, so one comparison then rejects duplicates,
    # indefinite lengths, long integers and tags that decode to plain types alike.
    if type(obj) is not dict or list(obj) != _ENTRY_KEYS:
        raise _fields_error(obj, _ENTRY_KEYS, "log entry")
    v, record_type, signer, env = obj.values()
    if type(v) is not int or v != 1 or type(record_type) is not str or type(signer) is not str:
        raise RecordError("log entry v must be 1, type and signer text")
    if type(env) is not dict or list(env) != _ENVELOPE_KEYS:
        raise _fields_error(env, _ENVELOPE_KEYS, "envelope")
    payload, sigs, payload_type = env.values()
    if type(payload_type) is not str or type(payload) is not bytes or type(sigs) is not list or not sigs:
        raise RecordError("malformed envelope in log entry")
    signatures = []
    for s in sigs:
        if type(s) is not dict or list(s) != _SIGNATURE_KEYS:
            raise _fields_error(s, _SIGNATURE_KEYS, "signature")
        sig, keyid = s.values()
        if type(keyid) is not str or type(sig) is not bytes:
            raise RecordError("malformed signature in log entry")
        signatures.append(Signature(keyid, sig))
    if cbor2.dumps(obj) != data:
        raise RecordError("log entry is not canonical CBOR")
    if len(signatures) != 1:
        raise RecordError("a record's envelope carries exactly one signature, by its signer")
    return record_type, signer, payload, signatures[0].sig, signatures[0].keyid, payload_type


INDEX_ROOT = "index-root"
_INDEX_ROOT_KEYS = ["v", "root", "size", "type", "origin"]  # deterministic order: shorter first, then bytewise
_INDEX_ROOT_HEAD = b"\xa5\x61v\x01\x64root\x58\x20"  # every index-root entry starts so; a namespace record never does


class IndexRoot(NamedTuple):
    """An index-root record (spec/registry.md): the registry's verifiable index, a map whose
    root is `root`, as of the log's first `size` entries, in the log named `origin`."""

    origin: str
    size: int
    root: bytes

    def encode(self) -> bytes:
        return cbor2.dumps({"v": 1, "root": self.root, "size": self.size, "type": INDEX_ROOT, "origin": self.origin})


def is_index_root(data: bytes) -> bool:
    """Whether an entry claims to be an index-root record (decode it with decode_index_root)."""
    return data.startswith(_INDEX_ROOT_HEAD)


def decode_index_root(data: bytes) -> IndexRoot:
    """Decode an index-root entry strictly: canonical CBOR with exactly its fields. Raises RecordError."""
    if len(data) > 1024 or not is_index_root(data):
        raise RecordError("not an index-root record")
    try:
        obj = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as e:
        raise RecordError(f"index-root record is not CBOR: {e}") from None
    if type(obj) is not dict or list(obj) != _INDEX_ROOT_KEYS:
        raise _fields_error(obj, _INDEX_ROOT_KEYS, "index-root record")
    v, root, size, record_type, origin = obj.values()
    if type(v) is not int or v != 1 or record_type != INDEX_ROOT or type(root) is not bytes or len(root) != 32 \
            or type(size) is not int or not 0 <= size < 2**63 or type(origin) is not str or not origin:
        raise RecordError("index-root record: v 1, root 32 bytes, size a log size, origin text")
    if cbor2.dumps(obj) != data:
        raise RecordError("index-root record is not canonical CBOR")
    return IndexRoot(origin, size, root)


def module_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



class ModuleDigestMismatch(RecordError):
    """A module (or SBOM) whose SHA-256 is not the digest its release statement names."""


class ImportsMismatch(RecordError):
    """A module whose imports are not exactly the import list its release statement names."""


def check_module(release: Release, module: bytes) -> WasmInfo:
    """The one module-checking rule (publish, edge verification, audit, mirror): the module's SHA-256
    is the release's subject digest, and it is well-formed WebAssembly whose imports are exactly
    the statement's list, in order. Returns what parse_wasm read.

    Raises ModuleDigestMismatch, WasmError or TooLargeError (not wasm), ImportsMismatch.
    """
    check_module_digest(release, module)
    info = parse_wasm(module)
    if info.imports != release.imports:  # tuples of Import
        raise ImportsMismatch("the statement's import list is not exactly the module's imports")
    return info


def check_module_digest(release: Release, module: bytes) -> str:
    """The first half of check_module (for blobs whose wasm was already checked): return the digest."""
    digest = module_digest(module)
    if digest != release.module_sha256:
        raise ModuleDigestMismatch(f"the module's SHA-256 {digest} is not the statement's subject digest {release.module_sha256}")
    return digest
