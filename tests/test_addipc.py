"""POST /add forwarded between processes (tlog/addipc.py): the sequencing side over a real
LMDB log, the front-end client over a real Unix socket, and every status passed through."""

from __future__ import annotations

import asyncio
import pathlib
import threading

import pytest
from helpers import wait_until

from tlog.addipc import AddClient, AddServer, ForwardedError
from tlog.errors import TlogError
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.sequencer import Sequencer
from tlog.server import status_for
from tlog.storage.lmdb_store import LMDBLogStore

KEY = Ed25519Signer.generate("example.com/ipclog")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


class Boom(TlogError):
    pass


async def connected(tmp_path: pathlib.Path, **kw):  # type: ignore[no-untyped-def]
    store_kw = {k: kw.pop(k) for k in ("before_commit",) if k in kw}
    store = LMDBLogStore(str(tmp_path / "db"), **store_kw)
    seq = Sequencer(Log(store, KEY), interval=kw.pop("interval", 0.01), **kw)
    server = await AddServer(seq.submit, status_for).start(str(tmp_path / "add.sock"))
    client = AddClient()
    await client.connect(str(tmp_path / "add.sock"))
    return seq, server, client, store


async def test_forwarded_entries_get_verifiable_proofs_and_duplicates_their_first_index(tmp_path: pathlib.Path) -> None:
    seq, server, client, store = await connected(tmp_path)
    async with seq.running():
        entries = [b"entry %d" % i for i in range(300)]
        proofs = await asyncio.gather(*(client.add(e) for e in entries))
        indexes = set()
        for entry, proof in zip(entries, proofs, strict=True):
            tp = parse_tlog_proof(proof)
            verify_tlog_proof(tp, leaf_hash(entry), VERIFIER)
            indexes.add(tp.index)
        assert indexes == set(range(300))
        again = parse_tlog_proof(await client.add(entries[7]))
        assert again.index == parse_tlog_proof(proofs[7]).index
        big = b"x" * 65535  # the largest entry crosses the socket in one frame
        verify_tlog_proof(parse_tlog_proof(await client.add(big)), leaf_hash(big), VERIFIER)
    await client.close()
    server.close()
    store.close()


async def test_statuses_of_the_sequencing_process_reach_the_front_end(tmp_path: pathlib.Path) -> None:
    fail = {"on": False, "slow": False}
    committing, release = threading.Event(), threading.Event()

    def before(plan) -> None:  # type: ignore[no-untyped-def]
        if fail["on"]:
            raise Boom("injected failure before commit")
        if fail["slow"]:
            committing.set()
            release.wait(10)

    seq, server, client, store = await connected(tmp_path, before_commit=before, batch_max=2, max_pending=2)
    try:
        async with seq.running():
            with pytest.raises(ForwardedError) as empty:
                await client.add(b"")
            assert empty.value.forwarded_status == 400
            fail["on"] = True
            with pytest.raises(ForwardedError) as failed:
                await client.add(b"fails")
            assert failed.value.forwarded_status == 500 and "injected failure" in str(failed.value)
            fail["on"], fail["slow"] = False, True
            first = [asyncio.create_task(client.add(b"p%d" % i)) for i in range(2)]
            assert await asyncio.to_thread(committing.wait, 10), "the first batch never reached its commit"
            queued = [asyncio.create_task(client.add(b"q%d" % i)) for i in range(2)]  # these two fill the pool
            await wait_until(lambda: seq.pending == 2, "two entries pending behind the committing batch")
            with pytest.raises(ForwardedError) as full:
                await client.add(b"one too many")
            assert full.value.forwarded_status == 503
            release.set()
            assert len(await asyncio.gather(*first, *queued)) == 4
    finally:
        release.set()
    await client.close()
    server.close()
    store.close()


async def test_waiting_front_end_requests_fail_with_503_when_the_sequencer_goes_away(tmp_path: pathlib.Path) -> None:
    committing, release = threading.Event(), threading.Event()

    def stall(plan) -> None:  # type: ignore[no-untyped-def]
        if plan.new_entries:  # not the empty tree's first checkpoint
            committing.set()
            release.wait(10)

    seq, server, client, store = await connected(tmp_path, before_commit=stall)
    try:
        async with seq.running():
            pending = asyncio.create_task(client.add(b"never answered"))
            assert await asyncio.to_thread(committing.wait, 10), "the entry never reached the sequencing side"
            server.close()
            with pytest.raises(ForwardedError) as gone:
                await asyncio.wait_for(pending, 5)
            assert gone.value.forwarded_status == 503
            assert client.closed.is_set()
            release.set()
            await wait_until(lambda: seq.integrated == 1, "the stalled batch to finish its commit")
    finally:
        release.set()
    await client.close()
    store.close()
