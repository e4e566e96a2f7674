"""Confined execution of admitted WASI command modules (issue 14: "Running, confined", "A second wall",
"Cold starts that stay attested").

Modules run in a pool (edge.sandbox_pool) of long-lived worker processes (edge.sandbox_worker), never in the
caller's process; each worker runs one request at a time, with lowered resource limits and, where libseccomp can
be loaded, a syscall filter. A run links only the WASI functions its profile grants, under a memory cap (store limits), a deadline
(epoch interruption) and optional fuel. A worker that dies or stops answering is killed and replaced.

Compiled artifacts are cached per (module digest, Wasmtime version, engine settings) under an HMAC (edge.artifacts);
a bad one is deleted and rebuilt from the module file after its SHA-256 is checked against the digest.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import importlib.metadata
import pathlib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from registry.trust_policy import TrustPolicy
from registry.wasm import Import
from tlog.policy import Policy

from .artifacts import DIGEST_RE, ArtifactCache, load_or_create_key
from .sandbox_pool import Idle, Worker, WorkerLost, WorkerStartError
from .sandbox_protocol import (
    WORKER_DATA_MB,
    WORKER_OVERHEAD_MB,
    engine_settings_id,
    wasmtime_version,
)

MAX_WAITING = 64  # requests that may wait for a worker at once (each holds its stdin); more are SandboxBusy
GRACE = 2.0  # seconds past a run's deadline before the worker is presumed hung and killed
SELFTEST_TIMEOUT = 30.0
COMPILE_TIMEOUT = 60.0  # a module built to be slow to compile costs its worker this long at most
# RLIMIT_DATA of each worker: its own heap, the compiler's, and the linear memory of the run in progress
# (Wasmtime's address-space reservations are PROT_NONE and do not count). A profile must leave WORKER_OVERHEAD_MB.


@dataclass(frozen=True)
class Profile:
    """What a module may use: import patterns ("module.field", '*' wildcards, as in the trust policy), a linear
    memory cap, a wall-clock deadline per run, optional fuel, and environment variables set by the operator."""

    imports: tuple[str, ...]
    memory_mb: int
    timeout_ms: int
    fuel: int | None = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.imports, str) or not all(isinstance(p, str) and p for p in self.imports):
            raise ValueError("profile imports must be a tuple of non-empty 'module.field' patterns")
        object.__setattr__(self, "imports", tuple(self.imports))  # a list would make the profile unhashable
        for name, value in (("memory_mb", self.memory_mb), ("timeout_ms", self.timeout_ms), ("fuel", self.fuel)):
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"profile {name} must be a positive integer, not {value!r}")
        check_env(self.env)


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


class SandboxError(Exception):
    """A run that did not complete; the subclasses say why."""


class DeadlineExceeded(SandboxError):
    """The run passed its deadline (or used up its fuel) and was stopped."""


class MemoryExceeded(SandboxError):
    """The module hit its linear memory cap (and then trapped), or its initial memory exceeds the cap."""


class Trapped(SandboxError):
    """The module trapped, failed, or wrote more output than allowed."""


class NotGranted(SandboxError):
    """The module imports something its profile does not grant: it was never instantiated."""


class IntegrityError(SandboxError):
    """The module file's SHA-256 is not the digest it was admitted under."""


class SandboxBusy(SandboxError):
    """Every worker is busy and max_waiting requests already wait for one: try again later (503)."""


class NoLongerAllowed(SandboxError):
    """The caller's still_allowed() said no once a worker was free: the module was stopped while it waited."""


class ModuleInvalid(SandboxError):
    """The module does not compile, or is not a WASI command (no _start)."""


class WorkerCrashed(SandboxError):
    """The worker process running the request died; it was replaced."""


def _failure(kind: object, message: str) -> SandboxError:
    """The error for a worker's failure kind."""
    if kind == "deadline":
        return DeadlineExceeded(message)
    if kind == "memory":
        return MemoryExceeded(message)
    if kind in ("trap", "output"):
        return Trapped(message)
    if kind == "not-granted":
        return NotGranted(message)
    if kind == "module-invalid":
        return ModuleInvalid(message)
    return SandboxError(f"{kind}: {message}")


def imports_granted(imports: Iterable[tuple[str, str]], patterns: Iterable[str]) -> list[str]:
    """The imports ("module", "field") that no pattern grants, as "module.field" strings, in order.
    Matching is the trust policy's: a pattern is split on its first '.', module and field globbed separately."""
    matcher = _matcher(tuple(patterns))
    return [f"{module}.{name}" for module, name in imports if not matcher.import_allowed(Import(module, name, "func"), False)]


_NO_LOGS = Policy(logs=(), witnesses={}, groups={}, quorum="none")


