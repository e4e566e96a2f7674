"""Every server's resource bounds over real sockets (issue 12, findings 4-6): body limits per
route after decoding, gzip bombs, bad encodings, nested JSON, slow clients, the connection cap,
and blob downloads streamed from disk with a write timeout."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import pathlib
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from registry_helpers import build_registry, wat_module, with_custom_section

from registry.client import RegistryClient
from registry.record import parse_package_ref
from registry.server import make_app as make_registry_app
from tlog.httplimits import GuardedSite, ServerLimits, start_server
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.sequencer import Sequencer
from tlog.server import make_app as make_log_app
from tlog.storage.lmdb_store import LMDBLogStore
from witness.loglist import parse_log_list
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

MIB = 1 << 20
LOG_KEY = Ed25519Signer.generate("example.com/limits")
ALICE = Ed25519Signer.generate("alice")
QUICK = ServerLimits(header_timeout=30, body_timeout=30, write_timeout=30, max_connections=64)


def gzip_bomb(mib: int) -> bytes:
    """A gzip member of `mib` MiB of zeros: one compressed MiB (state reset by a full flush) repeated."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + segment * mib + end + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)


def test_the_bomb_is_valid_gzip() -> None:
    assert gzip.decompress(gzip_bomb(3)) == bytes(3 * MIB)  # the stdlib decoder as the reference
    assert len(gzip_bomb(1024)) < 1_100_000  # 1 GiB in about 1 MB


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, how far this process's peak RSS rose above its RSS on entry."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base, out = rss(), list[int]()
    yield out
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    out.append(peak - base)


@contextlib.asynccontextmanager
async def serving(app, limits: ServerLimits = QUICK) -> AsyncIterator[GuardedSite]:  # type: ignore[no-untyped-def]
    runner, sites = await start_server(app, limits, "127.0.0.1", 0)
    try:
        yield sites[0]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def log_server(tmp: pathlib.Path, limits: ServerLimits = QUICK) -> AsyncIterator[GuardedSite]:
    store = LMDBLogStore(str(tmp / "log"))
    try:
        async with serving(make_log_app(Sequencer(Log(store, LOG_KEY), interval=0.005)), limits) as site:
            yield site
    finally:
        store.close()


@contextlib.asynccontextmanager
async def registry_server(tmp: pathlib.Path, limits: ServerLimits = QUICK) -> AsyncIterator[GuardedSite]:
    registry, seq, store = build_registry(tmp)
    try:
        async with serving(make_registry_app(registry, seq), limits) as site:
            yield site
    finally:
        store.close()


