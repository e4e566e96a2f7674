"""A mirror whose source is down backs off (capped, with jitter), says why at /mirror/status, and catches up."""

from __future__ import annotations

import asyncio

from helpers import free_port
from registry_helpers import REGISTRY_KEY, build_registry, wat_module

from edge.verify import parse_trust_policy
from registry.client import RegistryClient
from registry.mirror import MIRROR, Backoff, run_mirror
from registry.record import parse_package_ref
from registry.server import make_app
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
POLICY = parse_trust_policy(f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nquorum none\n"""\n')
NOW = 1_800_000_000.0


def test_backoff_doubles_up_to_the_cap_within_its_jitter() -> None:
    top = Backoff(2.0, cap=30.0, jitter=lambda: 0.999999)
    bottom = Backoff(2.0, cap=30.0, jitter=lambda: 0.0)
    assert [round(top.delay(n), 3) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert [bottom.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert Backoff(1.0, cap=60.0).delay(10_000) <= 60.0  # no overflow however long it fails


async def test_a_source_that_is_down_then_back(aiohttp_client, aiohttp_server, tmp_path) -> None:
    port = free_port()  # nothing listens here yet
    delays: asyncio.Queue[float] = asyncio.Queue()
    go_on: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(seconds: float) -> None:  # the test decides when the next round runs
        await delays.put(seconds)
        await go_on.get()

    app = run_mirror(source=f"http://127.0.0.1:{port}", policy=POLICY, data=tmp_path / "mirror", interval=5.0,
                     clock=lambda: NOW, sleep=sleep, backoff=Backoff(5.0, cap=20.0, jitter=lambda: 1.0))
    mirror_client = await aiohttp_client(app)
    waits = []
    for _ in range(4):
        waits.append(await asyncio.wait_for(delays.get(), 30))
        status = await (await mirror_client.get("/mirror/status")).json()
        retry = status["retry"]
        assert retry["attempts"] == len(waits) and retry["error_kind"] == "unreachable"
        assert "ClientConnectorError" in retry["last_error"] and retry["next_retry"] == NOW + waits[-1]
        assert status["stopped"] is None and status["size"] == 0
        if len(waits) < 4:
            await go_on.put(None)
    assert waits == [5.0, 10.0, 20.0, 20.0]

    registry, seq, store = build_registry(tmp_path / "source")  # the source comes up on that port
    source = await aiohttp_server(make_app(registry, seq), port=port)
    api = RegistryClient(str(source.make_url("")), mirror_client.session)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    await go_on.put(None)
    assert await asyncio.wait_for(delays.get(), 30) == 5.0  # the next round succeeds: back to the interval
    status = await (await mirror_client.get("/mirror/status")).json()
    assert status["size"] == 4 and status["retry"] == {"attempts": 0, "last_error": None, "error_kind": None, "next_retry": None}
    assert app[MIRROR].stopped is None
    await go_on.put(None)
    await source.close()
    store.close()


async def test_a_source_answering_errors_is_a_bad_response(aiohttp_client, aiohttp_server, tmp_path) -> None:
    from aiohttp import web

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken")

    bad = web.Application()
    bad.router.add_get("/{tail:.*}", broken)
    source = await aiohttp_server(bad)
    delays: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        await delays.put(seconds)
        await asyncio.Event().wait()  # one round is enough

    app = run_mirror(source=str(source.make_url("")), policy=POLICY, data=tmp_path / "mirror", interval=5.0,
                     clock=lambda: NOW, sleep=sleep, backoff=Backoff(5.0, jitter=lambda: 0.5))
    client = await aiohttp_client(app)
    assert await asyncio.wait_for(delays.get(), 30) == 3.75
    retry = (await (await client.get("/mirror/status")).json())["retry"]
    assert retry["error_kind"] == "bad-response" and "HTTP 500" in retry["last_error"] and retry["attempts"] == 1


async def test_tiles_that_cannot_be_fetched_are_retried_not_a_verdict(aiohttp_client, aiohttp_server, tmp_path) -> None:
    from aiohttp import web

    registry, seq, store = build_registry(tmp_path / "source")
    source = await aiohttp_client(make_app(registry, seq))
    api = RegistryClient(str(source.make_url("")), source.session)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    checkpoint = await (await source.get("/log/checkpoint")).read()

    async def flaky(request: web.Request) -> web.Response:  # serves the checkpoint, fails every tile
        if request.path == "/log/checkpoint":
            return web.Response(body=checkpoint)
        return web.Response(status=503, text="try later")

    front = web.Application()
    front.router.add_get("/{tail:.*}", flaky)
    flaky_source = await aiohttp_server(front)
    delays: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        await delays.put(seconds)
        await asyncio.Event().wait()

    app = run_mirror(source=str(flaky_source.make_url("")), policy=POLICY, data=tmp_path / "mirror", interval=5.0,
                     clock=lambda: NOW, sleep=sleep, backoff=Backoff(5.0, jitter=lambda: 1.0))
    client = await aiohttp_client(app)
    assert await asyncio.wait_for(delays.get(), 30) == 5.0
    status = await (await client.get("/mirror/status")).json()
    assert status["stopped"] is None and status["findings"] == []
    assert status["retry"]["attempts"] == 1 and "HTTP 503" in status["retry"]["last_error"]
    store.close()
