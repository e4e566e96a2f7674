"""tlog/storage/objects.py's own S3 client (storage/s3_sync.py): against the real SeaweedFS, checked with boto3
as an independent client, and against a real HTTP/1.1 server on loopback that misbehaves on purpose
(closes kept-alive connections, cuts a body, answers 5xx or an endless error) for the faults S3 rarely shows."""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlog.errors import MalformedError, NotFoundError, StorageUnavailableError, TlogError
from tlog.storage import s3_sync
from tlog.storage.bucket_http import AsyncBucket
from tlog.storage.objects import SHORT_LIVED, ObjectStore
from tlog.storage.s3_endpoint import S3Endpoint
from tlog.tiles import IMMUTABLE, TileID

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nETag: \"e\"\r\n\r\nok"


def answer(status: str, body: bytes, length: int | None = None) -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n".encode() + body


class Request:
    def __init__(self, connection: int, number: int, line: str) -> None:
        self.connection, self.number, self.line = connection, number, line  # number: the request's place on its connection (0, 1, ...)


class MisbehavingServer:
    """A real HTTP/1.1 server on loopback (threads, raw sockets). respond(request) gives the bytes to send
    and whether to close the connection after them; None closes it at once without an answer."""

    def __init__(self, respond: Callable[[Request], tuple[bytes, bool] | None], tls: ssl.SSLContext | None = None) -> None:
        self.respond, self.tls = respond, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[Request] = []
        self.closed = threading.Semaphore(0)  # released once for each connection the server has closed
        self._lock = threading.Lock()
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                n, self._connections = self._connections, self._connections + 1
            threading.Thread(target=self._serve, args=(sock, n), daemon=True).start()

    def _serve(self, sock: socket.socket, connection: int) -> None:
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except OSError:  # the client refused our certificate
                sock.close()
                self.closed.release()
                return
        with sock, contextlib.suppress(OSError), sock.makefile("rb") as f:
            for number in range(1 << 20):
                line = f.readline().decode()
                if not line:
                    break
                length = 0
                while (header := f.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                f.read(length)
                request = Request(connection, number, line.strip())
                with self._lock:
                    self.requests.append(request)
                reply = self.respond(request)
                if reply is None:
                    break
                sock.sendall(reply[0])
                if reply[1]:
                    break
        self.closed.release()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve(monkeypatch) -> Iterator[Callable[..., tuple[MisbehavingServer, ObjectStore]]]:  # type: ignore[no-untyped-def]
    """A factory: a MisbehavingServer with respond, and an ObjectStore pointed at it (credentials of its own)."""
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    made: list[tuple[MisbehavingServer, ObjectStore]] = []

    def make(respond: Callable[[Request], tuple[bytes, bool] | None], tls: ssl.SSLContext | None = None,
             **kw: object) -> tuple[MisbehavingServer, ObjectStore]:
        server = MisbehavingServer(respond, tls)
        made.append((server, ObjectStore("s3://bucket/log", endpoint_url=server.url, **kw)))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for server, store in made:
        store.close()
        server.close()


@pytest.fixture
def s3_env(seaweed, monkeypatch):  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    return seaweed


def test_connections_the_server_closed_after_answering_are_not_used_again(serve) -> None:  # type: ignore[no-untyped-def]
    server, store = serve(lambda r: (OK, True))  # answers, then closes: every kept-alive connection goes stale
    for _ in range(5):
        assert store.get("checkpoint") == b"ok"
        assert server.closed.acquire(timeout=10)
    assert [(r.connection, r.number) for r in server.requests] == [(n, 0) for n in range(5)]


def test_a_kept_alive_connection_the_server_closed_is_retried_on_a_fresh_one_without_counting_an_attempt(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The server takes the second request on a connection and closes it without an answer (as a server does
    when its idle timeout and our request cross): the request is sent again on a new connection, even when
    only one attempt is allowed, and with several stale connections in the pool."""
    monkeypatch.setattr(s3_sync, "ATTEMPTS", 1)
    together = threading.Barrier(4, timeout=10)

    def respond(r: Request) -> tuple[bytes, bool] | None:
        if r.connection < 4:  # the first four connections: held until all four are open, then stale
            if r.number == 0:
                together.wait()
                return OK, False
            return None
        return OK, False

    server, store = serve(respond)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: store.get("checkpoint"), range(4))) == [b"ok"] * 4
    for _ in range(4):
        assert store.get("checkpoint") == b"ok"
    first_round, rest = server.requests[:4], server.requests[4:]
    assert sorted(r.connection for r in first_round) == [0, 1, 2, 3]
    # the most recently used connection was stale: its request went again on connection 4, which serves the rest
    assert [(r.connection < 4, r.number) for r in rest] == [(True, 1), (False, 0), (False, 1), (False, 2), (False, 3)]
    _, silent = serve(lambda r: None)
    with pytest.raises(StorageUnavailableError, match="RemoteDisconnected"):  # a fresh connection that gets no answer is a failure
        silent.get("checkpoint")


def test_a_missing_object_is_not_found_and_a_missing_bucket_is_unavailable_storage(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    store = ObjectStore(f"s3://{s3_path}/log")
    with pytest.raises(NotFoundError):
        store.get("tile/0/000")
    with pytest.raises(NotFoundError):
        store.open("tile/0/000")
    missing = ObjectStore("s3://wasmlog-no-such-bucket/log")  # (not written to: SeaweedFS makes the bucket a PUT names)
    for attempt in (lambda: missing.get("tile/0/000"), lambda: missing.open("tile/0/000")):
        with pytest.raises(StorageUnavailableError, match="404 NoSuchBucket"):
            attempt()


def test_an_immutable_object_written_again_with_other_bytes_is_a_fork_and_stays_as_it_was(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    url, path = f"s3://{s3_path}/blobs", "sha256/" + "ab" * 32
    ObjectStore(url).put(path, b"first", immutable=True)
    ObjectStore(url).put(path, b"first", immutable=True)  # 412, the same bytes: accepted
    with pytest.raises(TlogError, match="refusing to fork"):
        ObjectStore(url).put(path, b"other", immutable=True)
    bucket, prefix = s3_path.split("/", 1)
    assert s3_env.client().get_object(Bucket=bucket, Key=f"{prefix}/blobs/{path}")["Body"].read() == b"first"
    ObjectStore(url).put("tile/0/000.p/1", b"a" * 32, immutable=False)
    ObjectStore(url).put("tile/0/000.p/1", b"b" * 32, immutable=False)  # short-lived: overwritten
    assert ObjectStore(url).get("tile/0/000.p/1") == b"b" * 32


def test_a_body_cut_in_the_middle_is_unavailable_storage_and_its_connection_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    def respond(r: Request) -> tuple[bytes, bool] | None:
        if "cut" in r.line:
            return answer("200 OK", b"x" * 1000, length=100_000), True
        if "big" in r.line:
            return answer("200 OK", b"y" * 100_000), False
        return OK, False

    server, store = serve(respond)
    stream, size = store.open("cut")
    assert size == 100_000
    got = b""
    with pytest.raises(StorageUnavailableError, match="99000 bytes before"):
        while chunk := stream.read(4096):
            got += chunk
    stream.close()
    assert got == b"x" * 1000
    stream, _ = store.open("big")  # a new connection; read in part, then closed
    assert stream.read(10) == b"y" * 10
    stream.close()
    stream, _ = store.open("big")  # another new one, read whole: it is kept
    assert b"".join(iter(lambda: stream.read(65536), b"")) == b"y" * 100_000
    stream.close()
    assert store.get("checkpoint") == b"ok"
    assert [(r.connection, r.number) for r in server.requests] == [(0, 0), (1, 0), (2, 0), (2, 1)]


def test_a_stream_closed_early_leaves_the_next_request_a_clean_connection(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    store = ObjectStore(f"s3://{s3_path}/blobs", connections=1)
    big = bytes(range(256)) * 4096
    store.put("big", big, immutable=True, remember=False)
    store.put("small", b"small", immutable=True, remember=False)
    stream, size = store.open("big")
    assert size == len(big) and stream.read(100) == big[:100]
    stream.close()
    assert store.get("small") == b"small"
    stream, _ = store.open("big")
    assert b"".join(iter(lambda: stream.read(1 << 16), b"")) == big
    stream.close()


def test_5xx_answers_are_retried_and_an_error_body_is_read_only_in_part(serve) -> None:  # type: ignore[no-untyped-def]
    busy = answer("503 Slow Down", b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
    answers = iter([busy, busy, OK])
    server, store = serve(lambda r: (next(answers), False))
    assert store.get("checkpoint") == b"ok"
    assert len(server.requests) == 3
    server, store = serve(lambda r: (busy, False))
    with pytest.raises(StorageUnavailableError, match="HTTP 503 SlowDown: Please reduce"):
        store.get("checkpoint")
    assert len(server.requests) == 3
    endless = answer("403 Forbidden", b"<Error><Code>AccessDenied</Code>" + b" " * (8 << 20))
    server, store = serve(lambda r: (endless, False) if r.number == 0 and "denied" in r.line else (OK, False))
    with pytest.raises(StorageUnavailableError, match="HTTP 403 AccessDenied"):
        store.get("denied")
    assert store.get("checkpoint") == b"ok"  # on a new connection: the rest of the error was never read
    assert [(r.connection, r.number) for r in server.requests] == [(0, 0), (1, 0)]


def test_64_tiles_written_from_eight_threads_are_each_in_the_bucket_with_their_headers(s3_env, s3_path) -> None:  # type: ignore[no-untyped-def]
    url = f"s3://{s3_path}/log"
    tiles = [(TileID(level, index, 256 if index % 4 else 1 + index), bytes([level, index]) * (16 * (1 + index % 7)))
             for level in range(2) for index in range(32)]
    store = ObjectStore(url)
    store.put_tiles(tiles)
    store.close()
    bucket, prefix = s3_path.split("/", 1)
    s3 = s3_env.client()
    for tile, body in tiles:
        got = s3.get_object(Bucket=bucket, Key=f"{prefix}/log/{tile.path()}")
        assert got["Body"].read() == body and got["CacheControl"] == (IMMUTABLE if tile.is_full else SHORT_LIVED)
    fresh = ObjectStore(url)  # nothing in memory: every read goes to the bucket, 16 at once
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda t: fresh.get(t[0].path()), tiles * 4)) == [body for _, body in tiles * 4]
    fresh.close()


@functools.cache
def endpoint() -> S3Endpoint:
    return S3Endpoint("bucket", "log", endpoint_url="http://127.0.0.1:1/base/")


@given(st.text(st.sampled_from("ab~._-/%$ \x00é"), max_size=12))
def test_an_object_path_is_its_own_url_or_refused(path: str) -> None:
    """Accepted: slash-separated non-empty segments of unreserved characters, sent as they are; anything else is refused."""
    try:
        url_path = endpoint().path(path)
    except MalformedError:
        assert any(not s or set(s) - set("ab~._-") for s in path.split("/"))
        return
    assert url_path == f"/base/bucket/log/{path}" and all(s and not set(s) - set("ab~._-") for s in path.split("/"))


@given(st.binary(max_size=300), st.integers(100, 599))
def test_an_error_answer_is_described_from_any_body(body: bytes, status: int) -> None:
    answer = s3_sync.Answer(status, Message(), body)
    assert re.fullmatch(r"[A-Za-z0-9.]{0,64}", answer.code)
    assert answer.describe().startswith(f"HTTP {status}") and len(answer.describe()) < 300


def test_an_error_answer_names_s3s_code_and_message() -> None:
    body = b'<?xml version="1.0"?>\n<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>'
    answer = s3_sync.Answer(404, Message(), body)
    assert answer.code == "NoSuchBucket" and answer.describe() == "HTTP 404 NoSuchBucket: The specified bucket does not exist"
    assert s3_sync.Answer(404, Message(), b"").describe() == "HTTP 404: "


def test_an_interim_answer_is_never_taken_for_the_final_one_nor_leaves_it_to_the_next_request(serve) -> None:  # type: ignore[no-untyped-def]
    """http.client skips only 100 Continue: a 103 Early Hints (or 102 Processing) came back as the answer, with
    no body, and its connection went back to the pool with the real answer still to come, which the next
    request on it then read as its own."""
    def respond(r: Request) -> tuple[bytes, bool]:
        if "early" in r.line:
            return b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", False  # the final answer comes later (with the next request)
        late = answer("200 OK", b"the early request's") if r.number else b""
        return late + answer("200 OK", b"mine"), False

    server, store = serve(respond)
    with pytest.raises(StorageUnavailableError, match="103"):
        store.get("early")
    assert store.get("other") == b"mine"
    assert [r.number for r in server.requests] == [0] * len(server.requests)  # no connection carried a second request


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A self-signed certificate for 127.0.0.1 and its key (files), made by the openssl command (PostgreSQL's packages install it)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_a_bucket_over_tls_is_verified_with_the_ca_bundle_botocore_resolves(serve, certificate, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ObjectStore's client verified an https endpoint against the system's CAs only: a bucket whose CA is named by
    AWS_CA_BUNDLE (which boto3 honoured, and AsyncBucket does) was unreachable. Both clients now use the one botocore resolves."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(*certificate)
    monkeypatch.setenv("AWS_CA_BUNDLE", certificate[0])
    server, store = serve(lambda r: (OK, False), tls=tls)
    assert store.get("checkpoint") == b"ok"
    bucket = AsyncBucket("s3://bucket/log", endpoint_url=server.url)
    try:
        assert await bucket.put("checkpoint", b"ok", immutable=False)
    finally:
        await bucket.aclose()
    assert [r.line.split()[0] for r in server.requests] == ["GET", "PUT"]
    monkeypatch.delenv("AWS_CA_BUNDLE")
    _, untrusting = serve(lambda r: (OK, False), tls=tls)
    with pytest.raises(StorageUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusting.get("checkpoint")


@pytest.mark.parametrize("head", [b"Content-Length: 2\r\nContent-Length: 7", b"Content-Length: 2, 7"])
def test_an_answer_with_an_invalid_content_length_is_refused(serve, head: bytes) -> None:  # type: ignore[no-untyped-def]
    """RFC 9112 6.3: an invalid Content-Length is unrecoverable, the answer discarded and its connection closed;
    http.client read the body by the first value and kept the connection, or (for "2, 7") read until the server
    closed, here until the timeout (tlog/http_answer.py refuses both)."""
    server, store = serve(lambda r: (b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\nok, not", False), timeout=30)
    with pytest.raises(StorageUnavailableError, match="Content-Length"):
        store.get("checkpoint")
    assert len({r.connection for r in server.requests}) == len(server.requests) == 3  # each attempt on a new connection
