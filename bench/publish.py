"""Registry publishes per second end to end, with many concurrent publishers. Prints JSON.

    python bench/publish.py [--publishers 256] [--per-publisher 20] [--seconds-baseline 1]
                            [--interval-ms 100] [--workers N] [--passes 2] [--url URL]
                            [--store DSN|local --objects s3://BUCKET/PREFIX --shared-procs 2]

Each pass publishes with fresh keys, namespaces and modules on the same server (the first pass also pays for a
fresh data directory). --workers N runs `registry serve --workers N` (front-end processes).

Starts `wasmlog registry serve` (LMDB, blobs synced before their entry is logged, no witnesses) as a subprocess. Each publisher
has its own key and namespace and publishes distinct modules (a custom section varies), so every
publish pays: CBOR body parsing, DSSE signature check, authorization, wasm parse, SBOM-less statement
checks, one durable blob write, and a durable append. Signing happens before the clock starts.
Baselines in the same run: Ed25519 verify rate, and SHA-256 + fsync'd file writes per second.

With --store, the same run also measures the shared engine: --shared-procs `registry serve --store DSN
--objects URL` processes on one (empty) database and bucket prefix, each publisher sending to one of
them, with the integrator's cost per batch from their /log/metrics. Blobs then go to the bucket (each
write confirmed by it) instead of an fsync'd file. `--store local` starts a throwaway PostgreSQL and
SeaweedFS on this machine (tests/services.py); otherwise AWS_* variables come from the environment.

How the load is driven (the same for both engines, in one run): one client process (this one),
--publishers publishers at once, each sending its next publish when the previous one is answered (a
closed loop), publisher p to process p % --shared-procs. Keys, claims, statements, signatures,
modules and (--client lean, the default) the CBOR bodies are all made before the clock starts; in the
timed loop the client only does HTTP, over kept-alive connections (tlog/storage/http1.py: ~0.1 ms of
CPU a publish, reported as "client"; --client aiohttp sends through RegistryClient.publish_signed
instead, ~0.25 ms: on a 2-core machine the client's CPU is taken from the servers). A closed loop
measures publishers / latency until the CPU saturates: at 64 publishers and the 100 ms interval,
LMDB measured ~430/s (64 / 0.15 s) with CPU to spare, so the default is 256. Since the registry's
CPU per publish fell (~0.55 ms), 256 bind LMDB's one process by the interval again (~1,100/s at
0.23 s, the machine a third busy), while the shared engine's two
processes and SeaweedFS use ~85% of the machine. Each pass reports the CPU milliseconds per publish
of the registry processes, PostgreSQL and SeaweedFS (with --store local) and the client, and how
busy the whole machine was (other users' processes included: figures from a busy machine are
capacity shared with them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp
import cbor2
import nacl.signing
from append import integrator_costs, wait_ready
from common import CpuMeter, child_pids, free_port, local_shared_storage, module_variant

from registry.client import RegistryClient, RegistryError, release_statement
from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, PackageRef
from tlog.errors import TlogError
from tlog.note import Ed25519Signer
from tlog.storage.http1 import Origin


def ed25519_verify_rate(seconds: float) -> float:
    sk = nacl.signing.SigningKey.generate()
    sig = sk.sign(b"x" * 600).signature
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sk.verify_key.verify(b"x" * 600, sig)
        n += 1
    return n / (time.perf_counter() - start)


def fsync_write_rate(seconds: float, d: str) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        path = os.path.join(d, f"f{n}")
        with open(path, "wb") as f:
            f.write(module_variant(n))
            f.flush()
            os.fsync(f.fileno())
        n += 1
    return n / (time.perf_counter() - start)


def prepare(publishers: int, per: int) -> list[tuple[Ed25519Signer, bytes, list[tuple[bytes, bytes]]]]:
    """For each publisher: its key, its namespace claim's body, and its releases (signed envelope, module)."""
    out = []
    run = secrets.token_hex(4)  # fresh namespaces, so --url can drive the same registry again
    salt = int(run, 16) << 32  # and fresh modules: a blob the store has already is not written again (S3: a cheap 412)
    assert publishers <= 1 << 16 and per <= 1 << 16
    for p in range(publishers):
        key = Ed25519Signer.generate(f"bench{p}")
        ns = f"bench{p}-{run}"
        claim = sign_envelope(ACTION_PAYLOAD_TYPE, Action("key-grant", ns, key=key.vkey, issued=1).payload(), key)
        claim_body = json.dumps({"type": "key-grant", "signer": key.vkey, "envelope": json.loads(claim.to_json())}).encode()
        releases = []
        for v in range(per):
            module = module_variant(salt + (p << 16) + v)
            rel = release_statement(PackageRef(ns, "mod", f"1.0.{v}"), module, None, None)
            releases.append((sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), key).to_json(), module))
        out.append((key, claim_body, releases))
    return out


