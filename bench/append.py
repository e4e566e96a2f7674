"""Durable append throughput and submit-to-proof latency over HTTP. Prints JSON.

    python bench/append.py [--seconds 10] [--concurrency 1024] [--client-procs 2] [--client wrk|python]
                           [--workers N] [--store DSN|local [--objects s3://BUCKET/PREFIX] --shared-procs 2]

Runs, with the same client and connections, in the same run: (1) a bare aiohttp POST handler (the
baseline: HTTP alone, one process), (2) the log server (`wasmlog log serve`, LMDB, fsync per batch;
--workers N: N HTTP front-end processes) at full load, (3) the same at half load. With --store, (4)
the shared engine: --shared-procs `log serve --store DSN --objects URL` processes on one (empty)
database and bucket (AWS_* variables from the environment; `--store local` starts a throwaway
PostgreSQL and SeaweedFS on this machine, bench/common.local_shared_storage), at full and half load;
then, with those stopped, the cost of one batch of each size (batch_costs) in this process.

How the load is driven (the same for every target, so the figures compare): --client-procs client
processes at once (default 2, one per shared process), --concurrency connections in all, split evenly;
client i loads server i (cycling), so on the shared engine each process gets its own client and
every one-process target gets all of them. Closed loop: each connection sends its next POST /add
(a distinct ~210-byte entry) when the last is answered, so throughput = connections / latency
until the machine's CPU is saturated. The default 1,024 connections bring the shared run to or near
that on the 2-core machine (at 256 it measured latency-bound, ~1.5k/s with idle CPU), and 1,024 is
also a server's default --max-connections (beyond it a one-process target answers 503). Half load is
half the connections. The default client is wrk (`apt-get install wrk`), a C client, because the
Python client (--client python, aiohttp, open loop at half load) eats about a core itself. Reported:
2xx answers/s and errors (non-2xx, socket errors, timeouts after WRK_TIMEOUT s) summed over clients,
p50 and p99 the largest of the clients' (an upper bound of the combined percentile; wrk's latencies are
over every answer, non-2xx ones too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
from common import CpuMeter, free_port, local_shared_storage

BARE_SERVER = """
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(text="ok")
app = web.Application()
app.router.add_post("/add", ok)
app.router.add_get("/checkpoint", ok)
web.run_app(app, host="127.0.0.1", port={port}, print=None, access_log=None)
"""



def wait_ready(url: str) -> None:
    import urllib.request

    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/checkpoint", timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


async def _load(urls: list[str], tag: str, concurrency: int, seconds: float, rate: float | None) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker(w: int) -> None:
            nonlocal errors
            n = 0
            start = time.perf_counter()
            while (now := time.perf_counter()) < stop:
                if rate is not None:  # open loop: this worker's share of the target rate
                    due = start + n * concurrency / rate
                    if due > now:
                        await asyncio.sleep(due - now)
                body = f"{tag}-{w}-{n}-".encode() + b"x" * 200
                n += 1
                t = time.perf_counter()
                try:
                    async with session.post(urls[w % len(urls)] + "/add", data=body) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies), errors, latencies


def _client(args: tuple[list[str], str, int, float, float | None]) -> tuple[int, int, list[float]]:
    return asyncio.run(_load(*args))


WRK_TIMEOUT = 10  # seconds: a slower answer is counted as an error (a socket timeout)
WRK_SCRIPT = """
local counter = 0
local next_id = 0
setup = function(thread) thread:set("id", next_id); next_id = next_id + 1 end
request = function()
  counter = counter + 1
  return wrk.format("POST", "/add", nil, "%s-" .. id .. "-" .. counter .. "-" .. string.rep("x", 200))
end
"""


def _wrk_seconds(s: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * scale
    raise ValueError(s)


def run_wrk(url: str | list[str], tag: str, *, procs: int, concurrency: int, seconds: float, rate: float | None = None) -> dict[str, object]:
    """Closed-loop load from procs wrk processes at once, concurrency connections in all, wrk i on url i (cycling).

    rate is ignored (wrk has no open loop: half load is half the connections). Requests/s and errors are
    summed; p50 and p99 are the largest of the processes' (an upper bound of the combined percentile)."""
    urls = [url] if isinstance(url, str) else url
    with tempfile.TemporaryDirectory() as d:
        runs = []
        for p in range(procs):
            script = os.path.join(d, f"{p}.lua")
            with open(script, "w") as f:
                f.write(WRK_SCRIPT % f"{tag}{p}")
            runs.append(subprocess.Popen(
                ["wrk", "-t1", f"-c{max(1, concurrency // procs)}", f"-d{int(seconds)}s", f"--timeout={WRK_TIMEOUT}s", "-s", script,
                 "--latency", urls[p % len(urls)]],
                stdout=subprocess.PIPE, text=True,
            ))
        outs = [run.communicate()[0] for run in runs]
        if any(run.returncode for run in runs):
            raise RuntimeError(f"wrk failed: {[run.returncode for run in runs]}")
    each = [_parse_wrk(out) for out in outs]
    return {
        "requests_per_s": sum(r["requests_per_s"] for r in each),
        "errors": sum(r["errors"] for r in each),
        "latency_p50_s": max(r["latency_p50_s"] for r in each),
        "latency_p99_s": max(r["latency_p99_s"] for r in each),
        "per_client": each,
    }


