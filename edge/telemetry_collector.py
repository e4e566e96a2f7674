"""A small OTLP/HTTP JSON logs collector: accepts `POST /v1/logs`, stores each request, serves them back.

Each accepted ExportLogsServiceRequest (parsed strictly and bounded, edge/telemetry_otlp.py) is
appended as one line of compact JSON to DATA/logs.jsonl and fsynced before the 200 is sent, so
what was acknowledged survives a crash (at-least-once delivery may store a batch twice: the
events' ids say so, and `wasmlog telemetry verify` skips such duplicates). `GET /v1/logs/export`
answers the file as it is (JSON lines), the format `wasmlog telemetry verify` reads.
Errors are answered with a google.rpc.Status JSON body, statuses from STATUS (spec/telemetry.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import threading

from aiohttp import web

from registry.dsse import strict_json
from tlog.errors import BodyTimeoutError, MalformedError, TlogError, TooLargeError, UnsupportedEncodingError
from tlog.httplimits import body_limit
from tlog.server import errors_middleware_for

from .telemetry_otlp import OtlpError, parse_logs_request, record_count

MAX_REQUEST_BYTES = 8 << 20  # after decoding; OTLP recommends a limit and a 413 beyond it


class UnsupportedContentType(MalformedError):
    """A body that is not application/json (binary protobuf OTLP is not accepted here): 415."""


STATUS: list[tuple[type[Exception], int]] = [
    (UnsupportedContentType, 415),
    (UnsupportedEncodingError, 415),
    (TooLargeError, 413),
    (OtlpError, 400),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (TlogError, 500),
]


def error_response(e: Exception) -> web.Response:
    status = next(status for cls, status in STATUS if isinstance(e, cls))
    return web.json_response({"code": 3 if status < 500 else 13, "message": str(e)}, status=status)  # INVALID_ARGUMENT / INTERNAL


class LogStore:
    """DATA/logs.jsonl: one accepted request per line, appended and fsynced under a lock."""

    def __init__(self, data: pathlib.Path) -> None:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data / "logs.jsonl"
        self._lock = threading.Lock()
        self.requests = self.records = 0

    def append(self, request: object, records: int) -> None:
        line = json.dumps(request, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
        with self._lock, open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            self.requests += 1
            self.records += records


STORE = web.AppKey("telemetry_store", LogStore)
EXPORT_CHUNK = 256 << 10


async def post_logs(request: web.Request) -> web.Response:
    mime = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if mime != "application/json":
        raise UnsupportedContentType(f"Content-Type {mime[:60]!r}: this collector takes OTLP/HTTP JSON (application/json) only")
    obj = strict_json(await request.read(), "ExportLogsServiceRequest")
    try:
        resources = parse_logs_request(obj)
    except MalformedError as e:
        raise OtlpError(str(e)) from None
    count = record_count(resources)
    if count:
        await asyncio.to_thread(request.app[STORE].append, obj, count)
    return web.json_response({})  # full success: partialSuccess left unset


async def get_export(request: web.Request) -> web.StreamResponse:
    """The stored lines as they are at the request (lines appended meanwhile wait for the next export)."""
    path = request.app[STORE].path
    if not path.exists():
        return web.Response(body=b"", content_type="application/x-ndjson")
    with await asyncio.to_thread(open, path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            chunk = await asyncio.to_thread(os.pread, f.fileno(), min(EXPORT_CHUNK, size - sent), sent)
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
        return response


async def get_healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.Response(text=f"ok: {store.requests} requests, {store.records} log records stored since start\n")


def make_collector_app(data: pathlib.Path) -> web.Application:
    app = web.Application(middlewares=[errors_middleware_for(error_response)])
    app[STORE] = LogStore(data)
    app.router.add_post("/v1/logs", body_limit(MAX_REQUEST_BYTES, post_logs))
    app.router.add_get("/v1/logs/export", get_export)
    app.router.add_get("/healthz", get_healthz)
    return app
