"""The log over real HTTP on loopback, on each storage engine (LMDB; PostgreSQL + S3): adds, reads,
proofs, errors; and LMDB's faults (a full map, failures around its commit, a slow disk)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import threading

import pytest
import reference
from engines import LMDBEngine
from helpers import wait_until

from tlog.checkpoint import parse_checkpoint
from tlog.errors import TlogError
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.merkle import verify_consistency, verify_inclusion
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.server import SEQUENCER, make_app
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.tiles import parse_entry_bundle, split_hashes

KEY = Ed25519Signer.generate("example.com/testlog")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


async def start(aiohttp_client, engine, **kw):  # type: ignore[no-untyped-def]
    """The log app on a new store of engine (tests/engines.py); store options (map_size, before_commit, after_commit) pass through."""
    store_kw = {k: kw.pop(k) for k in ("map_size", "before_commit", "after_commit") if k in kw}
    store = engine.open(**store_kw)
    log = Log(store, KEY)
    seq = engine.sequencer(log, interval=kw.pop("interval", 0.01), **kw)
    client = await aiohttp_client(make_app(seq))
    return client, store


async def add(client, entry: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    r = await client.post("/add", data=entry)
    assert r.status == 200, await r.text()
    tp = parse_tlog_proof(await r.read())
    verify_tlog_proof(tp, leaf_hash(entry), VERIFIER)
    return tp.index, tp.checkpoint


async def test_add_returns_verifiable_tlog_proof(aiohttp_client, engine) -> None:
    client, _ = await start(aiohttp_client, engine)
    r = await client.post("/add", data=b"hello")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    tp = parse_tlog_proof(await r.read())
    assert tp.index == 0 and tp.extra is None
    cp, _, _ = verify_tlog_proof(tp, leaf_hash(b"hello"), VERIFIER)
    assert cp.origin == "example.com/testlog" and cp.size == 1


async def test_concurrent_adds_get_distinct_indexes_and_duplicates_the_first(aiohttp_client, engine) -> None:
    client, _ = await start(aiohttp_client, engine)
    entries = [b"entry %d" % i for i in range(300)]
    results = await asyncio.gather(*(add(client, e) for e in entries))
    assert sorted(i for i, _ in results) == list(range(300))
    index_of = {e: i for e, (i, _) in zip(entries, results, strict=True)}
    again = await asyncio.gather(*(add(client, e) for e in entries[:20]), add(client, entries[0]))
    assert [i for i, _ in again[:20]] == [index_of[e] for e in entries[:20]]
    # the tiles and bundles at the final size are the RFC 6962 hashes of the entries, in index order
    r = await client.get("/checkpoint")
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "max-age" in r.headers["Cache-Control"]
    note, _ = open_note(await r.read(), [VERIFIER])
    cp = parse_checkpoint(note.text)
    ordered = tuple(sorted(entries, key=index_of.__getitem__))
    assert cp.size == 300 and cp.root_hash == reference.mth(ordered)
    full = await client.get("/tile/0/000")
    assert full.status == 200 and full.headers["Content-Type"] == "application/octet-stream"
    assert "immutable" in full.headers["Cache-Control"]
    assert split_hashes(await full.read()) == [leaf_hash(e) for e in ordered[:256]]
    part = await client.get("/tile/0/001.p/44")
    assert split_hashes(await part.read()) == [leaf_hash(e) for e in ordered[256:]]
    top = await client.get("/tile/1/000.p/1")
    assert await top.read() == reference.mth(ordered, 0, 256)
    bundle = await client.get("/tile/entries/001.p/44", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in bundle.headers
    assert parse_entry_bundle(await bundle.read(), 44) == list(ordered[256:])
    gz = await client.get("/tile/entries/000", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert gz.headers["Content-Encoding"] == "gzip"
    assert parse_entry_bundle(gzip.decompress(await gz.read()), 256) == list(ordered[:256])
    # a smaller partial width of an existing tile is a prefix (sizes that had checkpoints)
    small = await client.get("/tile/0/001.p/3")
    assert split_hashes(await small.read()) == [leaf_hash(e) for e in ordered[256:259]]


@pytest.mark.parametrize(
    "path,status",
    [
        ("/tile/0/001.p/45", 404),  # wider than the tree
        ("/tile/0/002", 404),
        ("/tile/1/000", 404),
        ("/tile/entries/001", 404),
        ("/tile/0/01", 400),
        ("/tile/0/x000/001", 400),
        ("/tile/64/000", 400),
        ("/tile/0/000.p/0", 400),
        ("/proof/inclusion?index=0&size=301", 404),
        ("/proof/inclusion?index=300&size=300", 400),
        ("/proof/inclusion?index=01&size=3", 400),
        ("/proof/inclusion?index=1", 400),
        ("/proof/inclusion?index=1&index=2&size=3", 400),
        ("/proof/consistency?old=0&new=3", 400),
        ("/proof/consistency?old=4&new=3", 400),
        ("/proof/consistency?old=1&new=301", 404),
        ("/proof/consistency?old=-1&new=3", 400),
        ("/proof/consistency?old=99999999999999999999&new=3", 400),
    ],
)
async def test_bad_reads_get_4xx(aiohttp_client, engine, path: str, status: int) -> None:
    client, _ = await start(aiohttp_client, engine)
    await asyncio.gather(*(add(client, b"%d" % i) for i in range(300)))
    r = await client.get(path)
    assert r.status == status, await r.text()


async def test_proof_endpoints(aiohttp_client, engine) -> None:
    client, _ = await start(aiohttp_client, engine)
    entries = [b"x%d" % i for i in range(40)]
    for e in entries[:17]:
        await add(client, e)  # one at a time: a checkpoint at every size
    await asyncio.gather(*(add(client, e) for e in entries[17:]))
    r = await client.get("/checkpoint")
    note, _ = open_note(await r.read(), [VERIFIER])
    cp = parse_checkpoint(note.text)
    got = await client.get(f"/proof/inclusion?index=3&size={cp.size}")
    proof = [base64.b64decode(x) for x in (await got.text()).splitlines()]
    verify_inclusion(3, cp.size, leaf_hash(entries[3]), proof, cp.root_hash)
    got = await client.get(f"/proof/consistency?old=5&new={cp.size}")
    proof = [base64.b64decode(x) for x in (await got.text()).splitlines()]
    verify_consistency(5, cp.size, proof, reference.mth(tuple(entries[:5])), cp.root_hash)
    same = await client.get(f"/proof/consistency?old={cp.size}&new={cp.size}")
    assert same.status == 200 and await same.text() == ""


async def test_entry_size_limits(aiohttp_client, engine) -> None:
    client, _ = await start(aiohttp_client, engine)
    assert (await client.post("/add", data=b"")).status == 400
    assert (await client.post("/add", data=b"x" * 65536)).status == 413
    assert (await client.post("/add", data=b"x" * 1_000_000)).status == 413
    await add(client, b"x" * 65535)


async def test_full_pool_gets_503_with_retry_after(aiohttp_client, tmp_path) -> None:
    committing, release = threading.Event(), threading.Event()

    def slow(plan) -> None:  # type: ignore[no-untyped-def]
        if plan.new_entries:  # not the empty tree's first checkpoint
            committing.set()  # a slow disk: the next entries pile up while this batch commits
            release.wait(10)

    client, _ = await start(aiohttp_client, LMDBEngine(tmp_path), interval=0.01, batch_max=2, max_pending=2, before_commit=slow)
    seq = client.app[SEQUENCER]
    try:
        in_flight = [asyncio.create_task(client.post("/add", data=b"p%d" % i)) for i in range(2)]
        assert await asyncio.to_thread(committing.wait, 10), "the first batch never reached its commit"
        queued = [asyncio.create_task(client.post("/add", data=b"q%d" % i)) for i in range(2)]
        await wait_until(lambda: seq.pending == 2, "two entries pending behind the committing batch")
        r = await client.post("/add", data=b"one too many")
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        release.set()
        assert [x.status for x in await asyncio.gather(*in_flight, *queued)] == [200] * 4
    finally:
        release.set()


async def test_storage_full_is_a_clear_error_and_loses_nothing(aiohttp_client, tmp_path) -> None:
    client, store = await start(aiohttp_client, LMDBEngine(tmp_path), map_size=1 << 20)
    acked = []
    status = 200
    i = 0
    while status == 200 and i < 200:
        r = await client.post("/add", data=b"%d" % i + b"y" * 20000)
        status = r.status
        if status == 200:
            acked.append((i, parse_tlog_proof(await r.read())))
        i += 1
    assert status == 507, status
    assert "full" in (await r.text())
    await client.close()
    store.close()
    reopened = LMDBLogStore(str(tmp_path), map_size=1 << 20)
    log = Log(reopened, KEY)
    assert log.published.checkpoint.size == len(acked)
    for n, tp in acked:
        assert reopened.read_entries(tp.index, tp.index + 1) == [b"%d" % n + b"y" * 20000]
    reopened.close()


class Boom(TlogError):
    pass


async def test_failure_before_commit_fails_the_batch_and_writes_nothing(aiohttp_client, tmp_path) -> None:
    fail = {"on": False}

    def before(plan) -> None:  # type: ignore[no-untyped-def]
        if fail["on"]:
            raise Boom("injected failure before commit")

    client, store = await start(aiohttp_client, LMDBEngine(tmp_path), before_commit=before)
    await add(client, b"a")
    fail["on"] = True
    rs = await asyncio.gather(*(client.post("/add", data=b"b%d" % i) for i in range(5)))
    assert [r.status for r in rs] == [500] * 5
    fail["on"] = False
    assert parse_checkpoint(open_note(store.checkpoint(), [VERIFIER])[0].text).size == 1
    index, _ = await add(client, b"c")
    assert index == 1  # nothing of the failed batch was written


async def test_failure_after_commit_never_forks(aiohttp_client, tmp_path) -> None:
    fail = {"on": False}

    def after(plan) -> None:  # type: ignore[no-untyped-def]
        if fail["on"]:
            raise Boom("injected failure after commit")

    client, store = await start(aiohttp_client, LMDBEngine(tmp_path), after_commit=after)
    _, first = await add(client, b"a")
    fail["on"] = True
    rs = await asyncio.gather(*(client.post("/add", data=b"b%d" % i) for i in range(5)))
    assert [r.status for r in rs] == [500] * 5  # durable, but nobody was told
    fail["on"] = False
    index, latest = await add(client, b"b0")  # resubmitting finds the stored entry
    cp0 = parse_checkpoint(open_note(first, [VERIFIER])[0].text)
    cp1 = parse_checkpoint(open_note(latest, [VERIFIER])[0].text)
    assert 1 <= index <= 5 and cp1.size == 6
    r = await client.get(f"/proof/consistency?old={cp0.size}&new={cp1.size}")
    proof = [base64.b64decode(x) for x in (await r.text()).splitlines()]
    verify_consistency(cp0.size, cp1.size, proof, cp0.root_hash, cp1.root_hash)
