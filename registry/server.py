"""The registry's HTTP API (spec/registry-api.md), with the log's API mounted under /log/."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import cbor2
from aiohttp import web

from tlog.addipc import ForwardedError
from tlog.checkpoint import parse_decimal
from tlog.errors import (
    BodyTimeoutError,
    MalformedError,
    NotFoundError,
    PushbackError,
    StorageFullError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)
from tlog.httplimits import body_limit, send_file
from tlog.metrics import install
from tlog.note import b64encode
from tlog.policy import Policy
from tlog.sequencer import Sequencer
from tlog.server import RETRY_AFTER_SECONDS, errors_middleware_for
from tlog.server import make_app as make_log_app
from tlog.witnessing import QuorumError

from .dsse import MAX_ENVELOPE_BYTES, strict_json
from .record import RecordError, check_label, decode_entry, parse_package_ref
from .sbom import MAX_SBOM_BYTES
from .service import NotYetPublished, Registry
from .state import ValidationError
from .wasm import MAX_MODULE_BYTES, WasmError

REGISTRY = web.AppKey("registry", Registry)
MAX_PUBLISH_BYTES = MAX_MODULE_BYTES + MAX_SBOM_BYTES + MAX_ENVELOPE_BYTES + (64 << 10)
MAX_RECORD_BYTES = MAX_ENVELOPE_BYTES + (16 << 10)  # POST /api/v1/records: an action's envelope, its type and signer

# Every error maps to one status here; subclasses come before their bases.
STATUS: list[tuple[type[TlogError], int]] = [
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (RecordError, 422),
    (WasmError, 422),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (NotFoundError, 404),
    (PushbackError, 503),
    (QuorumError, 503),
    (NotYetPublished, 503),
    (StorageFullError, 507),
    (TlogError, 500),
]


def status_for(e: TlogError) -> int:
    if isinstance(e, (ValidationError, ForwardedError)):
        return e.status
    return next(status for cls, status in STATUS if isinstance(e, cls))


def error_body(e: TlogError) -> bytes:
    return json.dumps({"error": type(e).__name__, "message": str(e)}).encode()


def registry_error_response(e: TlogError) -> web.Response:
    status = status_for(e)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    if isinstance(e, ForwardedError) and e.body is not None:  # the registry process's own reply
        return web.Response(body=e.body, status=status, headers=headers, content_type="application/json")
    return web.Response(body=error_body(e), status=status, headers=headers, content_type="application/json")


registry_errors_middleware = errors_middleware_for(registry_error_response)


async def read_parts(request: web.Request, limits: dict[str, int]) -> dict[str, bytes]:
    """Read a multipart/form-data body with only the named parts, each within its limit."""
    if not request.content_type.startswith("multipart/"):
        raise MalformedError("want multipart/form-data")
    parts: dict[str, bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        name = getattr(part, "name", None)
        if name not in limits or name in parts:
            raise MalformedError(f"unexpected or repeated part {str(name)[:40]!r}")
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):  # type: ignore[union-attr]
            data += chunk
            if len(data) > limits[name]:
                raise TooLargeError(f"part {name} is over {limits[name]} bytes")
        parts[name] = bytes(data)
    return parts


def part_text(parts: dict[str, bytes], name: str) -> str:
    try:
        return parts[name].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        raise MalformedError(f"missing or non-UTF-8 part {name}") from None


PUBLISH_PARTS = {"signer": 1024, "envelope": MAX_ENVELOPE_BYTES, "module": MAX_MODULE_BYTES, "sbom": MAX_SBOM_BYTES}


async def read_cbor_parts(request: web.Request, limits: dict[str, int]) -> dict[str, bytes]:
    """Read an application/cbor body: one map of the named parts (text keys, byte-string values)."""
    body = await request.read()
    try:
        obj = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError):
        raise MalformedError("publish body is not CBOR") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and k in limits and isinstance(v, bytes) for k, v in obj.items()):
        raise MalformedError(f"a CBOR publish body is a map of byte strings named {', '.join(limits)}")
    for k, v in obj.items():
        if len(v) > limits[k]:
            raise TooLargeError(f"part {k} is over {limits[k]} bytes")
    return obj


async def read_publish_parts(request: web.Request) -> dict[str, bytes]:
    """The parts of a publish: CBOR (what the CLI sends: cheap to parse) or multipart/form-data (curl)."""
    if request.content_type == "application/cbor":
        parts = await read_cbor_parts(request, PUBLISH_PARTS)
    else:
        parts = await read_parts(request, PUBLISH_PARTS)
    if "envelope" not in parts or "module" not in parts:
        raise MalformedError("publish needs the parts signer, envelope and module (and sbom when the statement names one)")
    return parts


async def publish(request: web.Request) -> web.Response:
    parts = await read_publish_parts(request)
    proof = await request.app[REGISTRY].publish(
        signer=part_text(parts, "signer"), envelope=parts["envelope"], module=parts["module"], sbom=parts.get("sbom")
    )
    return web.Response(body=proof, content_type="text/plain")


async def post_record(request: web.Request) -> web.Response:
    obj = strict_json(await request.read(), "record request")  # bounded: MAX_RECORD_BYTES, nesting, no duplicate keys
    try:
        record_type, signer, envelope = obj["type"], obj["signer"], obj["envelope"]  # type: ignore[index]
        if not isinstance(record_type, str) or not isinstance(signer, str) or not isinstance(envelope, dict) or len(obj) != 3:  # type: ignore[arg-type]
            raise TypeError
    except (KeyError, TypeError):
        raise MalformedError('want {"type": ..., "signer": <vkey>, "envelope": <DSSE envelope>}') from None
    proof = await request.app[REGISTRY].act(record_type=record_type, signer=signer, envelope=json.dumps(envelope).encode())
    return web.Response(body=proof, content_type="text/plain")


def _ref(request: web.Request) -> Any:
    m = request.match_info
    return parse_package_ref(f"{m['ns']}:{m['name']}@{m['version']}")


async def get_namespace(request: web.Request) -> web.Response:
    ns_name = check_label(request.match_info["ns"], "namespace")
    ns = request.app[REGISTRY].namespace(ns_name)
    packages: dict[str, list[str]] = {}
    for key in ns.in_log_order():
        name, version = key.split("@", 1)
        packages.setdefault(name, []).append(version)
    return web.json_response(
        {"namespace": ns_name, "keys": sorted(ns.keys), "revoked": dict(ns.revoked), "packages": packages}
    )


async def get_actions(request: web.Request) -> web.Response:
    """tlog-proofs of the namespace's key revocations and yanks, for verifiers refreshing online."""
    registry = request.app[REGISTRY]
    ns = registry.namespace(check_label(request.match_info["ns"], "namespace"))
    indexes = sorted({*ns.revoked.values(), *(r.yanked_at for r in ns.releases.values() if r.yanked_at is not None)})
    proofs = [await asyncio.to_thread(registry.tlog_proof, i) for i in indexes]
    return web.json_response({"proofs": [p.decode() for p, _ in proofs]})


