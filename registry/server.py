"""The registry's HTTP API (spec/registry-api.md), with the log's API mounted under /log/."""

from __future__ import annotations

import asyncio
import bisect
import json
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tlog.addipc import ForwardedError
from tlog.checkpoint import parse_decimal
from tlog.errors import (
    BodyTimeoutError,
    MalformedError,
    MissingDependencyError,
    NotFoundError,
    PushbackError,
    StorageFullError,
    StorageUnavailableError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)
from tlog.httplimits import body_limit, send_file
from tlog.merkle import MAX_TREE_SIZE
from tlog.metrics import install
from tlog.note import b64encode
from tlog.policy import Policy
from tlog.sequencer import Sequencer
from tlog.server import RETRY_AFTER_SECONDS, errors_middleware_for
from tlog.server import make_app as make_log_app
from tlog.witnessing import QuorumError

from .blobs import RangeReader
from .bucket_blobs import BucketBlobStore
from .byte_range import RangeNotSatisfiable, blob_etag, parse_range, range_applies, repr_digest
from .dsse import MAX_ENVELOPE_BYTES, strict_json
from .indexer import NoIndexRoot
from .publish_reader import PublishReader
from .record import RecordError, check_label, decode_entry, parse_package_ref
from .sbom import MAX_SBOM_BYTES
from .service import NotYetPublished, Registry
from .shared_service import SharedRegistry
from .state import (
    AlreadyYanked,
    InvalidSignature,
    KeyAlreadyGranted,
    LastKey,
    Unauthorized,
    UnknownKey,
    UnknownRelease,
    ValidationError,
    VersionExists,
)
from .wasm import MAX_MODULE_BYTES, WasmError

REGISTRY = web.AppKey("registry", Registry)
MAX_PUBLISH_BYTES = MAX_MODULE_BYTES + MAX_SBOM_BYTES + MAX_ENVELOPE_BYTES + (64 << 10)
MAX_RECORD_BYTES = MAX_ENVELOPE_BYTES + (16 << 10)  # POST /api/v1/records: an action's envelope, its type and signer

# Every error maps to one status here, and only here; subclasses come before their bases.
STATUS: list[tuple[type[TlogError], int]] = [
    (InvalidSignature, 403),
    (Unauthorized, 403),
    (VersionExists, 409),
    (KeyAlreadyGranted, 409),
    (AlreadyYanked, 409),
    (LastKey, 409),
    (UnknownRelease, 404),
    (UnknownKey, 404),
    (ValidationError, 422),
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (RecordError, 422),
    (WasmError, 422),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (NotFoundError, 404),
    (RangeNotSatisfiable, 416),
    (MissingDependencyError, 415),  # an SBOM media type this installation cannot validate
    (PushbackError, 503),
    (QuorumError, 503),
    (NotYetPublished, 503),
    (NoIndexRoot, 503),
    (StorageUnavailableError, 503),  # the shared database or bucket: nothing was acknowledged, retry
    (StorageFullError, 507),
    (TlogError, 500),
]


def status_for(e: TlogError) -> int:
    """e's status from STATUS; a ForwardedError carries the status the registry process's own table gave it."""
    if isinstance(e, ForwardedError):
        return e.forwarded_status
    return next(status for cls, status in STATUS if isinstance(e, cls))


def error_body(e: TlogError) -> bytes:
    return json.dumps({"error": type(e).__name__, "message": str(e)}).encode()


def registry_error_response(e: TlogError) -> web.Response:
    status = status_for(e)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    if isinstance(e, RangeNotSatisfiable):
        headers["Content-Range"] = f"bytes */{e.size}"
    if isinstance(e, ForwardedError) and e.body is not None:  # the registry process's own reply
        return web.Response(body=e.body, status=status, headers=headers, content_type="application/json")
    return web.Response(body=error_body(e), status=status, headers=headers, content_type="application/json")


registry_errors_middleware = errors_middleware_for(registry_error_response)