async def drive(urls: str | list[str], work, client: str = "lean") -> tuple[float, list[float], int]:  # type: ignore[no-untyped-def]
    """Publish work; publisher p sends everything to urls[p % len(urls)] (processes of one registry).
    client "lean": bodies encoded before the clock starts, sent over tlog/storage/http1.Origin (kept-alive
    connections, ~0.05 ms of CPU a publish); "aiohttp": registry.client.RegistryClient.publish_signed."""
    urls = [urls] if isinstance(urls, str) else urls
    if client == "lean":
        return await drive_lean(urls, work)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(work))) as session:
        apis = [RegistryClient(urls[p % len(urls)], session) for p in range(len(work))]

        async def claim(p: int, body: bytes) -> None:
            async with session.post(apis[p].url + "/api/v1/records", data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()

        async def publish(p: int, i: int) -> bool:
            key, _, releases = work[p]
            try:
                await apis[p].publish_signed(key.vkey, *releases[i])
            except RegistryError:
                return False
            return True

        return await closed_loop(work, claim, publish)


async def drive_lean(urls: list[str], work) -> tuple[float, list[float], int]:  # type: ignore[no-untyped-def]
    """drive() with pre-encoded bodies over Origin: the same requests as RegistryClient.publish_signed sends."""
    origins = [Origin(url, connections=len(work)) for url in urls]
    headers = {"Content-Type": "application/cbor"}
    bodies = [[cbor2.dumps({"signer": key.vkey.encode(), "envelope": envelope, "module": module}) for envelope, module in releases]
              for key, _, releases in work]

    async def claim(p: int, body: bytes) -> None:
        answer = await origins[p % len(urls)].request("POST", "/api/v1/records", {"Content-Type": "application/json"}, body)
        assert answer.status == 200, answer.body[:300]

    async def publish(p: int, i: int) -> bool:
        try:
            return (await origins[p % len(urls)].request("POST", "/api/v1/publish", headers, bodies[p][i])).status == 200
        except (OSError, TimeoutError, TlogError):
            return False

    try:
        return await closed_loop(work, claim, publish)
    finally:
        for http in origins:
            http.close()


async def closed_loop(work, claim: Callable[[int, bytes], Awaitable[None]], publish: Callable[[int, int], Awaitable[bool]]  # type: ignore[no-untyped-def]
                      ) -> tuple[float, list[float], int]:
    """Every publisher's claim at once, then publisher p sends its publishes i = 0, 1, ... one after another
    (publish(p, i): True if accepted), all publishers at once: (seconds, latencies, errors) of the publishes."""
    await asyncio.gather(*(claim(p, body) for p, (_, body, _) in enumerate(work)))
    latencies: list[float] = []
    errors = 0

    async def publisher(p: int, count: int) -> None:
        nonlocal errors
        for i in range(count):
            t = time.perf_counter()
            errors += not await publish(p, i)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(publisher(p, len(releases)) for p, (_, _, releases) in enumerate(work)))
    return time.perf_counter() - start, latencies, errors


