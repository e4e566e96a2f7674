"""Cold starts from the attested artifact cache against compiling from bytes, and requests/s of a small WAGI
module, through edge.sandbox's real worker processes. Prints JSON.

    python bench/agent_sandbox.py [--modules 200] [--requests 2000] [--concurrency 4] [--workers 2]

Every module is distinct (its own digest), so each first run is a cold start for the worker that gets it:
- compile: no cached artifact; the module file is read, its SHA-256 checked, Wasmtime compiles it in a compile
  worker (a process that never runs a module; one is started for every 16 compiles), the artifact is MAC'd and
  stored, then a run worker loads it and the module runs;
- cached: fresh workers, artifacts on disk; the artifact's MAC is checked, the worker deserializes it, the
  module runs (the path an agent takes after a restart);
- warm (baseline): the worker already holds the module;
- in-process floor: deserialize and run with the worker's code in this process (no pipes, no MAC check).
Each latency is one Sandbox.run as the agent sees it (pipe round trips included), one run at a time on one
worker. Target: cached cold start under 5 ms p99. Then requests/s and p99 at --concurrency over --workers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import pathlib
import statistics
import tempfile
import time

import wasmtime

from edge.sandbox import Profile, Sandbox

WAGI = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "Content-Type: text/plain\\n\\nhello from module {n:08d}\\n")
  {filler}
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 53))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
# Some code to compile, as a real module would have: 20 small functions.
FILLER = "\n".join(f"(func (export \"f{i}\") (param i32) (result i32) (i32.add (i32.mul (local.get 0) (i32.const {i + 3})) (i32.const {i})))"
                   for i in range(20))
PROFILE = Profile(imports=("wasi_snapshot_preview1.fd_write",), memory_mb=16, timeout_ms=1000)


def write_modules(directory: pathlib.Path, n: int) -> list[tuple[str, pathlib.Path]]:
    modules = []
    for i in range(n):
        wasm = wasmtime.wat2wasm(WAGI.format(n=i, filler=FILLER))
        digest = hashlib.sha256(wasm).hexdigest()
        path = directory / f"{digest}.wasm"
        path.write_bytes(wasm)
        modules.append((digest, path))
    return modules


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3), "max_ms": round(ms[-1], 3)}


async def one_by_one(sandbox: Sandbox, modules: list[tuple[str, pathlib.Path]]) -> list[float]:
    times = []
    for digest, path in modules:
        start = time.perf_counter()
        result = await sandbox.run(digest, path, PROFILE, stdin=b"", env={"REQUEST_METHOD": "GET"})
        times.append(time.perf_counter() - start)
        assert result.stdout.endswith(b"\n") and result.exit_code == 0
    return times


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "modules").mkdir()
        modules = write_modules(root / "modules", args.modules)
        key = root / "artifact.key"

        sandbox = Sandbox(root / "cache", key, workers=1)
        await sandbox.start()
        compile_times = await one_by_one(sandbox, modules)
        warm_times = await one_by_one(sandbox, modules[-min(64, len(modules)):])  # the worker's LRU holds 64
        await sandbox.close()

        sandbox = Sandbox(root / "cache", key, workers=1)
        await sandbox.start()
        cached_times = await one_by_one(sandbox, modules)
        assert sandbox.status()["artifacts_loaded"] == len(modules) and "compiled" not in sandbox.status()
        status_settings_id = sandbox.status()["engine_settings"]
        start = time.perf_counter()
        bad = sandbox.verify_cache()
        verify_seconds = time.perf_counter() - start
        assert bad == []
        await sandbox.close()

        # The floor: the same cold starts inside one process (the worker's code, no pipes, no MAC check).
        from edge.artifacts import ArtifactCache, load_or_create_key
        from edge.sandbox_worker import Runtime
        runtime = Runtime("run")
        cache = ArtifactCache(root / "cache", load_or_create_key(key), status_settings_id)
        request = {"argv": ["bench"], "env": [["REQUEST_METHOD", "GET"]],
                   "profile": {"imports": list(PROFILE.imports), "memory_mb": PROFILE.memory_mb, "timeout_ms": PROFILE.timeout_ms, "fuel": None}}
        in_process_times = []
        artifacts = [(digest, cache.load(digest)[0]) for digest, _ in modules]
        for digest, artifact in artifacts:
            start = time.perf_counter()
            runtime.run({**request, "digest": digest}, b"", artifact)
            in_process_times.append(time.perf_counter() - start)

        sandbox = Sandbox(root / "cache", key, workers=args.workers, module_workers=args.workers)  # one module may use
        await sandbox.start()  # every worker here (the agent keeps one back for the other modules)
        digest, path = modules[0]
        latencies: list[float] = []
        queue = iter(range(args.requests))

        async def client() -> None:
            for _ in queue:
                t = time.perf_counter()
                await sandbox.run(digest, path, PROFILE, stdin=b"", env={"REQUEST_METHOD": "GET"})
                latencies.append(time.perf_counter() - t)
        await asyncio.gather(*(client() for _ in range(args.workers)))  # warm every worker
        latencies.clear()
        queue = iter(range(args.requests))
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        status = sandbox.status()
        await sandbox.close()

    cached = summary(cached_times)
    print(json.dumps({
        "wasmtime": status["wasmtime"], "seccomp": status["seccomp"], "landlock": status["landlock"], "modules": args.modules,
        "cold_start_from_attested_cache": cached,
        "cold_start_compiling_from_bytes": summary(compile_times),
        "warm_run_baseline": summary(warm_times),
        "in_process_cold_start_from_artifact_floor": summary(in_process_times),
        "cache_speedup_p50": round(statistics.median(compile_times) / statistics.median(cached_times), 2),
        "verify_cache": {"artifacts": args.modules, "seconds": round(verify_seconds, 4)},
        "wagi_requests": {"requests": args.requests, "concurrency": args.concurrency, "workers": args.workers,
                          "per_second": round(args.requests / elapsed, 1), **summary(latencies)},
        "worker_restarts": status.get("worker_restarts", 0),
        "target_cold_start_p99_ms": 5.0, "target_met": cached["p99_ms"] < 5.0,
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
