"""The edge agent's costs, each beside a baseline measured in the same run. Prints JSON.

    python bench/agent.py [--modules 1000] [--seconds 5] [--concurrency 8]

- admit: time to admit a module already fetched (verify with the trust policy, check the profile,
  store it), p50/p99; baseline: SHA-256 of the module alone.
- cold start: the sandbox's first run of a module from its attested artifact cache (a new Sandbox
  over the same cache) vs compiling from bytes (a new Sandbox over an empty cache), p50/p99;
  baseline: wasmtime's own Module() compile and Module.deserialize() of the same module.
- wagi: requests/s and p99 of GET /run/acme/hello against `wasmlog agent serve` (a process), with
  --concurrency requests in flight, once the agent has compiled its module (it does so right after admission);
  baseline: GET /healthz of the same process.
- sweep: POST-/sweep work over --modules admitted modules, each run once so that each has a
  compiled artifact (re-hash modules, re-MAC artifacts, refresh the checkpoint, re-admit every
  module against the registry, a process of its own); baselines: re-hashing the stored modules alone, re-MACing the artifacts alone.
Targets (2 cores): cold start from the cache under 5 ms p99; a sweep of 1,000 modules under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import signal
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp
import wasmtime
from common import ROOT, agent_process

from edge.agent import Agent
from edge.agent_admission import Admission
from edge.agent_config import parse_config
from edge.agent_server import new_sandbox
from edge.sandbox import Profile, Sandbox, WorkerCrashed
from registry.client import RegistryClient
from registry.record import parse_package_ref
from tlog.note import Ed25519Signer

WASI = "wasi_snapshot_preview1"
LOG_VKEY: list[str] = []  # the registry's log key, once it is started
ALICE = Ed25519Signer.generate("alice")


def hello(n: int) -> bytes:
    """A small WAGI module; n makes each one distinct (its data)."""
    text = f"Content-Type: text/plain\n\nhello {n}\n"
    escaped = text.replace("\n", "\\n")
    return wasmtime.wat2wasm(f'''(module
  (import "{WASI}" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{escaped}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const {len(text)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))''')


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 3)


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": pct(xs, 0.5), "p99_ms": pct(xs, 0.99), "mean_ms": round(statistics.fmean(xs) * 1000, 3)}


async def start_registry(d: pathlib.Path) -> tuple[str, asyncio.subprocess.Process, str]:
    """`wasmlog registry serve` in its own process (a registry is remote to an edge node): its URL, process, log vkey."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    keygen = await asyncio.create_subprocess_exec(sys.executable, "-m", "wasmlog", "keygen", "bench.example/log", "--out", str(d / "log"),
                                                  stdout=asyncio.subprocess.DEVNULL, env=env, cwd=ROOT)
    assert await keygen.wait() == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wasmlog", "registry", "serve", "--data", str(d / "data"), "--key", str(d / "log.key"),
        "--listen", f"127.0.0.1:{port}", "--interval-ms", "5", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/log/checkpoint") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline and proc.returncode is None, "the registry did not start"
            await asyncio.sleep(0.1)  # polling with a deadline
    return url, proc, (d / "log.vkey").read_text().strip()


def write_config(d: pathlib.Path, url: str, refs: list[str]) -> pathlib.Path:
    (d / "trust-policy.toml").write_text(f'tlog_policy = """\nlog {LOG_VKEY[0]}\nquorum none\n"""\n')
    mods = "".join(f'[[modules]]\nref = "{r}"\nprofile = "stdout"\n' for r in refs)
    (d / "agent.toml").write_text(
        f'trust_policy = "trust-policy.toml"\nregistries = ["{url}"]\ndata = "agent-data"\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'
        f'sweep_interval = 86400\n[profiles.stdout]\nimports = ["{WASI}.fd_write"]\nmemory_mb = 16\ntimeout_ms = 2000\n{mods}')
    return d / "agent.toml"