def _parse_wrk(out: str) -> dict[str, float]:
    """requests_per_s counts 2xx answers only (wrk's own Requests/sec counts every answer); errors are the
    non-2xx answers plus the socket errors (connect, read, write, timeout)."""
    result: dict[str, float] = {"non_2xx": 0, "socket_errors": 0}
    answers, seconds = 0, 1.0
    for line in out.splitlines():
        words = line.split()
        if len(words) > 3 and words[1:3] == ["requests", "in"]:  # "N requests in 10.01s, X MB read"
            answers, seconds = int(words[0]), _wrk_seconds(words[3].rstrip(","))
        elif words[:1] == ["50%"]:
            result["latency_p50_s"] = _wrk_seconds(words[1])
        elif words[:1] == ["99%"]:
            result["latency_p99_s"] = _wrk_seconds(words[1])
        elif "Non-2xx" in line:
            result["non_2xx"] = int(words[-1])
        elif "Socket errors" in line:
            result["socket_errors"] = sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
    result["requests_per_s"] = (answers - result["non_2xx"]) / seconds
    result["errors"] = result["non_2xx"] + result["socket_errors"]
    return result


def run_load(url: str | list[str], tag: str, *, procs: int, concurrency: int, seconds: float, rate: float | None = None) -> dict[str, float]:
    """Load url (or, spread over them, several urls that are one log) from procs client processes."""
    url = [url] if isinstance(url, str) else url
    per_rate = None if rate is None else rate / procs
    with multiprocessing.Pool(procs) as pool:
        results = pool.map(_client, [(url, f"{tag}{p}", concurrency // procs, seconds, per_rate) for p in range(procs)])
    lat = sorted(x for _, _, ls in results for x in ls)
    ok = sum(n for n, _, _ in results)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        "requests_per_s": ok / seconds,
        "errors": sum(e for _, e, _ in results),
        "latency_p50_s": pct(0.50),
        "latency_p99_s": pct(0.99),
        "latency_max_s": lat[-1] if lat else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=1024, help="connections in all, split over the client processes")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="log serve --workers: HTTP front-end processes (1: one process)")
    p.add_argument("--client", choices=["python", "wrk"], default="wrk")
    p.add_argument("--store", default=None, help="also measure the shared engine: a PostgreSQL DSN (an empty database), or 'local'")
    p.add_argument("--objects", default=None, help="with --store DSN: s3://BUCKET/PREFIX")
    p.add_argument("--shared-procs", type=int, default=2, help="log serve processes on the shared store")
    p.add_argument("--profile", default=None, help="with --store: py-spy each shared process under full load, raw output in this directory")
    args = p.parse_args()
    kw = {"procs": args.client_procs, "concurrency": args.concurrency, "seconds": args.seconds}
    result: dict[str, object] = {"benchmark": "append", "cores": os.cpu_count(), **vars(args)}

    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER.format(port=port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        result["baseline_bare_aiohttp_post"] = load(args, f"http://127.0.0.1:{port}", "b", **kw)
    finally:
        bare.terminate()
        bare.wait()

    with tempfile.TemporaryDirectory() as d:
        key = os.path.join(d, "log")
        subprocess.run([sys.executable, "-m", "wasmlog", "keygen", "bench.example/log", "--out", key], check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "wasmlog", "log", "serve", "--data", os.path.join(d, "db"), "--key", key + ".key",
             "--listen", f"127.0.0.1:{port}", "--interval-ms", str(args.interval_ms), "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url)
            with CpuMeter({"server": lambda: [server.pid]}) as cpu:
                result["log_full_load"] = full = load(args, url, "f", **kw)
            full["cpu"] = cpu_report(cpu, full, args.seconds)
            result["log_half_load"] = load(args, url, "h", **half(kw, full))
        finally:
            server.terminate()
            server.wait()
    if args.store:
        result["shared"] = run_shared(args, kw)
    json.dump(result, sys.stdout, indent=1)
    print()


def load(args: argparse.Namespace, url: str | list[str], tag: str, **kw: Any) -> dict[str, Any]:
    return (run_wrk if args.client == "wrk" else run_load)(url, tag, **kw)


def half(kw: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Half load: half the connections (wrk, closed loop), or half the rate reached (the Python client, open loop)."""
    return {**kw, "concurrency": max(1, kw["concurrency"] // 2), "rate": full["requests_per_s"] / 2}


def run_shared(args: argparse.Namespace, kw: dict[str, Any]) -> dict[str, object]:
    """The shared engine: args.shared_procs `log serve --store --objects` processes, the load spread over them;
    then, with those stopped, the cost of one batch of each size measured in this process on the same store."""
    with contextlib.ExitStack() as services:
        env = dict(os.environ)
        dsn, objects = args.store, args.objects
        groups: dict[str, Callable[[], list[int]]] = {}  # postgres and s3, when they run here
        if dsn == "local":
            dsn, objects, s3_env = local_shared_storage(services, "bench", groups)
            env.update(s3_env)
        d = services.enter_context(tempfile.TemporaryDirectory())
        key = os.path.join(d, "log")
        subprocess.run([sys.executable, "-m", "wasmlog", "keygen", "bench.example/shared", "--out", key], check=True, capture_output=True)
        with contextlib.ExitStack() as servers:
            urls, pids = [], []
            for _ in range(args.shared_procs):
                port = free_port()
                server = subprocess.Popen(
                    [sys.executable, "-m", "wasmlog", "log", "serve", "--store", dsn, "--objects", objects, "--key", key + ".key",
                     "--listen", f"127.0.0.1:{port}", "--interval-ms", str(args.interval_ms)],
                    stdout=subprocess.DEVNULL, env=env,
                )
                servers.callback(server.wait)
                servers.callback(server.terminate)
                urls.append(f"http://127.0.0.1:{port}")
                pids.append(server.pid)
            for url in urls:
                wait_ready(url)
            groups.update({f"server_{i}": (lambda pid=pid: [pid]) for i, pid in enumerate(pids)})
            with profiled(args.profile, pids, args.seconds), CpuMeter(groups) as cpu:
                full = load(args, urls, "sf", **kw)
            full["cpu"] = cpu_report(cpu, full, args.seconds)
            out: dict[str, object] = {"processes": args.shared_procs, "full_load": full, "integrator_at_full_load": integrator_costs(urls)}
            out["half_load"] = load(args, urls, "sh", **half(kw, full))
        os.environ.update(env)
        out["batch_costs"] = batch_costs(dsn, objects, key + ".key")
        return out


def cpu_report(cpu: CpuMeter, full: dict[str, Any], seconds: float) -> dict[str, object]:
    """CPU seconds per group during full load, how busy the machine was, and CPU ms per append (2xx answers)."""
    appends = int(full["requests_per_s"] * seconds)
    return {"cpu_s": {k: round(v, 3) for k, v in cpu.used.items()}, "machine_busy": round(cpu.machine_busy, 3),
            "cpu_ms_per_append": cpu.per_item_ms(appends)}


@contextlib.contextmanager
def profiled(directory: str | None, pids: list[int], seconds: float) -> Iterator[None]:
    """With a directory: py-spy record (raw, non-blocking) each of pids for most of the block's seconds."""
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    spies = [subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(max(1, int(seconds) - 2)), "-f", "raw", "--nonblocking",
                               "-o", os.path.join(directory, f"shared-{i}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i, pid in enumerate(pids)]
    try:
        yield
    finally:
        for spy in spies:
            spy.wait()


def batch_costs(dsn: str, objects: str, key: str) -> dict[str, dict[str, float]]:
    """Seconds to sequence, and then to integrate, one batch of each size, in this process (no server running)."""
    import pathlib

    from tlog.hashes import leaf_hash
    from tlog.keys import read_signer
    from tlog.log import Log
    from tlog.storage.shared import SharedLogStore

    store = SharedLogStore(dsn, objects)
    try:
        log = Log(store, read_signer(pathlib.Path(key)))
        costs: dict[str, dict[str, float]] = {}
        for size in (16, 256, 1024, 4096):
            entries = [b"cost-%d-%d-" % (size, i) + b"x" * 200 for i in range(size)]
            t = time.perf_counter()
            store.sequence(entries, [leaf_hash(e) for e in entries])
            sequenced = time.perf_counter() - t
            t = time.perf_counter()
            log.integrate(store.sequenced(log.state.size, size), dedup=False)
            costs[str(size)] = {"sequence_s": sequenced, "integrate_s": time.perf_counter() - t}
        return costs
    finally:
        store.close()


def integrator_costs(urls: list[str]) -> dict[str, float]:
    """Batches integrated so far, from the processes' /metrics (summed: whoever led): count, entries and seconds per batch."""
    import urllib.request

    totals = dict.fromkeys(("wasmlog_log_integration_seconds_sum", "wasmlog_log_integration_seconds_count", "wasmlog_log_batch_entries_sum"), 0.0)
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name in totals:
                    totals[name] += float(value)
    batches = totals["wasmlog_log_integration_seconds_count"] or 1.0
    return {
        "batches": totals["wasmlog_log_integration_seconds_count"],
        "entries_per_batch": totals["wasmlog_log_batch_entries_sum"] / batches,
        "seconds_per_batch": totals["wasmlog_log_integration_seconds_sum"] / batches,
    }


if __name__ == "__main__":
    main()