def looked_up_again(registry: Registry) -> Middleware:
    """A middleware: a read of the registry API that found nothing (404) is answered again once the registry
    caught up with the log, if it had anything to take up (on shared storage another process may have just
    logged what was asked for): a stale view never answers a final no. Asked again too if the registry took
    records up by other means (its follower) since the handler began."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        applied = registry.applied_size
        try:
            return await handler(request)
        except NotFoundError:
            if request.method not in ("GET", "HEAD") or request.match_info.apps[-1] is not request.app:
                raise
            if not await registry.caught_up() and registry.applied_size == applied:
                raise
            return await handler(request)

    return middleware


async def publish(request: web.Request) -> web.Response:
    """Cheapest first: the signer and envelope are checked, and the signer's grant, before the
    module and the SBOM are even read (registry/publish_reader.py)."""
    body = PublishReader(request)
    signer, envelope = await body.signed()
    registry = request.app[REGISTRY]
    record, logged = await registry.authorize_release(signer=signer, envelope=envelope)
    module, sbom = await body.contents()
    proof = await registry.publish_authorized(record, module, sbom, logged=logged)
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


ACTIONS_PAGE = 64  # proofs per page of /actions by default (a tlog-proof is ~1.6 KB)
MAX_ACTIONS_PAGE = 256


def _query_decimal(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An optional decimal query parameter, at most once, in lo..hi. Raises MalformedError."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise MalformedError(f"want at most one {name} parameter")
    if not values:
        return default
    value = parse_decimal(values[0], name)
    if not lo <= value <= hi:
        raise MalformedError(f"{name} must be {lo} to {hi}, not {value}")
    return value


async def get_actions(request: web.Request) -> web.Response:
    """tlog-proofs of the namespace's key revocations and yanks, for verifiers refreshing online:
    in index order, the first `limit` after index `after`, and `next` (the `after` of the next page,
    or null after the last)."""
    registry = request.app[REGISTRY]
    ns = registry.namespace(check_label(request.match_info["ns"], "namespace"))
    after = _query_decimal(request, "after", -1, 0, MAX_TREE_SIZE)
    limit = _query_decimal(request, "limit", ACTIONS_PAGE, 1, MAX_ACTIONS_PAGE)
    indexes = sorted({*ns.revoked.values(), *(r.yanked_at for r in ns.releases.values() if r.yanked_at is not None)})
    page = indexes[bisect.bisect_right(indexes, after):][: limit + 1]
    more, page = len(page) > limit, page[:limit]
    proofs = await asyncio.to_thread(lambda: [registry.tlog_proof(i)[0].decode() for i in page])
    return web.json_response({"proofs": proofs, "next": page[-1] if more else None})


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


async def send_blob(request: web.Request, digest: str, headers: dict[str, str]) -> web.StreamResponse:
    """The blob with this digest, with headers and its validators (ETag, Repr-Digest, Accept-Ranges).
    HEAD: its length only, its bytes unread (a stat on disk, a HEAD request to the bucket). GET: whole
    (200), or the single byte range of a Range header it honours (206 with Content-Range, byte_range.py):
    a range is read through the whole blob's digest check and its last piece is sent only once the whole
    blob had its digest (RangeReader); a failure cuts the connection, as for a whole blob.
    Raises RangeNotSatisfiable (416), NotFoundError."""
    blobs = request.app[REGISTRY].blobs
    etag = blob_etag(digest)
    headers = {**headers, "ETag": etag, "Repr-Digest": repr_digest(digest), "Accept-Ranges": "bytes"}
    if request.method == "HEAD":  # RFC 9110 14.2: ranges are for GET only
        response = web.StreamResponse(headers=headers)
        response.content_length = await asyncio.to_thread(blobs.size, digest)
        await response.prepare(request)
        await response.write_eof()
        return response
    ranges = request.headers.getall("Range", [])
    wanted = bool(ranges) and range_applies(request.headers.getall("If-Range", []), etag)
    f = await asyncio.to_thread(blobs.open, digest, verify=wanted)
    try:
        part = parse_range(ranges, f.size) if wanted else None
    except RangeNotSatisfiable:
        f.close()
        raise
    if part is None:
        return await send_file(request, f, headers)
    return await send_file(request, RangeReader(f, part.start, part.stop), {**headers, "Content-Range": part.content_range()}, status=206)


async def get_module(request: web.Request) -> web.StreamResponse:
    digest = request.app[REGISTRY].release(_ref(request)).release.module_sha256
    return await send_blob(request, digest, {"Content-Type": "application/wasm", "Cache-Control": "public, max-age=31536000, immutable"})


async def get_sbom(request: web.Request) -> web.StreamResponse:
    rel = request.app[REGISTRY].release(_ref(request)).release
    if rel.sbom_sha256 is None or rel.sbom_media_type is None:
        raise NotFoundError("this release has no SBOM")
    return await send_blob(request, rel.sbom_sha256, {"Content-Type": rel.sbom_media_type})


async def get_statement(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    entry = await asyncio.to_thread(registry.entry, registry.release(_ref(request)).index)
    return web.Response(body=decode_entry(entry).envelope.to_json(), content_type="application/json")


async def get_proof(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    index = registry.release(_ref(request)).index
    olds = request.query.getall("old", [])
    if len(olds) > 1:
        raise MalformedError("want at most one old parameter")
    old = olds[0] if olds else None
    proof, consistency = await asyncio.to_thread(registry.tlog_proof, index, None if old is None else parse_decimal(old, "old"))
    if old is None:
        return web.Response(body=proof, content_type="text/plain")
    return web.json_response(
        {"tlog_proof": proof.decode(), "old_size": int(old), "consistency_proof": [b64encode(h) for h in consistency]}
    )


async def get_status_proof(request: web.Request) -> web.Response:
    """The release's status proof (spec/status-proof.md) against the latest published checkpoint."""
    registry = request.app[REGISTRY]
    ref = _ref(request)
    index = registry.release(ref).index
    proof = await asyncio.to_thread(registry.indexer.status_proof, ref.namespace, ref.name, index)
    return web.Response(body=proof, content_type=STATUS_PROOF_TYPE)


STATUS_PROOF_TYPE = "application/vnd.wasmlog.status-proof+cbor"


def make_app(
    registry: Registry, sequencer: Sequencer, *, witness_policy: Policy | None = None, witness_timeout: float = 5.0,
    max_checkpoint_age: float | None = None, read_only: bool = False,
) -> web.Application:
    """The registry app. read_only leaves out publishing and records (a mirror)."""
    app = web.Application(middlewares=[registry_errors_middleware, looked_up_again(registry)])  # body limits are per route (body_limit)
    app[REGISTRY] = registry
    app.on_cleanup.append(lambda _: asyncio.to_thread(registry.sbom_pool.close))  # stops its SBOM validator processes
    if isinstance(registry.blobs, BucketBlobStore):
        bucket_blobs = registry.blobs
        app.on_cleanup.append(lambda _: bucket_blobs.aclose())  # put_async's connections
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
            web.get(pkg + "/status-proof", get_status_proof),
        ]
    )
    install(app, "wasmlog_registry")
    if isinstance(registry, SharedRegistry):
        app.cleanup_ctx.append(registry.follower)  # take up what other processes log
    app.add_subapp("/log/", make_log_app(sequencer, witness_policy=witness_policy, witness_timeout=witness_timeout, writable=False,
                                          max_checkpoint_age=max_checkpoint_age))
    return app