async def bench_admit(d: pathlib.Path, url: str, modules: dict[str, bytes]) -> dict[str, Any]:
    """Admission with the fetch done beforehand: the timed part is Admission._verify (verify, profile, store)."""
    config = parse_config(write_config(d, url, list(modules)).read_text(), d)
    from edge.agent_state import ModuleStore
    from registry.record import decode_entry
    from tlog.proof_file import parse_tlog_proof

    admission = Admission(parse_trust_policy_file(config.trust_policy), config.registries, ModuleStore(config.data), config.data / "checkpoints", int(time.time()))
    profile = config.profiles["stdout"]
    times, hashes = [], []
    async with aiohttp.ClientSession() as session:
        api = RegistryClient(url, session)
        for ref, module in modules.items():
            r = parse_package_ref(ref)
            tp = parse_tlog_proof(await api.get(api.package_path(r) + "/tlog-proof"))
            body = decode_entry(tp.extra or b"").body
            t = time.perf_counter()
            decision = await admission._verify(url, r, profile, tp, body, module, None, ())
            times.append(time.perf_counter() - t)
            assert decision.state == "admitted", decision
            t = time.perf_counter()
            hashlib.sha256(module).hexdigest()
            hashes.append(time.perf_counter() - t)
    return {"admit": summary(times[1:]), "baseline_sha256": summary(hashes[1:])}


def parse_trust_policy_file(path: pathlib.Path):  # type: ignore[no-untyped-def]
    from edge.agent import load_trust_policy
    return load_trust_policy(path)


async def bench_cold_start(d: pathlib.Path, modules: list[bytes], rounds: int) -> dict[str, Any]:
    profile = Profile(imports=(f"{WASI}.fd_write",), memory_mb=16, timeout_ms=2000, fuel=None, env={})
    files = []
    for m in modules[:rounds]:
        p = d / hashlib.sha256(m).hexdigest()
        p.write_bytes(m)
        files.append((p.name, p))
    compile_times, cache_times = [], []
    for i, (digest, path) in enumerate(files):
        for times in (compile_times, cache_times):  # first over an empty cache, then a new sandbox over the filled one
            cache = d / f"cache-{i}"
            sandbox = Sandbox(cache, d / "key", workers=1)
            try:
                await sandbox.run(files[-1 - i][0], files[-1 - i][1], profile, stdin=b"", env={})  # warm the worker on another module
                t = time.perf_counter()
                r = await sandbox.run(digest, path, profile, stdin=b"", env={})
                times.append(time.perf_counter() - t)
                assert r.exit_code == 0 and r.stdout.startswith(b"Content-Type"), r
            finally:
                await sandbox.close()
    engine = wasmtime.Engine()
    raw_compile, raw_deser = [], []
    for m in modules[:rounds]:
        t = time.perf_counter()
        mod = wasmtime.Module(engine, m)
        raw_compile.append(time.perf_counter() - t)
        blob = mod.serialize()
        t = time.perf_counter()
        wasmtime.Module.deserialize(engine, blob)
        raw_deser.append(time.perf_counter() - t)
    return {"run_compiling_from_bytes": summary(compile_times), "run_from_artifact_cache": summary(cache_times),
            "baseline_wasmtime_compile": summary(raw_compile), "baseline_wasmtime_deserialize": summary(raw_deser)}


