"""HEAD and single byte ranges (RFC 9110 section 14) of the registry's blob routes, on disk and on the bucket:
HEAD reads no bytes (no GET to the bucket), a range is served only from a blob whose whole had its digest,
and the Range header is parsed strictly (against a naive reference written here)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from helpers import free_port, wait_ready
from hypothesis import given
from hypothesis import strategies as st
from registry_helpers import start_registry, with_custom_section
from test_registry_frontend import serve_with_two_front_ends
from test_shared_registry import EMPTY_MODULE, nodes  # noqa: F401 - the fixture of registry nodes on one database and bucket

from registry.blobs import BlobReader, RangeReader
from registry.byte_range import MAX_DIGITS, MAX_HEADER, ByteRange, RangeNotSatisfiable, parse_range, range_applies
from registry.client import RegistryClient
from registry.record import PackageRef
from tlog.errors import TlogError
from tlog.httplimits import FILE_CHUNK
from tlog.note import Ed25519Signer
from tlog.storage.s3_sync import SyncBucket

ALICE = Ed25519Signer.generate("alice")
REF = PackageRef("acme", "ranged", "1.0.0")

# --- the parser, against a naive reference -------------------------------------------------


def naive_range(values: list[str], size: int) -> tuple[int, int] | str:
    """(start, stop), "whole" or "416", read character by character from RFC 9110's grammar and the module's bounds."""
    if len(values) != 1 or size == 0 or len(values[0]) > MAX_HEADER:
        return "whole"
    unit, eq, spec = values[0].partition("=")
    if not eq or unit.lower() != "bytes" or not unit.isascii():
        return "whole"
    first, dash, last = spec.partition("-")

    def number(s: str) -> bool:
        return 0 < len(s) <= MAX_DIGITS and all(c in "0123456789" for c in s)

    if not dash or (first and not number(first)) or (last and not number(last)) or (not first and not last):
        return "whole"
    if not first:
        n = int(last)
        return "416" if n == 0 else (max(0, size - n), size)
    a = int(first)
    if last and int(last) < a:
        return "whole"
    if a >= size:
        return "416"
    return (a, min(int(last) + 1, size) if last else size)


def parsed(values: list[str], size: int) -> tuple[int, int] | str:
    try:
        got = parse_range(values, size)
    except RangeNotSatisfiable as e:
        assert e.size == size
        return "416"
    return "whole" if got is None else (got.start, got.stop)


DIGITS = st.text("0123456789", max_size=MAX_DIGITS + 2)
SPEC = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", DIGITS, DIGITS),
    st.builds(lambda a: f"-{a}", DIGITS),
    st.builds(lambda a, b, c: f"{a}-{b},{c}", DIGITS, DIGITS, DIGITS),
    st.text("0123456789- ,=", max_size=12),
)
HEADER = st.one_of(
    st.builds(lambda u, s: f"{u}={s}", st.sampled_from(["bytes", "BYTES", "Bytes", "byteſ", "bits", "", "bytes "]), SPEC),
    st.text(max_size=MAX_HEADER + 4),
)
SIZE = st.one_of(st.integers(0, 40), st.integers(0, 10**19))


@given(st.lists(HEADER, max_size=2), SIZE)
def test_the_range_parser_agrees_with_a_naive_reading(values: list[str], size: int) -> None:
    got = parsed(values, size)
    assert got == naive_range(values, size)
    if isinstance(got, tuple):
        assert 0 <= got[0] < got[1] <= size


@pytest.mark.parametrize("header,size,want", [
    ("bytes=0-0", 10, (0, 1)), ("bytes=2-5", 10, (2, 6)), ("bytes=7-", 10, (7, 10)), ("bytes=-3", 10, (7, 10)),
    ("bytes=-30", 10, (0, 10)), ("bytes=4-99", 10, (4, 10)), ("BYTES=1-1", 10, (1, 2)),
    ("bytes=10-", 10, "416"), ("bytes=10-12", 10, "416"), ("bytes=-0", 10, "416"),
    ("bytes=5-4", 10, "whole"), ("bytes=0-1,3-4", 10, "whole"), ("bytes= 0-1", 10, "whole"), ("bytes=0-1 ", 10, "whole"),
    ("items=0-1", 10, "whole"), ("bytes=-", 10, "whole"), ("bytes=0x1-2", 10, "whole"), ("bytes=١-2", 10, "whole"),
    ("bytes=0-" + "9" * (MAX_DIGITS + 1), 10, "whole"), ("bytes=0-1", 0, "whole"),
])
def test_published_examples_of_ranges(header: str, size: int, want: tuple[int, int] | str) -> None:
    assert parsed([header], size) == want


def test_content_range_and_if_range() -> None:
    assert ByteRange(7, 10, 10).content_range() == "bytes 7-9/10"
    etag = '"sha256:' + "a" * 64 + '"'
    assert range_applies([], etag) and range_applies([etag], etag)
    for other in ([etag.lower().replace("a", "b")], ["W/" + etag], ["Tue, 15 Nov 1994 08:12:31 GMT"], [etag, etag]):
        assert not range_applies(other, etag)


# --- RangeReader over a checked blob -------------------------------------------------------


def checked(data: bytes, digest: str) -> BlobReader:
    return BlobReader(io.BytesIO(data), len(data), digest)


@pytest.mark.parametrize("start,stop", [(0, 1), (0, 100), (FILE_CHUNK - 1, FILE_CHUNK + 1), (5, 3 * FILE_CHUNK), (0, 3 * FILE_CHUNK)])
def test_a_range_of_a_blob_is_its_bytes_and_the_last_piece_waits_for_the_digest(start: int, stop: int) -> None:
    data = os.urandom(3 * FILE_CHUNK)
    digest = hashlib.sha256(data).hexdigest()
    with contextlib.closing(RangeReader(checked(data, digest), start, stop)) as reader:
        got = b"".join(iter(lambda: reader.read(FILE_CHUNK), b""))
    assert got == data[start:stop]
    bad = data[:-1] + bytes([data[-1] ^ 1])  # the flaw is past every range's end but the last
    with pytest.raises(TlogError, match="other bytes"), contextlib.closing(RangeReader(checked(bad, digest), start, stop)) as reader:
        pieces = []
        while piece := reader.read(FILE_CHUNK):
            pieces.append(piece)
    assert len(b"".join(pieces)) < stop - start


def test_a_range_is_read_only_from_a_checked_blob() -> None:
    with pytest.raises(ValueError):
        RangeReader(BlobReader(io.BytesIO(b"abc"), 3), 0, 1)
    with pytest.raises(ValueError):
        RangeReader(checked(b"abc", hashlib.sha256(b"abc").hexdigest()), 2, 4)


# --- the registry over HTTP, on both engines ---------------------------------------------


class Served:
    """A registry with one release published: its module's URL, bytes and a way to corrupt its stored blob."""

    def __init__(self, engine: str, session: aiohttp.ClientSession, url: str, module: bytes, corrupt: Callable[[bytes], None]) -> None:
        self.engine, self.session, self.url, self.module, self.corrupt = engine, session, url, module, corrupt
        self.digest = hashlib.sha256(module).hexdigest()