async def get_versions(request: web.Request) -> web.Response:
    ns_name = check_label(request.match_info["ns"], "namespace")
    name = check_label(request.match_info["name"], "name")
    ns = request.app[REGISTRY].namespace(ns_name)
    versions = ns.versions(name)
    if not versions:
        raise NotFoundError(f"{ns_name}:{name} has no releases")
    return web.json_response({"package": f"{ns_name}:{name}", "versions": versions})


async def get_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].metadata(_ref(request)))


async def get_module(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    digest = registry.release(_ref(request)).release.module_sha256
    f = await asyncio.to_thread(registry.blobs.open, digest)
    return await send_file(request, f, {"Content-Type": "application/wasm", "Cache-Control": "public, max-age=31536000, immutable"})


async def get_sbom(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    rel = registry.release(_ref(request)).release
    if rel.sbom_sha256 is None or rel.sbom_media_type is None:
        raise NotFoundError("this release has no SBOM")
    f = await asyncio.to_thread(registry.blobs.open, rel.sbom_sha256)
    return await send_file(request, f, {"Content-Type": rel.sbom_media_type})


async def get_statement(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    entry = await asyncio.to_thread(registry.entry, registry.release(_ref(request)).index)
    return web.Response(body=decode_entry(entry).envelope.to_json(), content_type="application/json")


async def get_proof(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    index = registry.release(_ref(request)).index
    old = request.query.get("old")
    proof, consistency = await asyncio.to_thread(registry.tlog_proof, index, None if old is None else parse_decimal(old, "old"))
    if old is None:
        return web.Response(body=proof, content_type="text/plain")
    return web.json_response(
        {"tlog_proof": proof.decode(), "old_size": int(old), "consistency_proof": [b64encode(h) for h in consistency]}
    )


def make_app(
    registry: Registry, sequencer: Sequencer, *, witness_policy: Policy | None = None, witness_timeout: float = 5.0,
    max_checkpoint_age: float | None = None, read_only: bool = False,
) -> web.Application:
    """The registry app. read_only leaves out publishing and records (a mirror)."""
    app = web.Application(middlewares=[registry_errors_middleware])  # body limits are per route (body_limit)
    app[REGISTRY] = registry
    base = "/api/v1"
    pkg = base + "/packages/{ns}/{name}/{version}"
    if not read_only:
        app.router.add_routes([
            web.post(base + "/publish", body_limit(MAX_PUBLISH_BYTES, publish, compressed=False)),
            web.post(base + "/records", body_limit(MAX_RECORD_BYTES, post_record)),
        ])
    app.router.add_routes(
        [
            web.get(base + "/namespaces/{ns}", get_namespace),
            web.get(base + "/namespaces/{ns}/actions", get_actions),
            web.get(base + "/packages/{ns}/{name}", get_versions),
            web.get(pkg, get_metadata),
            web.get(pkg + "/module.wasm", get_module),
            web.get(pkg + "/sbom", get_sbom),
            web.get(pkg + "/statement", get_statement),
            web.get(pkg + "/tlog-proof", get_proof),
        ]
    )
    install(app, "wasmlog_registry")
    app.add_subapp("/log/", make_log_app(sequencer, witness_policy=witness_policy, witness_timeout=witness_timeout, writable=False,
                                          max_checkpoint_age=max_checkpoint_age))
    return app
