"""Witness add-checkpoint throughput and cosign latency over HTTP, beside Ed25519 rates. Prints JSON.

    python bench/witness.py [--logs 32] [--checkpoints 200]

Runs `wasmlog witness serve` as a subprocess (LMDB, fsync per cosignature) and
drives it with one chain of consistent checkpoints per log, the logs in
parallel. Each request costs the witness one Ed25519 verify, one consistency
proof check, one Ed25519 sign and one durable LMDB commit; the baseline is
pynacl's verify+sign rate measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import aiohttp
import nacl.signing
from common import free_port

from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.storage.memory import MemoryLogStore
from tlog.witness_protocol import AddCheckpoint


def ed25519_rate(seconds: float = 1.0) -> float:
    sk = nacl.signing.SigningKey.generate()
    msg = b"cosignature/v1\ntime 1\nexample.com/log\n1\n" + b"A" * 44 + b"\n"
    sig = sk.sign(msg).signature
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sk.verify_key.verify(msg, sig)
        sk.sign(msg)
        n += 1
    return n / (time.perf_counter() - start)


def chains(logs: int, checkpoints: int) -> tuple[list[Ed25519Signer], list[list[bytes]]]:
    keys = [Ed25519Signer.generate(f"bench{i}.example/log") for i in range(logs)]
    out = []
    for key in keys:
        log = Log(MemoryLogStore(), key)
        bodies = []
        for i in range(1, checkpoints + 1):
            log.integrate([b"entry %d" % i])
            proof = log.consistency_proof(i - 1, i) if i > 1 else []
            bodies.append(AddCheckpoint(i - 1, tuple(proof), log.published.note).encode())
        out.append(bodies)
    return keys, out


async def drive(url: str, all_bodies: list[list[bytes]]) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(all_bodies))) as session:

        async def chain(bodies: list[bytes]) -> None:
            nonlocal errors
            for body in bodies:
                t = time.perf_counter()
                async with session.post(url + "/add-checkpoint", data=body) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(chain(b) for b in all_bodies))
        return time.perf_counter() - start, latencies, errors


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--logs", type=int, default=32)
    p.add_argument("--checkpoints", type=int, default=200)
    args = p.parse_args()
    keys, bodies = chains(args.logs, args.checkpoints)
    with tempfile.TemporaryDirectory() as d:
        wkey = Ed25519Signer.generate("bench-witness.example", ALG_COSIGNATURE_V1)
        with open(os.path.join(d, "w.key"), "w") as f:
            f.write(wkey.private_key + "\n")
        with open(os.path.join(d, "logs.txt"), "w") as f:
            f.write("logs/v0\n" + "".join(f"vkey {k.vkey}\nqpd 86400\n" for k in keys))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "wasmlog", "witness", "serve", "--data", os.path.join(d, "db"), "--key", os.path.join(d, "w.key"),
             "--log-list", os.path.join(d, "logs.txt"), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            elapsed, lat, errors = asyncio.run(drive(f"http://127.0.0.1:{port}", bodies))
        finally:
            server.terminate()
            server.wait()
    lat.sort()
    result = {
        "benchmark": "witness_add_checkpoint",
        "logs": args.logs,
        "requests": len(lat),
        "errors": errors,
        "requests_per_s": len(lat) / elapsed,
        "latency_p50_s": lat[len(lat) // 2],
        "latency_p99_s": lat[int(len(lat) * 0.99)],
        "baseline_ed25519_verify_plus_sign_per_s": ed25519_rate(),
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
