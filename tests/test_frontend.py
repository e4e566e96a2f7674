"""`wasmlog log serve --workers N`: front-end processes on one port, one sequencing process."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import signal
import subprocess
import sys
import time

import aiohttp
from helpers import free_port, front_end_pids, wait_front_ends_gone, wait_ready

from tlog.hashes import leaf_hash
from tlog.merkle import verify_inclusion
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.tiles import encode_entry_bundle

KEY = Ed25519Signer.generate("example.com/frontlog")
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)


def start(tmp_path, port: int, workers: int) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    return subprocess.Popen(
        [sys.executable, "-m", "wasmlog", "log", "serve", "--data", str(tmp_path / "db"), "--key", str(key),
         "--listen", f"127.0.0.1:{port}", "--interval-ms", "5", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


async def test_front_ends_forward_adds_and_proxy_reads_byte_for_byte(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, port, workers=2)
    try:
        # force_close: every request a new connection, so both front-ends serve some.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False) as s:
            await wait_ready(s, url, proc)
            assert len(front_end_pids(port)) == 2

            async def add(entry: bytes) -> int:
                async with s.post(url + "/add", data=entry) as r:
                    assert r.status == 200 and r.content_type == "text/plain"
                    tp = parse_tlog_proof(await r.read())
                verify_tlog_proof(tp, leaf_hash(entry), VERIFIER)
                return tp.index

            entries = [b"front %d" % i for i in range(200)]
            indexes = await asyncio.gather(*(add(e) for e in entries))
            assert sorted(indexes) == list(range(200))
            assert await add(entries[3]) == indexes[3]  # a duplicate: its first index

            async with s.post(url + "/add", data=b"") as r:
                assert r.status == 400
            async with s.post(url + "/add", data=b"x" * 65536) as r:
                assert r.status == 413
            async with s.get(url + "/tile/entries/000.p/200", headers={"Accept-Encoding": "gzip"}) as r:
                assert r.status == 200
                assert r.headers["Content-Encoding"] == "gzip" and "immutable" in r.headers["Cache-Control"]
                by_index = dict(zip(indexes, entries, strict=True))
                assert gzip.decompress(await r.read()) == encode_entry_bundle([by_index[i] for i in range(200)])
            async with s.get(url + "/tile/0/001") as r:  # beyond the tree
                assert r.status == 404
            async with s.get(url + "/checkpoint") as r:
                size = int((await r.text()).split("\n")[1])
                root = base64.b64decode((await r.text()).split("\n")[2])
            async with s.get(f"{url}/proof/inclusion?index={indexes[5]}&size={size}") as r:
                proof = [base64.b64decode(x) for x in (await r.text()).splitlines()]
            verify_inclusion(indexes[5], size, leaf_hash(entries[5]), proof, root)

            victim = front_end_pids(port)[0]  # a front-end dies: the log starts another
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                pids = front_end_pids(port)
                if len(pids) == 2 and victim not in pids:
                    break
                await asyncio.sleep(0.1)
            assert len(pids) == 2 and victim not in pids
            await wait_ready(s, url, proc)
            assert await add(b"after a front-end died") == len(entries)  # the next index
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not wait_front_ends_gone(port), "front-ends outlived the log"