def summary(elapsed: float, lat: list[float], errors: int) -> dict[str, object]:
    lat = sorted(lat)
    return {
        "publishes": len(lat),
        "errors": errors,
        "publishes_per_s": len(lat) / elapsed,
        "latency_p50_s": lat[len(lat) // 2],
        "latency_p99_s": lat[int(len(lat) * 0.99)],
    }


def measured_pass(urls: str | list[str], args: argparse.Namespace, groups: dict[str, Callable[[], list[int]]]) -> dict[str, object]:
    """One pass over fresh namespaces (signed before the clock starts), with the CPU each group of processes,
    the client (this process) and the whole machine used while it ran."""
    work = prepare(args.publishers, args.per_publisher)
    with CpuMeter(groups) as cpu:
        result = summary(*asyncio.run(drive(urls, work, args.client)))
    result["cpu_ms_per_publish"] = cpu.per_item_ms(int(result["publishes"]))  # type: ignore[call-overload]
    result["machine_busy"] = round(cpu.machine_busy, 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--publishers", type=int, default=256)
    p.add_argument("--per-publisher", type=int, default=20)
    p.add_argument("--seconds-baseline", type=float, default=1.0)
    p.add_argument("--url", help="drive a registry already running there instead of starting one")
    p.add_argument("--interval-ms", type=int, default=100, help="the registry's sequencer interval (registry serve --interval-ms)")
    p.add_argument("--workers", type=int, default=1, help="registry serve --workers: HTTP front-end processes (1: one process)")
    p.add_argument("--passes", type=int, default=2, help="passes over fresh namespaces on the same server (the first "
                   "also pays for a fresh data directory)")
    p.add_argument("--store", default=None, help="also measure the shared engine: a PostgreSQL DSN (an empty database), or 'local'")
    p.add_argument("--objects", default=None, help="with --store DSN: s3://BUCKET/PREFIX")
    p.add_argument("--shared-procs", type=int, default=2, help="registry serve processes on the shared store")
    p.add_argument("--client", choices=["lean", "aiohttp"], default="lean", help="how this process sends the publishes (see drive)")
    args = p.parse_args()
    if args.url:
        print(json.dumps(summary(*asyncio.run(drive(args.url, prepare(args.publishers, args.per_publisher), args.client)))))
        return
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "wasmlog", "keygen", "bench.example/registry", "--out", os.path.join(d, "reg")], check=True, capture_output=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "wasmlog", "registry", "serve", "--data", os.path.join(d, "data"), "--key", os.path.join(d, "reg.key"),
             "--listen", f"127.0.0.1:{port}", "--interval-ms", str(args.interval_ms), "--workers", str(args.workers)],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}/log")
            groups = {"registry": lambda: [server.pid, *child_pids(server.pid)]}  # with its front-ends
            passes = [measured_pass(f"http://127.0.0.1:{port}", args, groups) for _ in range(args.passes)]
        finally:
            server.terminate()
            server.wait()
        os.makedirs(os.path.join(d, "fs"))
        fsync_rate = fsync_write_rate(args.seconds_baseline, os.path.join(d, "fs"))
    result = {
        "benchmark": "registry_publish",
        "publishers": args.publishers,
        "interval_ms": args.interval_ms,
        "workers": args.workers,
        "client": args.client,
        "passes": passes,
        "baseline_ed25519_verify_per_s": ed25519_verify_rate(args.seconds_baseline),
        "baseline_fsynced_file_writes_per_s": fsync_rate,
    }
    if args.store:
        result["shared"] = run_shared(args)
    json.dump(result, sys.stdout, indent=1)
    print()


def run_shared(args: argparse.Namespace) -> dict[str, object]:
    """The shared engine: args.shared_procs `registry serve --store --objects` processes, the publishers spread over them."""
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        dsn, objects = args.store, args.objects
        groups: dict[str, Callable[[], list[int]]] = {}
        if dsn == "local":
            dsn, objects, s3_env = local_shared_storage(stack, "benchpublish", groups)
            env.update(s3_env)
        d = stack.enter_context(tempfile.TemporaryDirectory())
        subprocess.run([sys.executable, "-m", "wasmlog", "keygen", "bench.example/registry", "--out", os.path.join(d, "reg")], check=True, capture_output=True)
        urls, servers = [], []
        for _ in range(args.shared_procs):
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "wasmlog", "registry", "serve", "--store", dsn, "--objects", objects, "--key", os.path.join(d, "reg.key"),
                 "--listen", f"127.0.0.1:{port}", "--interval-ms", str(args.interval_ms)],
                stdout=subprocess.DEVNULL, env=env,
            )
            stack.callback(server.wait)
            stack.callback(server.terminate)
            urls.append(f"http://127.0.0.1:{port}")
            servers.append(server)
        for url in urls:
            wait_ready(url + "/log")
        groups["registry"] = lambda: [pid for s in servers for pid in (s.pid, *child_pids(s.pid))]
        passes = [measured_pass(urls, args, groups) for _ in range(args.passes)]
        return {"processes": args.shared_procs, "passes": passes, "integrator": integrator_costs([url + "/log" for url in urls])}


if __name__ == "__main__":
    main()
