"""The registry client reads no answer past its bound: a hostile registry or mirror cannot fill a client's memory."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest
from aiohttp import web

from registry.client import RegistryClient
from tlog.client import BAD_RESPONSE, failure_kind
from tlog.errors import TooLargeError

CHUNK = b"x" * (1 << 16)
ENDLESS = 1 << 30  # what the hostile server would send if the client kept reading


async def test_an_endless_answer_is_cut_at_the_limit(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client hung up, as it should
            while sent[0] < ENDLESS:
                await response.write(CHUNK)
                sent[0] += len(CHUNK)
        return response

    app = web.Application()
    app.router.add_get("/api/v1/packages/acme/hello/1.0.0/module.wasm", endless)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        api = RegistryClient(str(server.make_url("")), session)
        with pytest.raises(TooLargeError) as e:
            await api.get("/api/v1/packages/acme/hello/1.0.0/module.wasm", 1 << 20)
    assert failure_kind(e.value) == BAD_RESPONSE  # the registry's fault, named as such
    assert sent[0] < 64 << 20, f"the server got to send {sent[0] >> 20} MiB"


async def test_an_answer_within_the_limit_is_read_whole(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    body = bytes(range(256)) * 4096  # 1 MiB exactly

    async def exact(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/x", exact)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        assert await RegistryClient(str(server.make_url("")), session).get("/x", len(body)) == body
        with pytest.raises(TooLargeError):
            await RegistryClient(str(server.make_url("")), session).get("/x", len(body) - 1)