@pytest.fixture(params=["lmdb", "shared"])
async def served(request, aiohttp_client, tmp_path) -> AsyncIterator[Served]:  # type: ignore[no-untyped-def]
    module = with_custom_section(EMPTY_MODULE, 3 * FILE_CHUNK, random=True)
    digest = hashlib.sha256(module).hexdigest()
    if request.param == "lmdb":
        api, _, registry, store = await start_registry(aiohttp_client, tmp_path)

        def corrupt(data: bytes) -> None:
            path = os.path.join(registry.blobs.dir, digest)
            with open(path + ".bad", "wb") as f:
                f.write(data)
            os.replace(path + ".bad", path)

        closer: Callable[[], Any] = store.close
    else:
        api, registry = await request.getfixturevalue("nodes")()

        def corrupt(data: bytes) -> None:
            registry.blobs.objects.put(f"sha256/{digest}", data, immutable=False)  # as a bucket gone wrong would hold it

        closer = lambda: None  # the nodes fixture closes its stores
    await api.publish(ALICE, REF, module)
    yield Served(request.param, api.session, api.url + api_path(), module, corrupt)
    closer()


def api_path() -> str:
    return f"/api/v1/packages/{REF.namespace}/{REF.name}/{REF.version}/module.wasm"


def validators(s: Served) -> dict[str, str]:
    return {"ETag": f'"sha256:{s.digest}"', "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(s.digest)).decode()}:",
            "Accept-Ranges": "bytes", "Content-Type": "application/wasm", "Cache-Control": "public, max-age=31536000, immutable"}


