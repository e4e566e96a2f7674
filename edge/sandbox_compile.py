"""Attested artifacts, and the compile-only sandbox workers that are the only processes whose output becomes one.

Artifacts hands out a module's compiled artifact: from the cache (edge.artifacts) when its HMAC checks, else
compiled (once, however many requests ask at the same time) from the module file, after its SHA-256 is checked
against the digest, by a compile worker, and cached. A compile worker (edge.sandbox_worker in its "compile"
role, behind the same walls as a run worker) never instantiates or runs a module, and refuses to; it compiles
at most per_process modules (verified bytes of admitted modules) and then exits, and one that fails, times out
or breaks the protocol is killed at once. A run worker, which has run untrusted code, is never asked to
compile: nothing it could hand back is ever stored.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .artifacts import ArtifactCache
from .memory_export import with_memory_export
from .sandbox_pool import Worker, WorkerLost, WorkerStartError
from .sandbox_protocol import MEMORY_EXPORT
from .sandbox_types import DeadlineExceeded, IntegrityError, SandboxError, WorkerCrashed, failure

COMPILE_TIMEOUT = 60.0  # a module built to be slow to compile costs its compile worker this long at most
COMPILE_CONCURRENCY = 2  # compile workers at once (prewarming takes one at a time, leaving one for requests)
COMPILES_PER_PROCESS = 16  # modules one compile worker compiles before it exits


class Compilers:
    """Compile workers, started on demand, at most concurrency at once. last is what the last compile's worker
    said of itself (its pid, role and counts), and hello the last compile worker's hello (its walls)."""

    def __init__(self, env: Mapping[str, str], version: str, *, per_process: int = COMPILES_PER_PROCESS,
                 concurrency: int = COMPILE_CONCURRENCY) -> None:
        if per_process < 1 or concurrency < 1:
            raise ValueError("compile workers need per_process and concurrency of at least 1")
        self._env = {**env, "WASMLOG_WORKER_ROLE": "compile"}
        self._version = version
        self._per_process = per_process
        self._gate = asyncio.Semaphore(concurrency)
        self._idle: list[tuple[Worker, int]] = []  # (worker, compiles done)
        self._busy: set[Worker] = set()
        self._closed = False
        self.started = 0
        self.last: dict[str, Any] | None = None
        self.hello: dict[str, Any] | None = None

    async def _start(self) -> Worker:
        worker = await Worker.start(self._env)
        self.started += 1
        self.hello = worker.hello
        if worker.hello.get("role") != "compile" or worker.hello.get("wasmtime") != self._version:
            await worker.kill()
            raise WorkerLost(f"compile worker pid {worker.pid} said {str(worker.hello)[:200]}")
        return worker

    async def call(self, header: Mapping[str, Any], blobs: Mapping[str, bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
        """One request to a compile worker (raises WorkerStartError, WorkerLost). A compile answered "ok" comes
        from a worker that says it is a compile worker that never ran a module; any other answer retires it."""
        async with self._gate:
            if self._closed:
                raise WorkerLost("the sandbox is closed")
            worker, done = self._idle.pop() if self._idle else (await self._start(), 0)
            self._busy.add(worker)
            keep = False
            try:
                reply, out = await worker.call(header, blobs, COMPILE_TIMEOUT)
                stats = reply.get("stats")
                if reply.get("status") == "ok" and header.get("op") == "compile":
                    if not isinstance(stats, dict) or stats.get("role") != "compile" or stats.get("runs") != 0 or "artifact" not in out:
                        raise WorkerLost(f"compile worker pid {worker.pid} answered a compile with {str(reply)[:200]}")
                    self.last = {"pid": worker.pid, **stats}
                    keep = done + 1 < self._per_process
            finally:
                self._busy.discard(worker)
                if keep and not self._closed:
                    self._idle.append((worker, done + 1))
                else:
                    await asyncio.shield(worker.close() if worker.alive else worker.kill())
            return reply, out

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(w.close() for w, _ in idle), *(w.kill() for w in list(self._busy)), return_exceptions=True)


class Artifacts:
    """The attested artifacts of a sandbox: counters are the sandbox's (compiled, artifacts_rejected, ...)."""

    def __init__(self, cache: ArtifactCache, compilers: Compilers, counters: collections.Counter[str]) -> None:
        self._cache, self._compilers, self._counters = cache, compilers, counters
        self._compiling: dict[str, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False
        self.last_store_error: str | None = None

    def _task(self, awaitable: Any) -> asyncio.Future[Any]:
        task: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def attested(self, digest: str) -> bytes | None:
        """The cached artifact of digest if its MAC checks (a bad one is deleted and counted)."""
        artifact, bad = self._cache.load(digest)
        if bad:
            self._counters["artifacts_rejected"] += 1
        return artifact

    def discard(self, digest: str) -> None:
        self._cache.discard(digest)

    async def get(self, digest: str, module: pathlib.Path) -> bytes:
        """The attested artifact of digest: from the cache, else compiled from module and cached."""
        cached = self.attested(digest)
        if cached is not None:
            return cached
        pending = self._compiling.get(digest)
        if pending is None:
            pending = self._compiling[digest] = self._task(self._compile(digest, module))
            pending.add_done_callback(lambda f: (self._compiling.pop(digest, None), f.cancelled() or f.exception()))
        try:
            return await asyncio.shield(pending)  # a request that gives up does not stop the compile others wait for
        except asyncio.CancelledError:
            if pending.cancelled() and self._closed:
                raise SandboxError("the sandbox is closed") from None
            raise

    async def _compile(self, digest: str, module: pathlib.Path) -> bytes:
        try:
            wasm = await asyncio.to_thread(module.read_bytes)
        except OSError as e:
            raise IntegrityError(f"module file {module} is unreadable: {e}") from None
        if hashlib.sha256(wasm).hexdigest() != digest:
            self._counters["integrity_errors"] += 1
            raise IntegrityError(f"module file {module} does not hash to {digest}: it changed on disk")
        try:
            reply, blobs = await self._compilers.call({"op": "compile", "digest": digest}, {"wasm": with_memory_export(wasm, MEMORY_EXPORT)})
        except WorkerStartError as e:
            raise SandboxError(str(e)) from None
        except WorkerLost as e:
            if e.timed_out:
                raise DeadlineExceeded(f"compiling sha256:{digest[:16]} took over {COMPILE_TIMEOUT:.0f} s: {e}") from None
            raise WorkerCrashed(f"compile worker: {e}") from None
        if reply.get("status") != "ok":
            raise failure(reply.get("kind"), str(reply.get("message")))
        self._counters["compiled"] += 1
        try:
            self._cache.store(digest, blobs["artifact"])
        except OSError as e:  # the run goes on; the next cold start compiles again
            self._counters["artifact_store_failures"] += 1
            self.last_store_error = f"{type(e).__name__}: {e}"
        return blobs["artifact"]

    def prewarm(self, modules: Iterable[tuple[str, pathlib.Path]], closed: Callable[[], bool]) -> asyncio.Future[dict[str, str]]:
        """Compile each module (digest, file) that has no attested artifact, one at a time, in the background;
        the task's result maps the digests that could not be compiled to why."""
        items = list(modules)

        async def warm() -> dict[str, str]:
            failures: dict[str, str] = {}
            for digest, path in items:
                if closed() or self._closed:
                    break
                try:
                    await self.get(digest, path)
                    self._counters["prewarmed"] += 1
                except SandboxError as e:
                    self._counters["prewarm_failures"] += 1
                    failures[digest] = f"{type(e).__name__}: {e}"
            return failures

        return self._task(warm())

    @property
    def compiling(self) -> bool:
        """Whether a compile or a prewarm is under way."""
        return any(not t.done() for t in self._tasks)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._compilers.close()