@functools.lru_cache(maxsize=256)
def _matcher(patterns: tuple[str, ...]) -> TrustPolicy:
    """The trust policy's matcher for these patterns (compiled once: profiles are few, runs many)."""
    return TrustPolicy(tlog=_NO_LOGS, allowed_imports=patterns)


def check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
            raise ValueError(f"environment variable {str(key)[:40]!r}: names are non-empty without '=' or NUL, values without NUL")


class Sandbox:
    """A pool of sandbox workers and the attested artifact cache. run() may be called concurrently: each run
    takes an idle worker (waiting for one if all are busy)."""

    def __init__(self, cache_dir: pathlib.Path, key_file: pathlib.Path, *, workers: int = 2,
                 worker_data_mb: int = WORKER_DATA_MB, max_waiting: int = MAX_WAITING) -> None:
        if workers < 1:
            raise ValueError("a sandbox needs at least one worker")
        self._size = workers
        self._max_waiting = max_waiting
        try:
            self._version = wasmtime_version()
        except importlib.metadata.PackageNotFoundError:
            raise SandboxError("Wasmtime is not installed: pip install 'wasmlog[sandbox]'") from None
        self._data_mb = worker_data_mb
        self._cache = ArtifactCache(pathlib.Path(cache_dir), load_or_create_key(pathlib.Path(key_file)), engine_settings_id(self._version))
        root = pathlib.Path(__file__).resolve().parent.parent
        self._env = {"PYTHONPATH": str(root), "WASMLOG_WORKER_DATA_MB": str(worker_data_mb),
                     "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        self._idle = Idle()
        self._workers: dict[int, Worker] = {}
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._replacing: set[asyncio.Task[None]] = set()
        self._last_start_error: str | None = None
        self._last_store_error: str | None = None
        self.counters: collections.Counter[str] = collections.Counter()

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
        if worker.hello.get("wasmtime") != self._version:
            await worker.kill()
            raise SandboxError(f"sandbox worker runs Wasmtime {worker.hello.get('wasmtime')}, the agent {self._version}")
        self._workers[worker.pid] = worker
        return worker

    def _replace(self, worker: Worker) -> None:
        """Forget a lost worker and start another in the background (retrying while the sandbox is open)."""
        self._workers.pop(worker.pid, None)
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

        task = asyncio.ensure_future(replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def run(self, digest: str, module: pathlib.Path, profile: Profile, *, stdin: bytes,
                  env: Mapping[str, str], argv0: str | None = None, still_allowed: Callable[[], bool] | None = None) -> RunResult:
        """Run the module's _start with stdin and the environment env overlaid by profile.env (the operator's
        word is final), argv [argv0 or the module file's stem]. Raises a SandboxError subclass.

        still_allowed, if given, is asked once a worker is free, right before the run starts: False raises
        NoLongerAllowed (a module stopped while its request waited for a worker never runs)."""
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError("digest must be 64 lowercase hex characters (SHA-256 of the module)")
        check_env(env)
        if self._data_mb and profile.memory_mb > self._data_mb - WORKER_OVERHEAD_MB:
            raise SandboxError(f"profile memory_mb {profile.memory_mb} does not fit the workers' data limit of "
                               f"{self._data_mb} MiB (less {WORKER_OVERHEAD_MB} MiB for the worker itself)")
        await self.start()
        if self._closed:
            raise SandboxError("the sandbox is closed")
        if self._idle.waiting >= self._max_waiting:
            raise SandboxBusy(f"all {self._size} workers are busy and {self._idle.waiting} requests wait for one")
        worker = await self._idle.acquire()
        if still_allowed is not None and not still_allowed():
            self._idle.release(worker)
            raise NoLongerAllowed(f"sha256:{digest[:16]} was stopped while its request waited for a worker")
        worker.busy = True
        try:
            result = await self._run_on(worker, digest, pathlib.Path(module), profile, stdin, {**env, **profile.env},
                                        argv0 or pathlib.Path(module).stem)
        except WorkerLost as e:
            self._replace(worker)
            if e.timed_out:
                raise DeadlineExceeded(str(e)) from None
            raise WorkerCrashed(f"{e}; replaced") from None
        except BaseException:
            if worker.alive and not isinstance(sys.exc_info()[1], SandboxError):
                await asyncio.shield(worker.kill())  # cancelled mid-request: the worker's state is unknown
            if not worker.alive:
                self._replace(worker)
            else:
                worker.busy = False
                self._idle.release(worker)
            raise
        worker.busy = False
        self._idle.release(worker)
        return result

    async def _run_on(self, worker: Worker, digest: str, module: pathlib.Path, profile: Profile, stdin: bytes,
                      env: Mapping[str, str], argv0: str) -> RunResult:
        """One round trip when the worker holds the module or its attested artifact is cached (sent along)."""
        request = {"op": "run", "digest": digest, "argv": [argv0], "env": sorted(env.items()),
                   "profile": {"imports": list(profile.imports), "memory_mb": profile.memory_mb,
                               "timeout_ms": profile.timeout_ms, "fuel": profile.fuel}}
        timeout = profile.timeout_ms / 1000 + GRACE
        for _ in range(3):
            blobs = {"stdin": stdin}
            if digest not in worker.holds:
                artifact = self._attested_artifact(digest)
                if artifact is None:
                    await self._compile(worker, digest, module)
                else:
                    blobs["artifact"] = artifact
            reply, out = await worker.call(request, blobs, timeout)
            status, kind = reply.get("status"), reply.get("kind")
            if status == "need-module" or kind == "artifact-rejected":
                worker.holds.pop(digest, None)
                if kind == "artifact-rejected":  # MAC good, yet Wasmtime refused it: rebuild from the module
                    self.counters["artifacts_refused_by_wasmtime"] += 1
                    self._cache.discard(digest)
                continue
            if "artifact" in blobs:
                self.counters["artifacts_loaded"] += 1
            worker.remember(digest)
            if status == "ok":
                self.counters["runs"] += 1
                return RunResult(stdout=out.get("stdout", b""), stderr=out.get("stderr", b""), exit_code=int(reply["exit_code"]))
            self.counters[f"failed_{kind}"] += 1
            raise _failure(kind, str(reply.get("message")))
        raise SandboxError(f"sandbox worker pid {worker.pid} would not load module {digest}")

    def _attested_artifact(self, digest: str) -> bytes | None:
        artifact, bad = self._cache.load(digest)
        if bad:
            self.counters["artifacts_rejected"] += 1
        return artifact

    async def _compile(self, worker: Worker, digest: str, module: pathlib.Path) -> None:
        """Have the worker compile the module file (after checking its SHA-256 against digest); cache the
        artifact under its MAC."""
        try:
            wasm = await asyncio.to_thread(module.read_bytes)
        except OSError as e:
            raise IntegrityError(f"module file {module} is unreadable: {e}") from None
        if hashlib.sha256(wasm).hexdigest() != digest:
            self.counters["integrity_errors"] += 1
            raise IntegrityError(f"module file {module} does not hash to {digest}: it changed on disk")
        reply, blobs = await worker.call({"op": "compile", "digest": digest}, {"wasm": wasm}, COMPILE_TIMEOUT)
        if reply.get("status") != "ok":
            raise _failure(reply.get("kind"), str(reply.get("message")))
        worker.remember(digest)
        self.counters["compiled"] += 1
        try:
            self._cache.store(digest, blobs["artifact"])
        except OSError as e:  # the run goes on; the next cold start compiles again
            self.counters["artifact_store_failures"] += 1
            self._last_store_error = f"{type(e).__name__}: {e}"

    async def self_test(self, forbidden_read: pathlib.Path | None = None) -> dict[str, str]:
        """Ask an idle worker to try what its walls deny: {"fork": "EPERM", ...} or "allowed" for each attempt;
        with forbidden_read, also to open that file for reading ("read_outside")."""
        await self.start()
        worker = await self._idle.acquire()
        try:
            reply, _ = await worker.call({"op": "selftest", "read": str(forbidden_read) if forbidden_read else None}, {}, SELFTEST_TIMEOUT)
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
        return {
            "workers": self._size,
            "alive": sum(1 for w in self._workers.values() if w.alive),
            "busy": sum(1 for w in self._workers.values() if w.busy),
            "waiting": self._idle.waiting,
            "max_waiting": self._max_waiting,
            "pids": sorted(self._workers),
            "seccomp": seccomp,
            "seccomp_reason": reason,
            "threads_at_walls": max((int(h.get("threads_at_walls", 0)) for h in hellos), default=None),
            "landlock": landlock,
            "landlock_reason": landlock_reason,
            "wasmtime": self._version,
            "engine_settings": self._cache.settings_id,
            "cache_dir": str(self._cache.dir),
            "last_worker_start_error": self._last_start_error,
            "last_artifact_store_error": self._last_store_error,
            **dict(sorted(self.counters.items())),
        }

    async def close(self) -> None:
        """Stop every worker (a run in progress fails with WorkerCrashed, one waiting for a worker with
        SandboxError)."""
        self._closed = True
        self._idle.fail_waiters(SandboxError("the sandbox is closed"))
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in list(self._workers.values())), return_exceptions=True)
        self._workers.clear()
