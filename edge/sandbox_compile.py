"""Compile-only sandbox workers: the only processes whose output becomes a cached artifact.

A compile worker (edge.sandbox_worker in its "compile" role, behind the same walls as a run worker) never
instantiates or runs a module, and refuses to; it compiles at most per_process modules (verified bytes of
admitted modules) and then exits, and one that fails, times out or breaks the protocol is killed at once. A run
worker, which has run untrusted code, is never asked to compile: nothing it could hand back is ever stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from .sandbox_pool import Worker, WorkerLost

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
