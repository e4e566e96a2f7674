"""A pooled PostgreSQL connection whose session is gone costs no request (issue 17 follow-up).

After the database restarts, or its sessions are terminated, each thread's pooled connection of a
SharedLogStore is dead; the next transaction must not fail with StorageUnavailableError because of
it. Real PostgreSQL (the session's cluster, restarted here) and SeaweedFS; the silent failover goes
through a real TCP proxy on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
from services import poll

from tlog.errors import StorageUnavailableError
from tlog.hashes import leaf_hash
from tlog.storage.shared import SharedLogStore


def sessions(dsn: str) -> set[int]:
    """The backend pids of the other sessions on dsn's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return {pid for (pid,) in rows}


def entries(*names: bytes) -> tuple[list[bytes], list[bytes]]:
    return list(names), [leaf_hash(n) for n in names]


def test_the_next_calls_succeed_after_the_pooled_sessions_are_terminated(shared, pg_dsn) -> None:  # type: ignore[no-untyped-def]
    store = shared()
    assert store.sequence(*entries(b"before")) == [0]
    assert store.checkpoint() is None
    pooled = sessions(pg_dsn)
    assert pooled  # the store's connection for this thread
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        for pid in pooled:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    poll(lambda: not sessions(pg_dsn) & pooled, "the terminated sessions to end")
    assert store.committed_size() == 0  # non-atomic: one statement, committed by itself
    assert store.sequence(*entries(b"before", b"after")) == [0, 1]  # atomic


def test_the_next_calls_succeed_after_the_database_restarts(shared, postgres) -> None:  # type: ignore[no-untyped-def]
    store = shared()
    assert store.sequence(*entries(b"before")) == [0]
    postgres.stop("fast")
    postgres.start()
    assert store.sequence(*entries(b"before", b"after")) == [0, 1]
    assert store.sequenced(0, 10) == [b"before", b"after"]


class Proxy:
    """A TCP proxy on loopback to PostgreSQL. fail_over(): the connections it carries go silent (a database
    host gone without a word) and are reset as soon as their client sends; new ones go through."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silenced: set[socket.socket] = set()
        self.carried: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
                with self.lock:
                    self.carried.append((client, upstream))
                threading.Thread(target=self.relay, args=(client, upstream), daemon=True).start()
                threading.Thread(target=self.relay, args=(upstream, client), daemon=True).start()

    def relay(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self.lock:
                    silenced = source in self.silenced or sink in self.silenced
                if silenced:
                    if source in self.silenced:  # the client spoke on a dead path: reset it
                        source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        source.close()
                    return
                sink.sendall(data)

    def fail_over(self) -> None:
        with self.lock:
            self.silenced |= {client for client, _ in self.carried}
            for _, upstream in self.carried:  # the old database host is gone; its client is not told
                upstream.shutdown(socket.SHUT_RDWR)
            self.carried.clear()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(pg_dsn) -> Iterator[tuple[Proxy, str]]:  # type: ignore[no-untyped-def]
    url = urllib.parse.urlsplit(pg_dsn)
    made = Proxy((url.hostname or "127.0.0.1", url.port or 5432))
    yield made, urllib.parse.urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{made.port}"))
    made.close()


def test_a_transaction_begun_on_a_silently_dead_pooled_connection_is_begun_again(shared, proxy, s3_path, request) -> None:  # type: ignore[no-untyped-def]
    tcp, dsn = proxy
    shared()  # the log's tables, and the bucket's credentials in the environment
    store = SharedLogStore(dsn, f"s3://{s3_path}/log")
    request.addfinalizer(store.close)
    assert store.sequence(*entries(b"before")) == [0]
    tcp.fail_over()
    assert store.sequence(*entries(b"before", b"after")) == [0, 1]  # its BEGIN failed, then it was begun again
    tcp.fail_over()
    with pytest.raises(StorageUnavailableError):  # a non-atomic call's first statement is its caller's: not retried
        store.committed_size()
    assert store.committed_size() == 0
