"""A `--workers` group refuses a port someone else holds, while its own processes share it (SO_REUSEPORT).

Real sockets on loopback and real `wasmlog log serve --workers 2` processes; the shared-storage
groups are covered in tests/test_shared_workers.py."""

from __future__ import annotations

import errno
import pathlib
import signal
import socket

import aiohttp
import pytest
from helpers import free_port, front_end_pids, wait_front_ends_gone, wait_ready
from test_frontend import start

from tlog.httplimits import claimed_port


def listener(port: int, *, reuse_port: bool) -> socket.socket:
    """A listening socket on 127.0.0.1:port as a server binds one (SO_REUSEADDR, and SO_REUSEPORT when shared)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_someone_listens_on_is_refused(reuse_port: bool) -> None:
    port = free_port()
    with listener(port, reuse_port=reuse_port), pytest.raises(OSError) as refused, claimed_port("127.0.0.1", port):
        pytest.fail("claimed a port another server listens on")
    assert refused.value.errno == errno.EADDRINUSE and f"127.0.0.1:{port} is already in use" in str(refused.value)


def test_a_claimed_port_takes_the_groups_listeners_and_refuses_another_group_before_any_listens() -> None:
    port = free_port()
    with claimed_port("127.0.0.1", port):
        with pytest.raises(OSError) as refused, claimed_port("127.0.0.1", port):  # nobody listens yet
            pytest.fail("two groups claimed one port")
        assert refused.value.errno == errno.EADDRINUSE
        with listener(port, reuse_port=True), listener(port, reuse_port=True), socket.create_connection(("127.0.0.1", port)):
            pass  # the group's own processes share the port, and take its connections
        with pytest.raises(OSError):
            listener(port, reuse_port=False).close()  # a lone server is refused too
    with claimed_port("127.0.0.1", port):  # released with the block
        pass


async def test_a_second_workers_group_on_the_port_exits_with_one_line_and_the_first_keeps_it(tmp_path: pathlib.Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start(tmp_path / "a", port, workers=2)
    second = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            await wait_ready(s, url, first)
            async with s.post(url + "/add", data=b"in the first group's log") as r:
                assert r.status == 200
            async with s.get(url + "/checkpoint") as r:
                checkpoint = await r.read()
            assert checkpoint.split(b"\n")[1] == b"1"
            front_ends = sorted(front_end_pids(port))
            assert len(front_ends) == 2
            second = start(tmp_path / "b", port, workers=2)
            assert second.wait(60) == 1
            assert second.stderr is not None
            error = second.stderr.read().decode().strip()
            assert error.count("\n") == 0 and f"127.0.0.1:{port} is already in use by another process" in error, error
            assert sorted(front_end_pids(port)) == front_ends and first.poll() is None
            for _ in range(8):  # every connection still reaches the first group's log
                async with s.get(url + "/checkpoint") as r:
                    assert r.status == 200 and await r.read() == checkpoint
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        first.send_signal(signal.SIGTERM)
        first.wait(20)
    assert not wait_front_ends_gone(port), "front-ends outlived the log"