async def bench_wagi(d: pathlib.Path, url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    cfg = write_config(d, url, ["acme:m0@1.0.0"])
    async with agent_process(cfg) as (base, admin_base):
        out = {}
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 120
            while True:  # steady state: the agent compiles admitted modules in the background right after it starts
                async with session.get(admin_base + "/status") as r:
                    if not (await r.json())["sandbox"]["compiling"]:
                        break
                assert time.monotonic() < deadline, "the agent did not finish compiling its module"
                await asyncio.sleep(0.05)  # polling with a deadline
            for name, target in (("wagi_run", base + "/run/acme/m0"), ("baseline_healthz", admin_base + "/healthz")):
                lat: list[float] = []
                end = time.perf_counter() + seconds

                async def worker(target: str = target, lat: list[float] = lat, end: float = end) -> None:
                    while time.perf_counter() < end:
                        t = time.perf_counter()
                        async with session.get(target) as r:
                            await r.read()
                            assert r.status == 200, r.status
                        lat.append(time.perf_counter() - t)

                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                out[name] = {"requests_per_s": round(len(lat) / (time.perf_counter() - start), 1), **summary(lat)}
        return out


async def bench_sweep(d: pathlib.Path, url: str, refs: list[str]) -> dict[str, Any]:
    cfg = write_config(d, url, refs)
    config = parse_config(cfg.read_text(), d)
    sandbox = new_sandbox(config, workers=1)
    try:
        agent = Agent(config, sandbox)
        t = time.perf_counter()
        await agent.start()
        startup = time.perf_counter() - t
        assert all(s.state == "admitted" for s in agent.modules.values()) and len(agent.modules) == len(refs)
        profile = Profile(imports=(f"{WASI}.fd_write",), memory_mb=16, timeout_ms=2000, fuel=None, env={})
        crashes = 0
        for s in agent.modules.values():  # one run each: the sweep re-checks 1,000 compiled artifacts too
            assert s.digest is not None
            try:
                await sandbox.run(s.digest, agent.store.path(s.digest), profile, stdin=b"", env={})
            except WorkerCrashed:  # counted and reported: the artifact was compiled and cached before the run
                crashes += 1
        artifacts = len(list((config.data / "artifacts").iterdir()))
        t = time.perf_counter()
        result = await agent.sweep()
        sweep = time.perf_counter() - t
        assert not result["findings"], result["findings"][:3]
        t = time.perf_counter()
        agent.store.check()
        rehash = time.perf_counter() - t
        t = time.perf_counter()
        sandbox.verify_cache()
        remac = time.perf_counter() - t
    finally:
        await sandbox.close()
    return {"modules": len(refs), "artifacts": artifacts, "worker_crashes_while_filling_the_cache": crashes, "admit_all_at_start_s": round(startup, 3), "sweep_s": round(sweep, 3),
            "baseline_rehash_only_s": round(rehash, 3), "baseline_artifact_remac_only_s": round(remac, 3)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--modules", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cold-rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        (d / "registry").mkdir()
        url, registry, vkey = await start_registry(d / "registry")
        LOG_VKEY.append(vkey)
        try:
            modules = {f"acme:m{i}@1.0.0": hello(i) for i in range(args.modules)}
            t = time.perf_counter()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                api = RegistryClient(url, session)
                await api.publish(ALICE, parse_package_ref("acme:m0@1.0.0"), modules["acme:m0@1.0.0"])
                gate = asyncio.Semaphore(32)

                async def publish(ref: str, m: bytes) -> None:
                    async with gate:
                        await api.publish(ALICE, parse_package_ref(ref), m)

                await asyncio.gather(*(publish(r, m) for r, m in list(modules.items())[1:]))
            published = time.perf_counter() - t
            result: dict[str, Any] = {"setup_publish_s": round(published, 2)}
            for sub in ("a", "c", "w", "s"):  # admit, cold start, wagi, sweep
                (d / sub).mkdir()
            result["admit"] = await bench_admit(d / "a", url, dict(list(modules.items())[:200]))
            result["cold_start"] = await bench_cold_start(d / "c", list(modules.values()), args.cold_rounds)
            result["wagi"] = await bench_wagi(d / "w", url, args.seconds, args.concurrency)
            result["sweep"] = await bench_sweep(d / "s", url, list(modules))
        finally:
            registry.send_signal(signal.SIGTERM)
            await registry.wait()
    result["targets"] = {"cold_start_from_cache_p99_under_5ms": result["cold_start"]["run_from_artifact_cache"]["p99_ms"] < 5,
                         "sweep_1000_under_2s": result["sweep"]["modules"] >= 1000 and result["sweep"]["sweep_s"] < 2}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
