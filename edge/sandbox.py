"""Confined execution of admitted WASI command modules (issue 14: "Running, confined", "A second wall",
"Cold starts that stay attested").

Modules run in a pool (edge.sandbox_pool) of long-lived run workers (edge.sandbox_worker), never in the caller's
process; each worker runs one request at a time, with lowered resource limits, a syscall allow-list where
libseccomp can be loaded and Landlock where the kernel has it (edge.sandbox_walls). A run links only the WASI
functions its profile grants, under a memory cap (store limits), a deadline (epoch interruption) and optional
fuel. A worker that dies or stops answering is killed and replaced. One module (a run's key: the agent's
configured module, so two modules with the same bytes count apart) runs on at most module_workers workers at
once (all but one, by default) and has at most its profile's max_in_flight requests in the sandbox;
its request's deadline covers the wait for a worker as well as the run.

Compiled artifacts are cached per (module digest, Wasmtime version, engine settings) under an HMAC
(edge.artifacts), and come only from compile workers that never run a module (edge.sandbox_compile), fed the
module file once its SHA-256 is checked against the digest; run workers only load artifacts whose MAC checked.
prewarm() compiles admitted modules ahead of their first request.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .artifacts import DIGEST_RE, ArtifactCache, load_or_create_key
from .sandbox_compile import Artifacts, Compilers
from .sandbox_pool import Idle, Worker, WorkerLost, WorkerStartError
from .sandbox_protocol import (
    WORKER_DATA_MB,
    WORKER_OVERHEAD_MB,
    engine_settings_id,
    wasmtime_version,
)
from .sandbox_types import (
    DEFAULT_MAX_IN_FLIGHT,
    DeadlineExceeded,
    IntegrityError,
    MemoryExceeded,
    ModuleInvalid,
    NoLongerAllowed,
    NotGranted,
    NoWorkerInTime,
    Profile,
    RunResult,
    SandboxBusy,
    SandboxError,
    Trapped,
    WorkerCrashed,
    check_env,
    failure,
    imports_granted,
)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "GRACE", "DeadlineExceeded", "IntegrityError", "MemoryExceeded", "ModuleInvalid",
           "NoLongerAllowed", "NoWorkerInTime", "NotGranted", "Profile", "RunResult", "Sandbox", "SandboxBusy",
           "SandboxError", "Trapped", "WorkerCrashed", "check_env", "imports_granted"]

MAX_WAITING = 64  # requests that may wait for a worker at once (each holds its stdin); more are SandboxBusy
GRACE = 2.0  # seconds past a run's deadline before the worker is presumed hung and killed
PROBE_TIMEOUT = 30.0
# RLIMIT_DATA of each worker: its own heap, the compiler's, and the linear memory of the run in progress
# (Wasmtime's address-space reservations are PROT_NONE and do not count). A profile must leave WORKER_OVERHEAD_MB.


class Sandbox:
    """A pool of run workers, compile workers and the attested artifact cache. run() may be called concurrently:
    each run takes an idle worker its module may use (waiting for one, within its deadline, if none is free)."""

    def __init__(self, cache_dir: pathlib.Path, key_file: pathlib.Path, *, workers: int = 2,
                 worker_data_mb: int = WORKER_DATA_MB, max_waiting: int = MAX_WAITING, module_workers: int | None = None,
                 compiles_per_process: int | None = None, probes: bool = False) -> None:
        """module_workers: how many workers one module may hold at once (default: all but one, so that one
        module's flood never holds every worker). probes: whether workers answer the probe op (tests)."""
        if workers < 1:
            raise ValueError("a sandbox needs at least one worker")
        self._size = workers
        self._module_workers = module_workers if module_workers is not None else max(1, workers - 1)
        if not 1 <= self._module_workers <= workers:
            raise ValueError(f"module_workers must be from 1 to the {workers} workers")
        self._max_waiting = max_waiting
        try:
            self._version = wasmtime_version()
        except importlib.metadata.PackageNotFoundError:
            raise SandboxError("Wasmtime is not installed: pip install 'wasmlog[sandbox]'") from None
        self._data_mb = worker_data_mb
        self._cache = ArtifactCache(pathlib.Path(cache_dir), load_or_create_key(pathlib.Path(key_file)), engine_settings_id(self._version))
        self.counters: collections.Counter[str] = collections.Counter()
        root = pathlib.Path(__file__).resolve().parent.parent
        env = {"PYTHONPATH": str(root), "WASMLOG_WORKER_DATA_MB": str(worker_data_mb),
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8", **({"WASMLOG_WORKER_PROBES": "1"} if probes else {})}
        self._env = {**env, "WASMLOG_WORKER_ROLE": "run"}
        self._probes = probes
        self._compilers = Compilers(env, self._version, **({"per_process": compiles_per_process} if compiles_per_process else {}))
        self._artifacts = Artifacts(self._cache, self._compilers, self.counters)
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._idle = Idle()
        self._workers: dict[int, Worker] = {}
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._background: set[asyncio.Future[Any]] = set()
        self._last_start_error: str | None = None

    async def start(self) -> None:
        """Start the workers (run() does this on first use; call it early to learn the seccomp state)."""
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise SandboxError("the sandbox is closed")
            for worker in await asyncio.gather(*(self._spawn() for _ in range(self._size))):
                self._idle.release(worker)
            self._started = True

    async def _spawn(self) -> Worker:
        try:
            worker = await Worker.start(self._env)
        except WorkerStartError as e:
            raise SandboxError(str(e)) from None
        if worker.hello.get("wasmtime") != self._version or worker.hello.get("role") != "run":
            await worker.kill()
            raise SandboxError(f"sandbox worker says Wasmtime {worker.hello.get('wasmtime')}, role {worker.hello.get('role')}; "
                               f"the agent runs {self._version} and wants a run worker")
        self._workers[worker.pid] = worker
        return worker

    def _background_task(self, awaitable: Any) -> asyncio.Future[Any]:
        task: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _replace(self, worker: Worker, key: str | None = None) -> None:
        """Forget a lost worker (handed to key) and start another in the background (retrying while the sandbox is open)."""
        self._workers.pop(worker.pid, None)
        self._idle.forget(key)
        self.counters["worker_restarts"] += 1

        async def replace() -> None:
            delay = 0.1
            while not self._closed:
                try:
                    new = await self._spawn()
                except SandboxError as e:
                    self.counters["worker_start_failures"] += 1
                    self._last_start_error = str(e)
                    await asyncio.sleep(delay)  # back off before trying to start a worker again
                    delay = min(delay * 2, 5.0)
                    continue
                if self._closed:
                    await new.close()
                else:
                    self._idle.release(new)
                return

        self._background_task(replace())

    async def run(self, digest: str, module: pathlib.Path, profile: Profile, *, stdin: bytes,
                  env: Mapping[str, str], argv0: str | None = None, still_allowed: Callable[[], bool] | None = None,
                  key: str | None = None) -> RunResult:
        """Run the module's _start with stdin and the environment env overlaid by profile.env (the operator's
        word is final), argv [argv0 or the module file's stem]. Raises a SandboxError subclass.

        The profile's timeout_ms covers the wait for a worker (NoWorkerInTime past it) and the run
        (DeadlineExceeded); compiling, when no worker holds the module and the cache lost its artifact, comes
        before the clock starts and is bounded by COMPILE_TIMEOUT. still_allowed, if given, is asked once a
        worker is free, right before the run starts: False raises NoLongerAllowed (a module stopped while its
        request waited for a worker never runs). key names the module the run is for (default: digest): its
        profile's max_in_flight and the worker cap count the runs of that key, so two modules with the same bytes
        never share them."""
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError("digest must be 64 lowercase hex characters (SHA-256 of the module)")
        check_env(env)
        if self._data_mb and profile.memory_mb > self._data_mb - WORKER_OVERHEAD_MB:
            raise SandboxError(f"profile memory_mb {profile.memory_mb} does not fit the workers' data limit of "
                               f"{self._data_mb} MiB (less {WORKER_OVERHEAD_MB} MiB for the worker itself)")
        await self.start()
        if self._closed:
            raise SandboxError("the sandbox is closed")
        key = key if key is not None else digest
        if self._in_flight[key] >= profile.max_in_flight:
            self.counters["refused_max_in_flight"] += 1
            raise SandboxBusy(f"{key[:140]} already has {self._in_flight[key]} requests in flight "
                              f"(its profile's max_in_flight)")
        if self._idle.waiting >= self._max_waiting:
            raise SandboxBusy(f"all {self._size} workers are busy and {self._idle.waiting} requests wait for one")
        self._in_flight[key] += 1
        try:
            return await self._run(digest, pathlib.Path(module), profile, stdin, {**env, **profile.env},
                                   argv0 or pathlib.Path(module).stem, still_allowed, key)
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    async def _run(self, digest: str, module: pathlib.Path, profile: Profile, stdin: bytes, env: Mapping[str, str],
                   argv0: str, still_allowed: Callable[[], bool] | None, key: str) -> RunResult:
        artifact = None
        if not any(digest in w.holds for w in self._workers.values()):
            artifact = await self._artifacts.get(digest, module)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + profile.timeout_ms / 1000
        try:
            async with asyncio.timeout(profile.timeout_ms / 1000):  # not wait_for: see Worker.call
                worker = await self._idle.acquire(key, self._module_workers)
        except TimeoutError:
            self.counters["no_worker_in_time"] += 1
            raise NoWorkerInTime(f"no worker came free for sha256:{digest[:16]} within its deadline of {profile.timeout_ms} ms") from None
        if still_allowed is not None and not still_allowed():
            self._idle.release(worker, key)
            raise NoLongerAllowed(f"sha256:{digest[:16]} was stopped while its request waited for a worker")
        worker.busy = True
        try:
            result = await self._run_on(worker, digest, module, profile, stdin, env, argv0, artifact, deadline)
        except WorkerLost as e:
            self._replace(worker, key)
            if e.timed_out:
                raise DeadlineExceeded(str(e)) from None
            raise WorkerCrashed(f"{e}; replaced") from None
        except BaseException:
            if worker.alive and not isinstance(sys.exc_info()[1], SandboxError):
                await asyncio.shield(worker.kill())  # cancelled mid-request: the worker's state is unknown
            if not worker.alive:
                self._replace(worker, key)
            else:
                worker.busy = False
                self._idle.release(worker, key)
            raise
        worker.busy = False
        self._idle.release(worker, key)
        return result

    async def _run_on(self, worker: Worker, digest: str, module: pathlib.Path, profile: Profile, stdin: bytes,
                      env: Mapping[str, str], argv0: str, artifact: bytes | None, deadline: float) -> RunResult:
        """One round trip when the worker holds the module; otherwise its attested artifact goes along."""
        remaining = max(0.001, deadline - asyncio.get_running_loop().time())
        request = {"op": "run", "digest": digest, "argv": [argv0], "env": sorted(env.items()), "deadline_ms": remaining * 1000,
                   "profile": {"imports": list(profile.imports), "memory_mb": profile.memory_mb,
                               "timeout_ms": profile.timeout_ms, "fuel": profile.fuel}}
        for _ in range(3):
            blobs = {"stdin": stdin}
            if digest not in worker.holds:
                blobs["artifact"] = artifact = artifact if artifact is not None else await self._artifacts.get(digest, module)
            reply, out = await worker.call(request, blobs, remaining + GRACE)
            status, kind = reply.get("status"), reply.get("kind")
            if status == "need-module" or kind == "artifact-rejected":
                worker.holds.pop(digest, None)
                if kind == "artifact-rejected":  # MAC good, yet Wasmtime refused it: rebuild from the module
                    self.counters["artifacts_refused_by_wasmtime"] += 1
                    self._cache.discard(digest)
                    artifact = None
                continue
            if "artifact" in blobs:
                self.counters["artifacts_loaded"] += 1
            worker.remember(digest)
            if status == "ok":
                self.counters["runs"] += 1
                return RunResult(stdout=out.get("stdout", b""), stderr=out.get("stderr", b""), exit_code=int(reply["exit_code"]))
            self.counters[f"failed_{kind}"] += 1
            raise failure(kind, str(reply.get("message")))
        raise SandboxError(f"sandbox worker pid {worker.pid} would not load module {digest}")

    def prewarm(self, modules: Iterable[tuple[str, pathlib.Path]]) -> asyncio.Future[dict[str, str]]:
        """Compile, in the background and one at a time, each module (digest, file) whose attested artifact is
        not cached, so that its first request does not pay for it. The task's result maps the digests that could
        not be compiled to why (the request that runs one meets the same error)."""
        return self._artifacts.prewarm(modules, lambda: self._closed)

    @property
    def compiling(self) -> bool:
        """Whether a compile (a prewarm or one a request waits for) is under way."""
        return self._artifacts.compiling

    async def probe(self, role: str = "run", **paths: pathlib.Path) -> dict[str, str]:
        """Ask a worker of role ("run" or "compile") to try what its walls deny (edge.sandbox_walls.probe):
        {"fork": "EPERM", ...} or "allowed" for each attempt; paths: forbidden_read, own_file, new_file.
        Only a sandbox made with probes=True has workers that answer."""
        if not self._probes:
            raise SandboxError("this sandbox's workers do not answer probes (probes=False)")
        header = {"op": "probe", **{("read" if k == "forbidden_read" else k): str(v) for k, v in paths.items()}}
        if role == "compile":
            reply, _ = await self._compilers.call(header, {})
            return dict(reply["result"])
        await self.start()
        worker = await self._idle.acquire()
        try:
            reply, _ = await worker.call(header, {}, PROBE_TIMEOUT)
        except WorkerLost:
            self._replace(worker)
            raise
        self._idle.release(worker)
        return dict(reply["result"])

    def verify_cache(self) -> list[str]:
        """Re-MAC every cached artifact; delete the bad ones; return their digests."""
        bad = self._cache.verify_all()
        self.counters["artifacts_rejected"] += len(bad)
        return bad

    def status(self) -> dict[str, Any]:
        hellos = [w.hello for w in self._workers.values()]
        seccomp = bool(hellos) and all(h.get("seccomp") is True for h in hellos)
        reason = next((h.get("seccomp_reason") for h in hellos if h.get("seccomp") is not True), None) \
            or (hellos[0].get("seccomp_reason") if hellos else "no sandbox worker has started yet")
        landlock = bool(hellos) and all(h.get("landlock") is True for h in hellos)
        landlock_reason = next((h.get("landlock_reason") for h in hellos if h.get("landlock") is not True), None) \
            or (hellos[0].get("landlock_reason") if hellos else "no sandbox worker has started yet")
        compiler = self._compilers.hello
        return {
            "workers": self._size,
            "alive": sum(1 for w in self._workers.values() if w.alive),
            "busy": sum(1 for w in self._workers.values() if w.busy),
            "waiting": self._idle.waiting,
            "max_waiting": self._max_waiting,
            "pids": sorted(self._workers),
            "seccomp": seccomp,
            "seccomp_reason": reason,
            "seccomp_policy": "allow-list, anything else EPERM" if seccomp else None,
            "threads_at_walls": max((int(h.get("threads_at_walls", 0)) for h in hellos), default=None),
            "landlock": landlock,
            "landlock_reason": landlock_reason,
            "module_workers": self._module_workers,
            "in_flight": sum(self._in_flight.values()),
            "compile_workers_started": self._compilers.started,
            "compile_worker_walls": None if compiler is None else {k: compiler.get(k) for k in ("seccomp", "landlock", "threads_at_walls")},
            "last_compile": self._compilers.last,
            "compiling": self.compiling,
            "wasmtime": self._version,
            "engine_settings": self._cache.settings_id,
            "cache_dir": str(self._cache.dir),
            "last_worker_start_error": self._last_start_error,
            "last_artifact_store_error": self._artifacts.last_store_error,
            **dict(sorted(self.counters.items())),
        }

    async def close(self) -> None:
        """Stop every worker (a run in progress fails with WorkerCrashed, one waiting for a worker with
        SandboxError)."""
        self._closed = True
        self._idle.fail_waiters(SandboxError("the sandbox is closed"))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._artifacts.close()
        await asyncio.gather(*(w.close() for w in list(self._workers.values())), return_exceptions=True)
        self._workers.clear()
