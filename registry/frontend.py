"""HTTP front-end processes for ``wasmlog registry serve --workers N``.

A front-end does the stateless work of a publish (HTTP and body parsing, envelope, statement,
signature, wasm and SBOM checks, durable blob writes) and leaves the stateful part to the one
registry process, cheapest first: it reads and checks the signer and envelope, asks that process
whether the release would be accepted (is the signer granted, is the version free?), and only
then reads and checks the module and the SBOM, writes the blobs, and forwards the entry to be
logged. Every other request is proxied to the registry process (tlog/frontend.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from aiohttp import web

from tlog.addipc import AddClient
from tlog.frontend import ADD_CLIENT, ADD_SOCKET, frontend_context, proxy
from tlog.httplimits import body_limit

from .blobs import BlobStore
from .groupsync import GroupSync
from .publish_reader import PublishReader
from .sbom_pool import SbomPool
from .server import MAX_PUBLISH_BYTES, MAX_RECORD_BYTES, registry_errors_middleware
from .service import LOGGED, check_release_contents, check_signed_release, store_blobs

CHECK_SOCKET = "check.sock"
CHECK_CLIENT = web.AppKey("check_client", AddClient)
BLOBS = web.AppKey("blobs", BlobStore)
BLOB_SYNC = web.AppKey("blob_sync", GroupSync)
SBOM_POOL = web.AppKey("sbom_pool", SbomPool)


async def publish(request: web.Request) -> web.Response:
    """Cheapest first: the signer and envelope, then the registry process's word on the signer's
    grant, before the module and the SBOM are even read; only then they are checked and stored."""
    body = PublishReader(request)
    signer, envelope = await body.signed()
    record = check_signed_release(signer=signer, envelope=envelope)
    answer = await request.app[CHECK_CLIENT].add(record.entry)  # an unauthorized release stops here
    module, sbom = await body.contents()
    await check_release_contents(record, module, sbom, request.app[SBOM_POOL], logged=answer == LOGGED)
    await store_blobs(request.app[BLOBS], request.app[BLOB_SYNC], sbom, module)  # refused releases wrote nothing
    proof = await request.app[ADD_CLIENT].add(record.entry)
    return web.Response(body=proof, content_type="text/plain")


def make_registry_frontend_app(ipc_dir: str, data: str) -> web.Application:
    async def blobs(app: web.Application) -> AsyncIterator[None]:
        app[BLOBS] = BlobStore(os.path.join(data, "blobs"))
        app[BLOB_SYNC] = GroupSync(app[BLOBS].sync)
        app[SBOM_POOL] = SbomPool()
        yield
        await asyncio.to_thread(app[SBOM_POOL].close)

    app = web.Application(middlewares=[registry_errors_middleware])  # body limits are per route (body_limit)
    app.cleanup_ctx.append(frontend_context(ipc_dir, {CHECK_CLIENT: CHECK_SOCKET, ADD_CLIENT: ADD_SOCKET}))
    app.cleanup_ctx.append(blobs)
    app.router.add_post("/api/v1/publish", body_limit(MAX_PUBLISH_BYTES, publish, compressed=False))
    # Proxied bodies (POST /api/v1/records) are bounded here too; the registry process checks its own limits.
    app.router.add_route("*", "/{tail:.*}", body_limit(MAX_RECORD_BYTES, proxy))
    return app