async def test_head_answers_the_headers_of_get_without_reading_the_blob(served: Served, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    asked: list[tuple[str, str]] = []
    real = SyncBucket.request

    def counted(self: SyncBucket, method: str, path: str, **kw: Any) -> Any:
        asked.append((method, path))
        return real(self, method, path, **kw)

    monkeypatch.setattr(SyncBucket, "request", counted)  # counts what the client sends; the bucket answers
    async with served.session.head(served.url) as r:
        assert r.status == 200 and await r.read() == b""
        head = r.headers.copy()
    blob = f"sha256/{served.digest}"
    assert ("GET", blob) not in asked
    async with served.session.get(served.url) as r:
        assert r.status == 200 and await r.read() == served.module
        get = r.headers.copy()
    for name, value in {**validators(served), "Content-Length": str(len(served.module))}.items():
        assert head[name] == get[name] == value, name
    if served.engine == "shared":  # a HEAD to the bucket, then the GET's GET
        assert asked.count(("HEAD", blob)) == 1 and asked.count(("GET", blob)) == 1


async def test_a_head_of_a_missing_sbom_is_not_found(served: Served) -> None:
    async with served.session.head(served.url.replace("module.wasm", "sbom")) as r:
        assert r.status == 404


async def test_single_ranges_are_answered_206_with_their_bytes(served: Served) -> None:
    n = len(served.module)
    for header, (start, stop) in [
        ("bytes=0-0", (0, 1)), ("bytes=10-99", (10, 100)), (f"bytes={FILE_CHUNK - 3}-{2 * FILE_CHUNK + 7}", (FILE_CHUNK - 3, 2 * FILE_CHUNK + 8)),
        (f"bytes={n - 5}-", (n - 5, n)), ("bytes=-7", (n - 7, n)), (f"bytes=3-{n + 50}", (3, n)), (f"bytes=-{n + 1}", (0, n)),
    ]:
        async with served.session.get(served.url, headers={"Range": header}) as r:
            body = await r.read()
            assert r.status == 206, header
            assert body == served.module[start:stop], header
            assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{n}"
            assert r.headers["Content-Length"] == str(stop - start)
            for name, value in validators(served).items():
                assert r.headers[name] == value


async def test_an_unsatisfiable_range_is_416_with_the_length(served: Served) -> None:
    n = len(served.module)
    for header in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=-0"):
        async with served.session.get(served.url, headers={"Range": header}) as r:
            assert r.status == 416, header
            assert r.headers["Content-Range"] == f"bytes */{n}"
            assert (await r.json())["error"] == "RangeNotSatisfiable"


async def test_other_ranges_and_validators_get_the_whole_blob(served: Served) -> None:
    etag = f'"sha256:{served.digest}"'
    for headers in (
        {"Range": "bytes=0-1,5-9"}, {"Range": "bytes=9-5"}, {"Range": "bytes=abc"}, {"Range": "pages=1-2"}, {"Range": "bytes = 0-1"},
        {"Range": "bytes=0-1", "If-Range": '"sha256:' + "0" * 64 + '"'}, {"Range": "bytes=0-1", "If-Range": "W/" + etag},
        {"Range": "bytes=0-1", "If-Range": "Tue, 15 Nov 1994 08:12:31 GMT"},
    ):
        async with served.session.get(served.url, headers=headers) as r:
            assert r.status == 200, headers
            assert await r.read() == served.module
            assert "Content-Range" not in r.headers and r.headers["Accept-Ranges"] == "bytes"
    async with served.session.get(served.url, headers={"Range": "bytes=4-6", "If-Range": etag}) as r:
        assert r.status == 206 and await r.read() == served.module[4:7]
    async with served.session.head(served.url, headers={"Range": "bytes=4-6"}) as r:  # ranges are for GET only
        assert r.status == 200 and r.headers["Content-Length"] == str(len(served.module))


async def test_a_range_of_a_blob_stored_with_other_bytes_is_never_sent_whole(served: Served) -> None:
    """The flaw is at the blob's end, after every range asked: each answer is cut short, never complete."""
    served.corrupt(served.module[:-1] + bytes([served.module[-1] ^ 1]))
    for header in ("bytes=0-9", f"bytes={FILE_CHUNK}-{FILE_CHUNK + 5}", "bytes=-1", "bytes=3-"):
        async with served.session.get(served.url, headers={"Range": header}) as r:
            assert r.status == 206
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()


async def test_head_and_ranges_pass_through_the_front_ends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`registry serve --workers 2`: the front-ends proxy HEAD and Range to the registry process, answers unchanged."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_with_two_front_ends(tmp_path, tmp_path / "data", port)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await wait_ready(session, url + "/log", proc)
            api = RegistryClient(url, session)
            for size in (100, 3 * FILE_CHUNK):  # answered whole by the proxy, and streamed through it
                module = with_custom_section(EMPTY_MODULE, size, random=True)
                ref = PackageRef("acme", "ranged", f"1.0.{size}")
                await api.publish(ALICE, ref, module)
                blob = url + api.package_path(ref) + "/module.wasm"
                async with session.head(blob) as r:
                    assert r.status == 200 and r.headers["Content-Length"] == str(len(module))
                    assert r.headers["ETag"] == f'"sha256:{hashlib.sha256(module).hexdigest()}"'
                async with session.get(blob, headers={"Range": "bytes=-9"}) as r:
                    assert r.status == 206 and await r.read() == module[-9:]
                    assert r.headers["Content-Range"] == f"bytes {len(module) - 9}-{len(module) - 1}/{len(module)}"
                async with session.get(blob, headers={"Range": f"bytes={len(module)}-"}) as r:
                    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(module)}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
