from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
from typing import Any

import pytest
from hypothesis import settings

# CI explores the same examples on every run (a red CI blocks landing, so it must be reproducible);
# local runs draw new examples each time and are where new counterexamples get found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VECTORS = ROOT / "tests" / "vectors"  # published known-answer values; see tests/vectors/README.md


def load_vectors(name: str) -> dict:
    """Load a vector file from tests/vectors; a missing file fails the test."""
    p = VECTORS / name
    if not p.exists():
        pytest.fail(f"vector file {p} not found")
    return json.loads(p.read_text())


def _service(make):  # type: ignore[no-untyped-def]
    """Start a session-wide server (tests/services.py); skip if its binaries are missing, but fail under CI."""
    from services import ServiceMissing, running

    try:
        cm = running(make)
        server = cm.__enter__()
    except ServiceMissing as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e}: CI must have it (.ci/run installs it)")
        pytest.skip(str(e))
    return cm, server


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """A throwaway PostgreSQL cluster for the whole session (services.PostgresServer)."""
    from services import PostgresServer

    cm, server = _service(PostgresServer)
    yield server
    cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def seaweed():  # type: ignore[no-untyped-def]
    """A throwaway SeaweedFS with its S3 gateway for the whole session (services.SeaweedServer)."""
    from services import SeaweedServer

    cm, server = _service(SeaweedServer)
    yield server
    cm.__exit__(None, None, None)


_names = iter(range(1 << 30))


@pytest.fixture
def pg_dsn(postgres):  # type: ignore[no-untyped-def]
    """A new empty database in the session's cluster."""
    return postgres.new_database(f"t{os.getpid()}_{next(_names)}")


@pytest.fixture
def s3_path(seaweed):  # type: ignore[no-untyped-def]
    """BUCKET/PREFIX: a new empty prefix in the session's SeaweedFS bucket (s3://{s3_path}/... is a fresh place)."""
    from services import BUCKET

    return f"{BUCKET}/t{os.getpid()}-{next(_names)}"


@pytest.fixture(params=["lmdb", "shared"])
def engine(request, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Each storage engine of the log in turn (tests/engines.py); the shared one on a new database and bucket."""
    from engines import LMDBEngine, SharedEngine

    if request.param == "lmdb":
        made = LMDBEngine(tmp_path / "lmdb")
    else:
        seaweed = request.getfixturevalue("seaweed")
        for k, v in seaweed.env.items():
            monkeypatch.setenv(k, v)
        made = SharedEngine(request.getfixturevalue("pg_dsn"), f"s3://{request.getfixturevalue('s3_path')}/log")
    yield made
    made.close()


@pytest.fixture
def shared(pg_dsn, s3_path, seaweed, monkeypatch):  # type: ignore[no-untyped-def]
    """A factory of SharedLogStores (of any subclass: cls=) on one new database and bucket prefix,
    closed at the end; the AWS_* variables reach the session's SeaweedFS."""
    from tlog.storage.shared import SharedLogStore

    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    stores: list[SharedLogStore] = []

    def make(cls: type[SharedLogStore] = SharedLogStore, **kw: Any) -> SharedLogStore:
        store = cls(pg_dsn, f"s3://{s3_path}/log", **kw)
        stores.append(store)
        return store

    yield make
    for store in stores:
        with contextlib.suppress(Exception):
            store.close()
