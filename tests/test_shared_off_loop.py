"""The registry on shared storage makes no blocking database or bucket call on its event loop.

Each node's stores (PostgreSQL and the bucket, real ones) record every call made from a thread that
runs an event loop; the scenario takes the paths that used to block it: a publish the rules refuse
(is it a replay? the dedup index is asked) and a replay, through a node that has not followed the
log yet, of a release another node logged (the records it does not know are read before answering).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from helpers import wait_until
from registry_helpers import REGISTRY_KEY, release_envelope
from test_shared_registry import EMPTY_MODULE

from registry.bucket_blobs import BucketBlobStore
from registry.client import RegistryClient, RegistryError
from registry.record import PackageRef
from registry.server import make_app
from registry.shared_service import SharedRegistry
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof
from tlog.server import make_app as make_log_app
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.shared import SharedLogStore

LOG_KEY = Ed25519Signer.generate("example.com/off-loop")
FOLLOW_NEVER = 3600.0  # a node that follows the log only when it answers its own submitters


def _on_loop(fn: Callable[..., Any], name: str, calls: list[str]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(RuntimeError):  # no running loop in this thread: a worker thread
            asyncio.get_running_loop()
            calls.append(name)
        return fn(*args, **kwargs)

    return call


def record_calls_on_loop(obj: object, calls: list[str]) -> None:
    """Make every public blocking method of obj append its name to calls when called from an event loop's thread."""
    for name in dir(type(obj)):
        attr = getattr(type(obj), name)
        if name.startswith("_") or name == "close" or not inspect.isfunction(attr) or inspect.iscoroutinefunction(attr):
            continue
        setattr(obj, name, _on_loop(getattr(obj, name), f"{type(obj).__name__}.{name}", calls))


@pytest.fixture
def closers():  # type: ignore[no-untyped-def]
    """Close functions called at the very end (request it before aiohttp_client: the apps stop first)."""
    closers: list[Callable[[], None]] = []
    yield closers
    for close in closers:
        with contextlib.suppress(Exception):
            close()


@pytest.fixture
def watched_nodes(closers, pg_dsn, s3_path, seaweed, monkeypatch, aiohttp_client):  # type: ignore[no-untyped-def]
    """A factory of registry nodes on one database and bucket whose stores record calls made on the event loop."""
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    calls: list[str] = []

    async def make(poll_interval: float = 0.02) -> tuple[RegistryClient, SharedRegistry]:
        store = SharedLogStore(pg_dsn, f"s3://{s3_path}/reg/log")
        blobs = BucketBlobStore(f"s3://{s3_path}/reg/blobs")
        closers.extend([store.close, blobs.close])
        sequencer = SharedSequencer(Log(store, REGISTRY_KEY), interval=0.01, poll_interval=poll_interval)
        registry = SharedRegistry(sequencer=sequencer, blobs=blobs)  # replays the log here: construction may block
        for obj in (store, store.objects, blobs.objects):
            record_calls_on_loop(obj, calls)
        client = await aiohttp_client(make_app(registry, sequencer))
        return RegistryClient(str(client.make_url("")), client.session), registry

    return make, calls


async def test_refused_publishes_and_replays_through_a_node_behind_make_no_blocking_call_on_the_loop(watched_nodes) -> None:  # type: ignore[no-untyped-def]
    make, calls = watched_nodes
    first, reg_a = await make()
    await wait_until(lambda: reg_a.sequencer.leading, "the first node to integrate")
    second, reg_b = await make(FOLLOW_NEVER)
    alice, bob = Ed25519Signer.generate("alice"), Ed25519Signer.generate("bob")
    ref = PackageRef("acme", "hello", "1.0.0")
    envelope = release_envelope(alice, ref, EMPTY_MODULE, None)
    await first.claim_if_unclaimed(alice, "acme")
    logged = parse_tlog_proof(await first.publish_signed(alice.vkey, envelope, EMPTY_MODULE))

    with pytest.raises(RegistryError) as refused:  # the namespace is alice's: is bob's release a replay? (no)
        await first.publish(bob, PackageRef("acme", "other", "1.0.0"), EMPTY_MODULE)
    assert refused.value.status == 403

    assert reg_b._applied_size <= logged.index  # the second node has not followed the log to alice's release
    again = parse_tlog_proof(await second.publish_signed(alice.vkey, envelope, EMPTY_MODULE))  # refused by what it knows; a replay
    assert again.index == logged.index
    assert (await second.get_json(second.package_path(ref)))["index"] == logged.index  # it serves what it answered for
    await wait_until(lambda: reg_b.log.published.checkpoint.size == reg_a.log.published.checkpoint.size, "both nodes at one size")
    for api in (first, second):  # every read route, the log's too
        path = api.package_path(ref)
        assert await api.get(path + "/module.wasm") == EMPTY_MODULE
        for tail in ("", "/statement", "/tlog-proof", "/tlog-proof?old=1"):
            await api.get(path + tail)
        await api.get("/api/v1/namespaces/acme")
        await api.get("/api/v1/namespaces/acme/actions")
        await api.get("/api/v1/packages/acme/hello")
        await api.get("/log/checkpoint")
        await api.get("/log/tile/0/000.p/1")
        await api.get("/log/tile/entries/000.p/1")
        await api.get("/log/proof/inclusion?index=0&size=2")
    await first.get(first.package_path(ref) + "/status-proof")  # (the second node has not followed the index root after it)
    assert calls == []


async def test_the_log_on_shared_storage_makes_no_blocking_call_on_the_loop(  # type: ignore[no-untyped-def]
        closers, pg_dsn, s3_path, seaweed, monkeypatch, aiohttp_client) -> None:
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    calls: list[str] = []
    clients = []
    for _ in range(2):
        store = SharedLogStore(pg_dsn, f"s3://{s3_path}/log")
        closers.append(store.close)
        sequencer = SharedSequencer(Log(store, LOG_KEY), interval=0.01)
        for obj in (store, store.objects):
            record_calls_on_loop(obj, calls)
        clients.append(await aiohttp_client(make_log_app(sequencer)))
    for i in range(300):  # over one full tile, through both nodes, a duplicate among them
        async with clients[i % 2].post("/add", data=b"entry %d" % min(i, 298)) as r:
            assert r.status == 200, await r.text()
    for client in clients:
        for path in ("/checkpoint", "/tile/0/000", "/tile/entries/000", "/tile/0/001.p/43", "/tile/entries/001.p/43",
                     "/proof/inclusion?index=3&size=299", "/proof/consistency?old=1&new=299", "/healthz"):
            await wait_until(functools.partial(_answers, client, path), f"{path} answered")  # (a follower catches up)
    assert calls == []


async def _answers(client, path: str) -> bool:  # type: ignore[no-untyped-def]
    async with client.get(path) as r:
        await r.read()
        return bool(r.status == 200)
