"""A small OTLP/HTTP JSON logs collector: accepts `POST /v1/logs`, stores each request, serves them back.

Each accepted ExportLogsServiceRequest (parsed strictly and bounded, edge/telemetry_otlp.py) is
appended, without the events already stored (a redelivered batch), as one line of compact JSON to
DATA/logs.jsonl and fsynced before the 200 is sent, so what was acknowledged survives a crash;
the lines are kept in numbered segments under a total size bound (edge/telemetry_store.py).
`GET /v1/logs/export` answers every segment as it is, oldest first (JSON lines, the format
`wasmlog telemetry verify` reads), `GET /v1/logs/retention` what retention dropped.
Errors are answered with a google.rpc.Status JSON body, statuses from STATUS (spec/telemetry.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib

from aiohttp import web

from registry.dsse import strict_json
from tlog.errors import BodyTimeoutError, MalformedError, TlogError, TooLargeError, UnsupportedEncodingError
from tlog.httplimits import body_limit
from tlog.server import errors_middleware_for

from .telemetry_otlp import OtlpError, parse_logs_request
from .telemetry_store import DEFAULT_RETAIN_BYTES, LogStore, read_retention, segments

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
    await asyncio.to_thread(request.app[STORE].append, obj, resources)
    return web.json_response({})  # full success: partialSuccess left unset


async def get_export(request: web.Request) -> web.StreamResponse:
    """Every segment as it is at the request, oldest first (lines appended meanwhile wait for the next export)."""
    data = request.app[STORE].data
    with contextlib.ExitStack() as files:
        opened = []
        for path in await asyncio.to_thread(segments, data):
            try:  # a segment retention drops meanwhile is gone; one opened stays readable
                f = files.enter_context(await asyncio.to_thread(open, path, "rb"))
            except FileNotFoundError:
                continue
            opened.append((f.fileno(), os.fstat(f.fileno()).st_size))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.content_length = sum(size for _, size in opened)
        await response.prepare(request)
        for fd, size in opened:
            sent = 0
            while sent < size:
                chunk = await asyncio.to_thread(os.pread, fd, min(EXPORT_CHUNK, size - sent), sent)
                if not chunk:
                    break
                await response.write(chunk)
                sent += len(chunk)
        await response.write_eof()
        return response


async def get_retention(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(read_retention, request.app[STORE].data))


async def get_healthz(request: web.Request) -> web.Response:
    store = request.app[STORE]
    return web.Response(text=f"ok: {store.requests} requests, {store.records} log records stored since start, "
                             f"{store.redelivered} redelivered ones not stored again\n")


def make_collector_app(data: pathlib.Path, retain_bytes: int = DEFAULT_RETAIN_BYTES) -> web.Application:
    app = web.Application(middlewares=[errors_middleware_for(error_response)])
    app[STORE] = LogStore(data, retain_bytes)
    app.router.add_post("/v1/logs", body_limit(MAX_REQUEST_BYTES, post_logs))
    app.router.add_get("/v1/logs/export", get_export)
    app.router.add_get("/v1/logs/retention", get_retention)
    app.router.add_get("/healthz", get_healthz)
    return app
