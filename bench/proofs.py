"""Proof generation rate at growing log sizes, beside raw SHA-256 speed. Prints JSON.

    python bench/proofs.py [--sizes 10000,1000000] [--seconds 2]

Trees are built in LMDB (tmp dir) through the real Log.integrate path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time

from tlog.log import Log
from tlog.merkle import consistency_proof, inclusion_proof
from tlog.note import Ed25519Signer
from tlog.storage.lmdb_store import LMDBLogStore


def rate(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(200):
            fn()
        n += 200
    return n / elapsed


def sha256_node_rate(seconds: float) -> float:
    a, b = b"\x01" * 32, b"\x02" * 32
    return rate(lambda: hashlib.sha256(b"\x01" + a + b).digest(), seconds)


def bench_size(size: int, seconds: float, batch: int = 100_000) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        store = LMDBLogStore(d, map_size=64 << 30)
        log = Log(store, Ed25519Signer.generate("bench.example/log"))
        t = time.perf_counter()
        for start in range(0, size, batch):
            log.integrate([b"entry %d" % i for i in range(start, min(size, start + batch))])
        build = time.perf_counter() - t
        rng = random.Random(size)
        reader = log.reader
        hot = [rng.randrange(size) for _ in range(64)]
        out = {
            "size": size,
            "build_entries_per_s": size / build,
            "inclusion_hot_per_s": rate(lambda: inclusion_proof(rng.choice(hot), size, reader), seconds),
            "inclusion_random_per_s": rate(lambda: inclusion_proof(rng.randrange(size), size, reader), seconds),
            "consistency_random_per_s": rate(lambda: consistency_proof(rng.randrange(1, size), size, reader), seconds),
        }
        # The same random proofs once every tile has been read (what a long-running server sees
        # when its tile cache holds the tree): separates tile I/O from per-proof work.
        for start in range(0, size, 256):
            inclusion_proof(start, size, reader)
        out["inclusion_random_warm_per_s"] = rate(lambda: inclusion_proof(rng.randrange(size), size, reader), seconds)
        out["level0_tiles"] = -(-size // 256)  # the default tile cache holds 4096 tiles
        store.close()
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    result = {
        "benchmark": "proofs",
        "baseline_sha256_node_hashes_per_s": sha256_node_rate(args.seconds),
        "sizes": [bench_size(int(s), args.seconds) for s in args.sizes.split(",")],
    }
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
