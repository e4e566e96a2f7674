"""The agent's telemetry costs, each beside a baseline measured in the same run. Prints JSON.

    python bench/telemetry.py [--events 3000] [--seconds 5] [--concurrency 4]

- spool: events/s appended durably to the LMDB spool (one synced transaction per event, and per
  batch of 64), p50/p99 of one append (the cost the spool adds to a request that produces an
  event, which waits for it); baseline: fsync'd 300-byte file appends/s in the same directory.
- delivery: events/s shipped from a spool of --events events to a collector over loopback HTTP
  (OTLP JSON, batches of 512, each stored and fsynced by the collector).
- request_failed: p50/p99 of the agent's call for a failed request that is the first of its
  interval (spooled durably) and for one that is aggregated (counted in memory).
- flood: `wasmlog agent serve` (a process): requests/s and p99 of a served module with
  --concurrency clients, without and then with a flood of --concurrency clients asking for a
  refused module (403s: telemetry events); events spooled during the flood (aggregated: a few per
  interval); baseline: the same with a flood of requests for an unconfigured name (404s, no event),
  which costs the same CPU on the shared machine but no telemetry.
Target: served p99 during the refused flood within 2x of that during the 404 flood (the machine's
own cost of any flood); the flood's events far fewer than its requests (under a tenth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import tempfile
import time
from typing import Any

import aiohttp
import wasmtime
from agent import WASI, hello, start_registry, summary
from common import agent_process

from edge.telemetry import Telemetry
from edge.telemetry_collector import make_collector_app
from edge.telemetry_events import ADMITTED, Draft
from edge.telemetry_ship import Shipper
from edge.telemetry_spool import Spool
from registry.client import RegistryClient
from registry.record import parse_package_ref
from tlog.httplimits import DEFAULT_LIMITS, start_server
from tlog.note import Ed25519Signer

ALICE = Ed25519Signer.generate("alice")
NETTY = wasmtime.wat2wasm(f'(module (import "{WASI}" "sock_accept" (func (param i32 i32 i32) (result i32))) (memory (export "memory") 1))')


def bench_spool(d: pathlib.Path, n: int) -> dict[str, Any]:
    spool = Spool(d / "spool", 1 << 30)
    draft = Draft.of(ADMITTED, "acme:hello@1.0.0 admitted (1.0.0)", {"wasmlog.module.ref": "acme:hello@1.0.0", "wasmlog.module.digest": "sha256:" + "a" * 64})
    try:
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            spool.append([draft], i)
            lat.append(time.perf_counter() - t)
        single = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n // 64):
            spool.append([draft] * 64, i)
        batched = (n // 64) * 64 / (time.perf_counter() - t0)
    finally:
        spool.close()
    line = b"x" * 299 + b"\n"
    fd = os.open(d / "fsync-baseline", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, line)
            os.fsync(fd)
        fsyncs = n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
    return {"events_per_s_one_per_commit": round(single), "events_per_s_64_per_commit": round(batched),
            "append_one_event": summary(lat), "baseline_fsynced_file_appends_per_s": round(fsyncs)}


async def bench_delivery(d: pathlib.Path, n: int) -> dict[str, Any]:
    runner, sites = await start_server(make_collector_app(d / "collector"), DEFAULT_LIMITS, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{sites[0].port}/v1/logs"
    spool = Spool(d / "ship-spool", 1 << 30, [url])
    try:
        for i in range(0, n, 64):
            spool.append([Draft.of(ADMITTED, f"event {i}", {"wasmlog.module.ref": "acme:hello@1.0.0"})] * 64, i)
        total = spool.stats()["node_events"]

        async def report(_: Draft) -> None:
            raise AssertionError("the collector refused a batch")

        shipper = Shipper(spool, url, report)
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            task = asyncio.create_task(shipper.run(session))
            while shipper.status.delivered_through < total:
                assert not task.done(), task
                await asyncio.sleep(0.01)  # polling the cursor, not ordering
            seconds = time.perf_counter() - t0
            task.cancel()
        return {"events": total, "events_per_s_delivered": round(total / seconds), "seconds": round(seconds, 3)}
    finally:
        spool.close()
        await runner.cleanup()


async def bench_request_failed(d: pathlib.Path, n: int) -> dict[str, Any]:
    telemetry = Telemetry(d / "rf", [], 1 << 30, 3600)
    first, counted = [], []
    for i in range(n):
        t = time.perf_counter()
        await telemetry.request_failed(f"acme:m{i}@1.0.0", None, None)  # a new key: spooled durably
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        await telemetry.request_failed(f"acme:m{i}@1.0.0", None, None)  # the same key again: counted
        counted.append(time.perf_counter() - t)
    telemetry.spool.close()
    return {"first_of_interval_spooled": summary(first), "aggregated_counted": summary(counted)}


async def load(session: aiohttp.ClientSession, url: str, seconds: float, concurrency: int, expect: int) -> dict[str, Any]:
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            async with session.get(url) as r:
                await r.read()
                assert r.status == expect, r.status
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests_per_s": round(len(lat) / (time.perf_counter() - t0), 1), **summary(lat)}


async def bench_flood(d: pathlib.Path, url: str, vkey: str, seconds: float, concurrency: int) -> dict[str, Any]:
    (d / "trust-policy.toml").write_text(f'tlog_policy = """\nlog {vkey}\nquorum none\n"""\n')
    (d / "agent.toml").write_text(
        f'trust_policy = "trust-policy.toml"\nregistries = ["{url}"]\ndata = "agent-data"\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
        f'sweep_interval = 86400\ntelemetry_interval = 1\n[profiles.stdout]\nimports = ["{WASI}.fd_write"]\nmemory_mb = 16\ntimeout_ms = 2000\n'
        '[[modules]]\nref = "acme:m0@1.0.0"\nprofile = "stdout"\n[[modules]]\nref = "acme:netty@1.0.0"\nprofile = "stdout"\n')
    async with agent_process(d / "agent.toml") as (base, admin_base):
        async with aiohttp.ClientSession() as session:
            await load(session, base + "/run/acme/m0", 1.0, concurrency, 200)  # warm up
            quiet = await load(session, base + "/run/acme/m0", seconds, concurrency, 200)
            baseline = await asyncio.gather(load(session, base + "/run/acme/m0", seconds, concurrency, 200),
                                            load(session, base + "/run/acme/unknown", seconds, concurrency, 404))  # no event
            async with session.get(admin_base + "/status") as r:
                before = (await r.json())["telemetry"]["spool"]["node_events"]
            served, flood = await asyncio.gather(load(session, base + "/run/acme/m0", seconds, concurrency, 200),
                                                 load(session, base + "/run/acme/netty", seconds, concurrency, 403))
            await asyncio.sleep(1.5)  # one aggregation interval, so the flood's last counts are spooled
            async with session.get(admin_base + "/status") as r:
                after = (await r.json())["telemetry"]["spool"]["node_events"]
        refused = round(flood["requests_per_s"] * seconds)
        return {"served_without_flood": quiet, "served_during_flood": served, "refused_flood": flood,
                "baseline_served_during_404_flood": baseline[0], "baseline_404_flood": baseline[1],
                "events_spooled_during_flood": after - before, "refused_requests_in_flood": refused,
                "target_p99_within_2x_of_404_flood": served["p99_ms"] <= 2 * baseline[0]["p99_ms"], "target_events_aggregated": after - before < refused / 10}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        result: dict[str, Any] = {"spool": bench_spool(d, args.events), "delivery": await bench_delivery(d, args.events * 4),
                                  "request_failed": await bench_request_failed(d, min(args.events, 1000))}
        (d / "registry").mkdir()
        (d / "flood").mkdir()
        url, registry, vkey = await start_registry(d / "registry")
        try:
            async with aiohttp.ClientSession() as session:
                api = RegistryClient(url, session)
                await api.publish(ALICE, parse_package_ref("acme:m0@1.0.0"), hello(0))
                await api.publish(ALICE, parse_package_ref("acme:netty@1.0.0"), NETTY)
            result["flood"] = await bench_flood(d / "flood", url, vkey, args.seconds, args.concurrency)
        finally:
            registry.send_signal(signal.SIGTERM)
            await registry.wait()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
