"""CPU per PUT and per GET of the log's bucket client against a local SeaweedFS, boto3's client beside ours. Prints JSON.

    python bench/objects.py [--requests 2000] [--threads 8] [--size 8192] [--rounds 2]

Starts a throwaway SeaweedFS (tests/services.py). Each round measures, in turn and close together,
boto3's client (the configuration ObjectStore had: standard retries, no parameter validation, checksums
only when required) and ObjectStore's own client (tlog/storage/s3_sync.py): --requests immutable PUTs
(If-None-Match: *) of --size bytes to distinct paths from --threads threads, then as many GETs of them
(ObjectStore.get without its cache). Reported per phase: requests/s, and CPU milliseconds per request
of this process ("client", the client's threads; this process does nothing else meanwhile), of
SeaweedFS ("s3") and their sum, and how busy the whole machine was (other users' processes included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import CpuMeter, child_pids

from tlog.storage.objects import ObjectStore
from tlog.tiles import IMMUTABLE

WARMUP = 100  # requests before each measured phase: connections open, code paths warm


Client = tuple[Callable[[str, bytes], None], Callable[[str], bytes]]  # put(key, body), get(key)


def boto3_client(bucket: str, threads: int) -> Client:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=2 * threads, parameter_validation=False,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    connect_timeout=10, read_timeout=10)
    s3 = boto3.client("s3", config=config)

    def put(key: str, body: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=body, CacheControl=IMMUTABLE, ContentType="application/octet-stream", IfNoneMatch="*")

    def get(key: str) -> bytes:
        data: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return data

    return put, get


def our_client(bucket: str, threads: int) -> Client:
    store = ObjectStore(f"s3://{bucket}", connections=2 * threads)
    return (lambda key, body: store.put(key, body, immutable=True, remember=False)), store.get


def phase(pool: ThreadPoolExecutor, work: Callable[[int], Any], n: int, s3_pids: Callable[[], list[int]]) -> dict[str, Any]:
    list(pool.map(work, range(-WARMUP, 0)))
    start = time.perf_counter()
    with CpuMeter({"s3": s3_pids}) as meter:
        list(pool.map(work, range(n)))
    seconds = time.perf_counter() - start
    return {"requests_per_s": round(n / seconds), "cpu_ms_per_request": meter.per_item_ms(n), "machine_busy": round(meter.machine_busy, 2)}


def measure(name: str, client: Client, args: argparse.Namespace, s3_pids: Callable[[], list[int]], round_no: int) -> dict[str, Any]:
    put, get = client
    body = os.urandom(args.size)
    key = lambda i: f"bench/{name}/{round_no}/{i + WARMUP}"
    with ThreadPoolExecutor(args.threads) as pool:
        out = {"put": phase(pool, lambda i: put(key(i), body), args.requests, s3_pids)}
        got = phase(pool, lambda i: len(get(key(i))) == args.size or sys.exit(f"{name}: a GET read other bytes"), args.requests, s3_pids)
        out["get"] = got
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from services import BUCKET, SeaweedServer, running

    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(running(SeaweedServer))
        assert isinstance(s3, SeaweedServer) and s3.proc is not None
        os.environ.update(s3.env)
        weed = s3.proc.pid
        s3_pids = lambda: [weed, *child_pids(weed)]
        rounds = [{name: measure(name, make(BUCKET, args.threads), args, s3_pids, r) for name, make in (("boto3", boto3_client), ("ours", our_client))}
                  for r in range(args.rounds)]
    print(json.dumps({"requests": args.requests, "threads": args.threads, "size": args.size, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