@contextlib.asynccontextmanager
async def witness_server(tmp: pathlib.Path) -> AsyncIterator[GuardedSite]:
    logs = parse_log_list(f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 86400\n")
    state = WitnessState(str(tmp / "witness"))
    try:
        witness = Witness(signer=Ed25519Signer.generate("w.example", alg=0x04), logs=logs, state=state)
        async with serving(make_witness_app(witness)) as site:
            yield site
    finally:
        state.close()


async def raw_request(port: int, head: str, body: bytes = b"", *, deadline: float = 30) -> tuple[int, bytes]:
    """Send a request as raw bytes; return the status and the response (read to the close or its length)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(head.encode() + b"\r\n" + body)
        with contextlib.suppress(ConnectionError):
            await w.drain()
        async with asyncio.timeout(deadline):
            status_line = await r.readline()
            rest = await r.readuntil(b"\r\n\r\n")
            length = next((int(h.split(b":")[1]) for h in rest.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
            return int(status_line.split()[1]), rest + await r.readexactly(length)
    finally:
        w.close()


def post_head(path: str, length: int, *extra: str) -> str:
    return "".join(f"{h}\r\n" for h in (f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", *extra))


ROUTES = {  # server, POST route, its limit
    "log": (log_server, "/add", 65536),
    "registry": (registry_server, "/api/v1/records", 64 << 10),
    "witness": (witness_server, "/add-checkpoint", 64 << 10),
}


@pytest.mark.parametrize("server", ROUTES)
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_gzip_bomb_is_413_without_inflating_it(tmp_path, server: str, chunked: bool) -> None:
    start, path, _ = ROUTES[server]
    bomb = gzip_bomb(1024)
    if chunked:  # no announced length: refused while decoding, once past the limit
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n"
        body = b"%x\r\n" % len(bomb) + bomb + b"\r\n0\r\n\r\n"
    else:  # a compressed length already over what the limit could take: refused before reading
        head, body = post_head(path, len(bomb), "Content-Encoding: gzip"), bomb
    async with start(tmp_path) as site:
        cpu = time.process_time()
        with peak_rss_growth() as growth:
            status, _ = await raw_request(site.port, head, body)
        assert status == 413
        await wait_for(lambda: site.count.open == 0, "the bomb's connection is still open")
        assert time.process_time() - cpu < 0.4, "the server inflated much of the bomb"
    assert growth[0] < 100 * MIB, f"peak RSS grew by {growth[0] >> 20} MiB"


@pytest.mark.parametrize("server", ROUTES)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_invalid_compressed_bodies_are_400(tmp_path, server: str, encoding: str) -> None:
    start, path, _ = ROUTES[server]
    async with start(tmp_path) as site:
        garbage = b"\x1f\x8b\x08\x00" + b"not deflate at all" * 10
        status, body = await raw_request(site.port, post_head(path, len(garbage), f"Content-Encoding: {encoding}"), garbage)
        assert status == 400, body
        assert b"Traceback" not in body and b"content-encoding" in body.lower()


@pytest.mark.parametrize("server", ROUTES)
async def test_a_body_over_the_route_limit_after_decoding_is_413_and_under_it_is_read(tmp_path, server: str) -> None:
    start, path, limit = ROUTES[server]
    async with start(tmp_path) as site:
        over = gzip.compress(b"x" * (limit + 1))
        status, _ = await raw_request(site.port, post_head(path, len(over), "Content-Encoding: gzip"), over)
        assert status == 413
        status, _ = await raw_request(site.port, post_head(path, limit + 1), b"x" * (limit + 1))
        assert status == 413
        # Within the limit, a gzip body reaches the handler decoded (which may refuse what it says).
        under = gzip.compress(b"x" * 100)
        status, body = await raw_request(site.port, post_head(path, len(under), "Content-Encoding: gzip"), under)
        assert status in (200, 400) and b"content-encoding" not in body.lower()


async def test_gzip_entry_is_logged_decoded(tmp_path) -> None:
    async with log_server(tmp_path) as site, aiohttp.ClientSession() as s:
        entry = b"a compressed entry" * 100
        async with s.post(f"http://127.0.0.1:{site.port}/add", data=gzip.compress(entry), headers={"Content-Encoding": "gzip"}) as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{site.port}/tile/entries/000.p/1") as r:
            assert entry in await r.read()


async def test_other_content_encodings_are_refused(tmp_path) -> None:
    async with log_server(tmp_path) as site:
        status, body = await raw_request(site.port, post_head("/add", 5, "Content-Encoding: compress"), b"hello")
        assert status == 415 and b"gzip or deflate only" in body
        status, _ = await raw_request(site.port, post_head("/add", 5, "Content-Encoding: br"), b"hello")
        assert status == 400  # aiohttp's parser refuses an encoding it knows but cannot decode


@pytest.mark.parametrize("path", ["/log/checkpoint", "/api/v1/namespaces/acme", "/api/v1/packages/acme/hello/1.0.0/module.wasm"])
async def test_get_routes_take_no_body(tmp_path, path: str) -> None:
    async with registry_server(tmp_path) as site:
        status, body = await raw_request(site.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n", b"0123456789")
        assert status == 413, body
        chunked = f"GET {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        status, _ = await raw_request(site.port, chunked, b"a\r\n0123456789\r\n0\r\n\r\n")
        assert status == 413


@pytest.mark.parametrize("body", [
    b"[" * 30_000 + b"]" * 30_000,  # deeper than the parser's recursion limit, within the body limit
    b'{"type": "yank", "type": "yank", "signer": "x", "envelope": {}}',  # a duplicate key
    b'{"type": "yank", "signer": NaN, "envelope": {}}',
    b"\xff\xfe{}",
])
async def test_bad_json_records_are_400(tmp_path, body: bytes) -> None:
    async with registry_server(tmp_path) as site:
        status, answer = await raw_request(site.port, post_head("/api/v1/records", len(body), "Content-Type: application/json"), body)
        assert status == 400, answer
        assert b"Traceback" not in answer


async def wait_closed(r: asyncio.StreamReader, seconds: float) -> bytes:
    """Read until the server closes the connection (EOF or reset); fail after seconds."""
    got = b""
    async with asyncio.timeout(seconds):
        with contextlib.suppress(ConnectionError):
            while chunk := await r.read(65536):
                got += chunk
    return got


async def test_a_trickling_body_gets_408_and_the_connection_closed(tmp_path) -> None:
    limits = ServerLimits(header_timeout=30, body_timeout=0.5, write_timeout=30, max_connections=64)
    async with registry_server(tmp_path, limits) as site:
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        start = time.monotonic()
        w.write(post_head("/api/v1/records", 1000).encode() + b"\r\n{")  # and then nothing more
        got = await wait_closed(r, 10)
        assert time.monotonic() - start >= 0.5
        assert got.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in got
        assert site.count.open == 0
        w.close()


async def test_a_slow_request_head_is_closed_after_the_header_timeout(tmp_path) -> None:
    limits = ServerLimits(header_timeout=0.5, body_timeout=30, write_timeout=30, max_connections=64)
    async with log_server(tmp_path, limits) as site:
        silent = await asyncio.open_connection("127.0.0.1", site.port)
        partial = await asyncio.open_connection("127.0.0.1", site.port)
        partial[1].write(b"GET /checkpoint HTTP/1.1\r\nHost: ")  # never finished
        start = time.monotonic()
        await asyncio.gather(wait_closed(silent[0], 10), wait_closed(partial[0], 10))
        assert time.monotonic() - start >= 0.4
        # A request sent in time is served, and its idle keep-alive connection is closed the same way.
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(b"GET /checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await wait_closed(r, 10)
        assert got.startswith(b"HTTP/1.1 200 ")
        for _, writer in (silent, partial, (r, w)):
            writer.close()


async def test_connections_over_the_cap_get_503_and_one_freed_serves_again(tmp_path) -> None:
    limits = ServerLimits(header_timeout=60, body_timeout=30, write_timeout=30, max_connections=2)
    async with log_server(tmp_path, limits) as site:
        held = [await asyncio.open_connection("127.0.0.1", site.port) for _ in range(2)]
        await wait_for(lambda: site.count.open == 2, "the held connections are not counted")
        deadline = time.monotonic() + 10
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        assert (await wait_closed(r, 10)).startswith(b"HTTP/1.1 503 ")
        w.close()
        held[0][1].close()
        async with aiohttp.ClientSession() as s:  # once the server saw the close, a request succeeds
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"http://127.0.0.1:{site.port}/checkpoint") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < deadline, "no request served after a connection was freed"
                await asyncio.sleep(0.01)
        held[1][1].close()


async def test_a_large_module_is_streamed_from_disk_and_a_client_that_does_not_read_is_cut_off(tmp_path) -> None:
    limits = ServerLimits(header_timeout=30, body_timeout=30, write_timeout=1.0, max_connections=64)
    module = with_custom_section(wat_module("no_imports", tmp_path), 48 * MIB)
    ref = parse_package_ref("acme:big@1.0.0")
    size = len(module)
    async with registry_server(tmp_path, limits) as site:
        url = f"http://127.0.0.1:{site.port}"
        async with aiohttp.ClientSession() as s:
            await RegistryClient(url, s).publish(ALICE, ref, module)
        del module
        path = f"/api/v1/packages/{ref.namespace}/{ref.name}/{ref.version}/module.wasm"
        async with aiohttp.ClientSession() as s:
            with peak_rss_growth() as growth:
                async with s.get(url + path) as r:
                    assert r.status == 200 and r.content_length == size
                    got = 0
                    async for chunk in r.content.iter_chunked(MIB):
                        got += len(chunk)
        assert got == size
        assert growth[0] < 24 * MIB, f"peak RSS grew by {growth[0] >> 20} MiB serving a 48 MiB module"

        await wait_for(lambda: site.count.open == 0, "the sessions' connections are not closed")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", site.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # and never read
        await wait_for(lambda: site.count.open == 1, "the download did not start")
        start = time.monotonic()
        await wait_for(lambda: site.count.open == 0, "a client that does not read still holds its connection")
        assert time.monotonic() - start >= 0.5  # cut off by the write timeout, not at once
        sock.close()


async def wait_for(condition, failure: str, seconds: float = 15) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("head", [
    post_head("/log/checkpoint", 0, "Content-Encoding: gzip"),  # 405: aiohttp's answer, not ours
    post_head("/api/v1/nowhere", 0, "Content-Encoding: gzip"),  # 404
    post_head("/api/v1/records", 0, "Content-Encoding: gzip"),  # 413 from our limit
])
async def test_a_refused_compressed_body_is_not_inflated_after_the_answer(tmp_path, head: str) -> None:
    bomb = gzip_bomb(1024)
    head = head.replace("Content-Length: 0", f"Content-Length: {len(bomb)}")
    async with registry_server(tmp_path) as site:
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        cpu = time.process_time()
        w.write(head.encode() + b"\r\n" + bomb)
        answer = await wait_closed(r, 10)  # answered, then closed at once: no lingering read that would inflate the rest
        assert answer.split(b" ")[1] in (b"404", b"405", b"413") and b"Connection: close" in answer
        await wait_for(lambda: site.count.open == 0, "the connection is still open")
        assert time.process_time() - cpu < 0.4, "the server inflated the refused body"
        w.close()


async def test_publish_takes_no_compressed_body(tmp_path) -> None:
    async with registry_server(tmp_path) as site:
        body = gzip.compress(b"\xa0")  # an empty CBOR map
        status, answer = await raw_request(site.port, post_head("/api/v1/publish", len(body), "Content-Encoding: gzip",
                                                               "Content-Type: application/cbor"), body)
        assert status == 415 and b"no compressed body" in answer


async def test_an_unexpected_error_is_a_plain_500_that_names_nothing_inside(tmp_path) -> None:
    from aiohttp import web

    from tlog.server import errors_middleware

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("internal detail /srv/secret")

    app = web.Application(middlewares=[errors_middleware])
    app.router.add_get("/broken", broken)
    async with serving(app) as site:
        status, body = await raw_request(site.port, "GET /broken HTTP/1.1\r\nHost: x\r\n")
        assert status == 500 and b"internal error" in body
        assert b"secret" not in body and b"Traceback" not in body and b"RuntimeError" not in body
