"""Adversarial review of the shared engine (issue 17): storage that is missing, refuses, goes silent or away,
and credentials that must never be echoed. Real PostgreSQL and SeaweedFS (tests/services.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_shared_log import KEY

from registry.bucket_blobs import BucketBlobStore
from tlog.dsn import MASK, redact
from tlog.errors import MalformedError, StorageUnavailableError, TlogError
from tlog.log import Log
from tlog.proof_file import parse_tlog_proof
from tlog.storage.objects import ObjectStore, parse_objects_url
from tlog.storage.shared import SharedLogStore

SECRET = "pw0SECRET"

def test_a_missing_bucket_is_unavailable_storage_not_a_missing_object(seaweed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageUnavailableError, match="NoSuchBucket"):
        ObjectStore("s3://wasmlog-no-such-bucket/log").get("checkpoint")
    with pytest.raises(StorageUnavailableError):
        BucketBlobStore("s3://wasmlog-no-such-bucket/blobs").get("0" * 64)

@pytest.mark.parametrize("secret", ["wrong-secret", None])
def test_a_bucket_that_denies_access_is_unavailable_storage(seaweed, s3_path, monkeypatch, secret: str | None) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    if secret is None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")  # an unknown key
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = ObjectStore(f"s3://{s3_path}/log")  # (each store reads the credentials of the moment)
    with pytest.raises(StorageUnavailableError, match=r"403|AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId"):
        store.get("tile/0/000")
    with pytest.raises(StorageUnavailableError):
        store.put("tile/0/000", b"\x00" * 32 * 256, immutable=True)

BAD_DSNS = [
    f"postgresql://u:{SECRET}@[::1/x",  # a URI that does not parse: libpq quotes all of it
    f"postgresql://u:{SECRET}@pw1SECRET@127.0.0.1:1/x",  # an unescaped @ in the password: a host name made of the rest
    f"mysql://u:{SECRET}@host/x",  # not a DSN at all: quoted whole
    f"host=127.0.0.1 port=1 password={SECRET} junk",
    f"host=127.0.0.1 port=1 password='{SECRET} x' junk",
    f"postgresql://u@127.0.0.1:1/x?password={SECRET}&junk",
]

def password(exclude: str) -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs"), blacklist_characters=exclude), min_size=1, max_size=30)

@given(st.data(), st.text(max_size=20), st.text(max_size=20))
def test_redact_takes_every_password_out_of_a_message_quoting_the_dsn(data: st.DataObject, before: str, after: str) -> None:
    """Whatever the password, and however the DSN gives it, neither it nor the DSN quoted whole survives redact()."""
    form = data.draw(st.sampled_from(["uri", "query", "keyword", "quoted"]))
    if form == "uri":
        secret = data.draw(password("?#"))
        dsn = f"postgresql://user:{secret}@host:5432/db"
    elif form == "query":
        secret = data.draw(password("&#"))
        dsn = f"postgresql://user@host/db?sslmode=disable&password={secret}"
    elif form == "keyword":
        secret = data.draw(password("'"))
        dsn = f"host=h user=u password={secret} dbname=d"
    else:
        secret = data.draw(password("'\\"))
        dsn = f"host=h password='{secret}' dbname=d"
    for message in (f"{before}{secret}{after}", f'{before}"{dsn}"{after}'):
        assert secret not in redact(message, dsn).replace(MASK, "\x00")  # (a password of '*' is not in the mask's stead)
    for piece in secret.split("@")[1:]:  # libpq reports the rest of an unescaped '@' password as the host name
        if len(piece) >= 3:
            assert piece not in redact(f"failed to resolve host '{piece}@host'", dsn).replace(MASK, "\x00")

@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_a_database_error_never_echoes_the_password(dsn: str) -> None:
    with pytest.raises(TlogError) as e:
        SharedLogStore(dsn, "s3://bucket/p")
    assert "SECRET" not in str(e.value), str(e.value)

@pytest.mark.parametrize("dsn", [BAD_DSNS[0], f"postgresql://nobody:{SECRET}@127.0.0.1:1/x"])
def test_log_serve_with_a_password_in_a_bad_dsn_says_so_on_one_line_without_it(tmp_path, dsn: str) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    done = subprocess.run([sys.executable, "-m", "wasmlog", "log", "serve", "--key", str(key), "--store", dsn, "--objects", "s3://bucket/p"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "the log's database" in done.stderr, done.stderr
    assert "SECRET" not in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr

@pytest.mark.parametrize("url", [f"s3://AKIAEXAMPLE:{SECRET}@bucket/p", f"s3://{SECRET}@bucket", f"https://key:{SECRET}@host/bucket"])
def test_an_objects_url_with_credentials_in_it_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(MalformedError) as e:
        parse_objects_url(url)
    assert "SECRET" not in str(e.value) and "AWS_" in str(e.value)

class Relay:
    """A TCP relay on loopback to a real server, which the test can cut (the server's network going away):
    open connections are closed and new ones refused."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

async def test_an_add_while_the_bucket_is_unreachable_is_a_503_and_is_logged_after(shared, s3_path, seaweed, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """The only node's way to the bucket is cut once it runs: its integration rounds fail. Its submitter is
    answered 503 (not left hanging); the entry is sequenced, and once a node with the bucket integrates,
    the same submission gets its proof at the index it was given."""
    from tlog.server import make_app
    from tlog.shared_sequencer import SharedSequencer

    relay = Relay(seaweed.s3_port)
    node = SharedSequencer(Log(shared(objects=ObjectStore(f"s3://{s3_path}/log", endpoint_url=relay.url)), KEY), interval=0.01)
    node.answer_timeout = 0.5
    client = await aiohttp_client(make_app(node))
    relay.cut()
    r = await asyncio.wait_for(client.post("/add", data=b"while the bucket is away"), 60)
    assert r.status == 503 and r.headers["Retry-After"] == "1", (r.status, await r.text())
    assert "sequenced" in await r.text()
    await client.close()
    healthy = SharedSequencer(Log(shared(), KEY), interval=0.01)
    async with healthy.running():
        proof = await asyncio.wait_for(healthy.add(b"while the bucket is away"), 30)
    assert parse_tlog_proof(proof).index == 0

def test_log_serve_on_a_bucket_that_does_not_exist_says_so_at_start_up(tmp_path, pg_dsn, seaweed) -> None:  # type: ignore[no-untyped-def]
    from helpers import free_port

    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    done = subprocess.run([sys.executable, "-m", "wasmlog", "log", "serve", "--key", str(key), "--store", pg_dsn, "--objects",
                           "s3://wasmlog-no-such-bucket/log", "--listen", f"127.0.0.1:{free_port()}"],
                          env={**os.environ, **seaweed.env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "NoSuchBucket" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr

def test_a_bucket_that_accepts_connections_and_never_answers_is_unavailable_storage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A black hole (a real listener on loopback that reads nothing and answers nothing): a read fails as
    StorageUnavailableError after the store's timeout, rather than hanging on botocore's default of 60 s a try."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        with pytest.raises(StorageUnavailableError, match=r"timeout|timed out"):
            ObjectStore("s3://bucket/log", timeout=0.5).get("checkpoint")
    finally:
        silent.close()
