"""Durable append throughput and submit-to-proof latency over HTTP. Prints JSON.

    python bench/append.py [--seconds 10] [--concurrency 256] [--client-procs 1] [--client wrk] [--workers N]
                           [--store DSN|local --objects s3://BUCKET/PREFIX --shared-procs 2]

--workers N runs the log with N HTTP front-end processes (`log serve --workers N`); the
bare baseline stays one process (two bare processes measured ~26.8k req/s on the 2-core
machine, so the baseline is not what limits the log).

--client wrk drives the load with wrk (apt-get install wrk), a C client that
leaves more of the 2 cores to the server than the Python client does.

Runs, in the same way and in the same run: (1) a bare aiohttp POST handler
(the baseline: HTTP alone), (2) the log server (`wasmlog log serve`, LMDB,
fsync per batch) at full load, (3) the log at half the load it reached.
Load comes from separate client processes on loopback.

With --store, the same run also measures (4) the shared engine: --shared-procs `log serve --store
DSN --objects URL` processes on one database and bucket (an empty database; AWS_* variables from
the environment), the load spread over them, at full and half load. `--store local` starts a
throwaway PostgreSQL and SeaweedFS on this machine (tests/services.py) and uses them.
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

import aiohttp
from common import free_port

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


def run_wrk(url: str, tag: str, *, concurrency: int, seconds: float, rate: float | None = None, **_: object) -> dict[str, float]:
    """Closed-loop load with wrk; rate is ignored (wrk has no open-loop mode): use --concurrency."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT % tag)
        script.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "-s", script.name, "--latency", url],
            check=True, capture_output=True, text=True,
        ).stdout
    result: dict[str, float] = {"errors": 0}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["requests_per_s"] = float(words[1])
        elif words[:1] == ["50%"]:
            result["latency_p50_s"] = _wrk_seconds(words[1])
        elif words[:1] == ["99%"]:
            result["latency_p99_s"] = _wrk_seconds(words[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            result["errors"] += sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
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
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="log serve --workers: HTTP front-end processes (1: one process)")
    p.add_argument("--client", choices=["python", "wrk"], default="python")
    p.add_argument("--store", default=None, help="also measure the shared engine: a PostgreSQL DSN (an empty database), or 'local'")
    p.add_argument("--objects", default=None, help="with --store DSN: s3://BUCKET/PREFIX")
    p.add_argument("--shared-procs", type=int, default=2, help="log serve processes on the shared store")
    args = p.parse_args()
    kw = {"procs": args.client_procs, "concurrency": args.concurrency, "seconds": args.seconds}
    load = run_wrk if args.client == "wrk" else run_load
    result: dict[str, object] = {"benchmark": "append", "cores": os.cpu_count(), **vars(args)}

    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER.format(port=port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        result["baseline_bare_aiohttp_post"] = load(f"http://127.0.0.1:{port}", "b", **kw)
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
            full = load(url, "f", **kw)
            result["log_full_load"] = full
            if args.client == "python":  # open loop at half the rate reached
                result["log_half_load"] = load(url, "h", rate=full["requests_per_s"] / 2, **kw)
            else:  # closed loop with half the connections
                result["log_half_load"] = load(url, "h", **{**kw, "concurrency": max(1, args.concurrency // 2)})
        finally:
            server.terminate()
            server.wait()
    if args.store:
        result["shared"] = run_shared(args, kw)
    json.dump(result, sys.stdout, indent=1)
    print()


def run_shared(args: argparse.Namespace, kw: dict[str, int | float]) -> dict[str, object]:
    """The shared engine: args.shared_procs `log serve --store --objects` processes, the load spread over them;
    then, with those stopped, the cost of one batch of each size measured in this process on the same store."""
    with contextlib.ExitStack() as services:
        env = dict(os.environ)
        dsn, objects = args.store, args.objects
        if dsn == "local":
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            from services import BUCKET, PostgresServer, SeaweedServer, running

            pg = services.enter_context(running(PostgresServer))
            s3 = services.enter_context(running(SeaweedServer))
            assert isinstance(pg, PostgresServer) and isinstance(s3, SeaweedServer)
            dsn, objects = pg.new_database("bench"), f"s3://{BUCKET}/bench"
            env.update(s3.env)
        d = services.enter_context(tempfile.TemporaryDirectory())
        key = os.path.join(d, "log")
        subprocess.run([sys.executable, "-m", "wasmlog", "keygen", "bench.example/shared", "--out", key], check=True, capture_output=True)
        with contextlib.ExitStack() as servers:
            urls = []
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
            for url in urls:
                wait_ready(url)
            load = run_wrk if args.client == "wrk" else run_load
            full = load(urls, "sf", **kw) if args.client == "python" else load(urls[0], "sf", **kw)
            out: dict[str, object] = {"processes": args.shared_procs, "full_load": full, "integrator_at_full_load": integrator_costs(urls)}
            if args.client == "python":
                out["half_load"] = load(urls, "sh", rate=full["requests_per_s"] / 2, **kw)
        os.environ.update(env)
        out["batch_costs"] = batch_costs(dsn, objects, key + ".key")
        return out


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
