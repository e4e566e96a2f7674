"""SIGKILL the real log server under load; nothing acknowledged is lost and the tree never forks."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import subprocess
import sys

import aiohttp
import pytest
from helpers import free_port, wait_front_ends_gone, wait_ready

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.hashes import leaf_hash
from tlog.merkle import verify_consistency, verify_inclusion
from tlog.note import Ed25519Signer, Ed25519Verifier, open_note
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof

ROUNDS = 3
CLIENTS = 32



def start_server(data: str, key: str, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "wasmlog", "log", "serve", "--data", data, "--key", key,
         "--listen", f"127.0.0.1:{port}", "--interval-ms", "5", "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


async def load(session: aiohttp.ClientSession, url: str, tag: str, acked: dict[bytes, tuple[int, bytes]]) -> None:
    n = 0
    while True:
        entry = f"{tag}-{n}".encode()
        n += 1
        try:
            async with session.post(url + "/add", data=entry) as r:
                if r.status != 200:
                    continue
                body = await r.read()
        except (TimeoutError, aiohttp.ClientError):
            return  # the server died: whatever was not acknowledged may or may not be logged
        tp = parse_tlog_proof(body)
        acked[entry] = (tp.index, tp.checkpoint)


def checkpoint_of(note: bytes, verifier: Ed25519Verifier) -> Checkpoint:
    return parse_checkpoint(open_note(note, [verifier])[0].text)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-front-ends"])
async def test_sigkill_under_load_loses_nothing_and_never_forks(tmp_path, workers: int) -> None:
    """With front-ends, the sequencing process is the one killed; its front-ends must exit too."""
    signer = Ed25519Signer.generate("example.com/crashlog")
    key = tmp_path / "log.key"
    key.write_text(signer.private_key + "\n")
    verifier = Ed25519Verifier(signer.name, signer.public_key)
    data = str(tmp_path / "db")
    acked: dict[bytes, tuple[int, bytes]] = {}
    seen_checkpoints: dict[int, bytes] = {}
    rng = random.Random(1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for round_ in range(ROUNDS + 1):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start_server(data, str(key), port, workers)
            try:
                note = await wait_ready(session, url, proc)
                cp = checkpoint_of(note, verifier)
                # Every acknowledged entry is still there, at the same index.
                for entry, (index, _) in acked.items():
                    assert index < cp.size
                    async with session.get(f"{url}/proof/inclusion?index={index}&size={cp.size}") as r:
                        proof = [base64.b64decode(x) for x in (await r.text()).splitlines()]
                    verify_inclusion(index, cp.size, leaf_hash(entry), proof, cp.root_hash)
                # Every checkpoint ever published is consistent with the one after restart.
                for size, old_note in seen_checkpoints.items():
                    old = checkpoint_of(old_note, verifier)
                    if size == 0:
                        continue
                    async with session.get(f"{url}/proof/consistency?old={size}&new={cp.size}") as r:
                        proof = [base64.b64decode(x) for x in (await r.text()).splitlines()]
                    verify_consistency(size, cp.size, proof, old.root_hash, cp.root_hash)
                if round_ == ROUNDS:
                    break
                before = len(acked)
                tasks = [asyncio.create_task(load(session, url, f"r{round_}c{c}", acked)) for c in range(CLIENTS)]
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
                assert not await asyncio.to_thread(wait_front_ends_gone, port), "front-ends outlived the killed log"
                assert len(acked) > before, "no entry was acknowledged before the kill"
                for _, (_, cp_note) in acked.items():
                    c = checkpoint_of(cp_note, verifier)
                    seen_checkpoints.setdefault(c.size, cp_note)
                    assert seen_checkpoints[c.size] == cp_note or checkpoint_of(seen_checkpoints[c.size], verifier) == c
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        # Resubmitting an acknowledged entry answers its original index.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(data, str(key), port)
        try:
            await wait_ready(session, url, proc)
            for entry, (index, _) in list(acked.items())[:: max(1, len(acked) // 20)]:
                async with session.post(url + "/add", data=entry) as r:
                    tp = parse_tlog_proof(await r.read())
                assert tp.index == index
                verify_tlog_proof(tp, leaf_hash(entry), verifier)
        finally:
            proc.terminate()
            proc.wait()
