"""The sandbox's worker processes: starting one, a framed request/answer with a deadline, killing and reaping it;
and the first-come-first-served hand-out of idle workers. edge.sandbox builds the pool on these."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from .sandbox_protocol import MODULE_LRU, ProtocolError, encode, read_frame_async

STARTUP_TIMEOUT = 60.0  # a worker's hello
STDERR_TAIL = 4096  # bytes of a worker's own stderr kept for error messages


class WorkerStartError(Exception):
    """A worker process did not start and say hello."""


class WorkerLost(Exception):
    """The worker died, broke the protocol, or did not answer in time (it has been killed)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Worker:
    """One worker process and its pipes. The process is a plain subprocess.Popen (starting it cannot be
    interrupted half-way by a cancellation) whose pipes are attached to the event loop."""

    def __init__(self, popen: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tail: collections.deque[bytes], drain: asyncio.Future[None]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.hello: dict[str, Any] = {}
        self.busy = False
        self.holds: collections.OrderedDict[str, None] = collections.OrderedDict()  # mirrors the worker's LRU
        self._reader, self._writer = reader, writer
        self._tail, self._drain_task = tail, drain

    @classmethod
    async def start(cls, env: Mapping[str, str]) -> Worker:
        popen = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, not a wait; uninterruptible on purpose
            [sys.executable, "-m", "edge.sandbox_worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env), cwd="/")
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        loop = asyncio.get_running_loop()
        tail: collections.deque[bytes] = collections.deque()
        reader, errors = asyncio.StreamReader(), asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), popen.stdout)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(errors), popen.stderr)
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, popen.stdin)
        except BaseException:
            popen.kill()
            raise
        worker = cls(popen, reader, asyncio.StreamWriter(transport, protocol, None, loop), tail,
                     asyncio.ensure_future(cls._drain(errors, tail)))
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):  # not wait_for: it can swallow a cancellation (tlog/runloop.py)
                worker.hello, _ = await read_frame_async(reader)
        except BaseException as e:
            await worker.kill()
            if not isinstance(e, (asyncio.IncompleteReadError, ProtocolError, TimeoutError)):
                raise
            raise WorkerStartError(f"sandbox worker failed to start ({type(e).__name__}): {worker.stderr_tail()[-1000:]}") from None
        if worker.hello.get("op") != "hello":
            await worker.kill()
            raise WorkerStartError(f"sandbox worker said {str(worker.hello)[:100]} instead of hello")
        return worker

    @staticmethod
    async def _drain(errors: asyncio.StreamReader, tail: collections.deque[bytes]) -> None:
        """Keep the last STDERR_TAIL bytes of the worker's own stderr (never the module's: that is captured)."""
        size = 0
        while chunk := await errors.read(65536):
            tail.append(chunk)
            size += len(chunk)
            while size - len(tail[0]) >= STDERR_TAIL:
                size -= len(tail.popleft())

    def remember(self, digest: str) -> None:
        self.holds[digest] = None
        self.holds.move_to_end(digest)
        while len(self.holds) > MODULE_LRU:
            self.holds.popitem(last=False)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self) -> str:
        return b"".join(self._tail).decode(errors="replace")[-STDERR_TAIL:].strip()

    async def call(self, header: Mapping[str, Any], blobs: Mapping[str, bytes], timeout: float) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that arrives just as
            # the drain completes, and the caller that gave up would wait for the whole run (seen in CI).
            async with asyncio.timeout(timeout):
                self._writer.write(encode(header, blobs))
                await self._writer.drain()
                return await read_frame_async(self._reader)
        except TimeoutError:
            await self.kill()
            raise WorkerLost(f"sandbox worker pid {self.pid} did not answer within {timeout:.1f} s; killed", timed_out=True) from None
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
            await self.kill(wait_first=not isinstance(e, ProtocolError))
            code = self.popen.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            detail = f" ({e})" if isinstance(e, ProtocolError) else ""
            tail = self.stderr_tail()
            raise WorkerLost(f"sandbox worker pid {self.pid} died during the request ({how}){detail}"
                              + (f"; its stderr: {tail[-300:]}" if tail else "")) from None

    async def kill(self, *, wait_first: bool = False) -> None:
        """Kill the process (after up to a second for it to exit by itself, when wait_first) and reap it."""
        if wait_first:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.popen.wait, 1.0)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        await asyncio.to_thread(self.popen.wait)
        self._writer.close()
        await asyncio.wait({self._drain_task}, timeout=1.0)

    async def close(self) -> None:
        """Ask the worker to exit (end of its input), kill it if it does not."""
        if self.alive:
            self._writer.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.popen.wait, 5.0)
        await self.kill()


class Idle:
    """Idle workers, handed out first come, first served among the callers that may take one: a released worker
    goes straight to the longest waiting caller whose key holds fewer workers than its cap (asyncio.Queue would
    let a caller that releases and asks again overtake the waiters). A key (a module) thus never holds more
    than its cap of workers at once, however many of its requests wait."""

    def __init__(self) -> None:
        self._workers: collections.deque[Worker] = collections.deque()
        self._waiters: collections.deque[tuple[asyncio.Future[Worker], str | None, int]] = collections.deque()
        self.held: collections.Counter[str] = collections.Counter()  # workers each key holds now
        self._failed: BaseException | None = None

    def _may_take(self, key: str | None, cap: int) -> bool:
        return key is None or self.held[key] < cap

    def release(self, worker: Worker, key: str | None = None) -> None:
        """Give the worker back (key: the caller it was handed to, if any); it goes to the first waiter that may take it."""
        self._workers.append(worker)
        self.forget(key)

    def forget(self, key: str | None) -> None:
        """A worker handed to key is back or was lost (it is being replaced): key holds one fewer, and a waiter of
        key that was at its cap may now take an idle worker."""
        if key is not None:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
        for waiter in list(self._waiters):
            if not self._workers:
                return
            future, waiting_key, cap = waiter
            if future.done():
                self._waiters.remove(waiter)
            elif self._may_take(waiting_key, cap):
                self._waiters.remove(waiter)
                if waiting_key is not None:
                    self.held[waiting_key] += 1
                future.set_result(self._workers.popleft())

    @property
    def waiting(self) -> int:
        """Callers waiting for a worker now."""
        return sum(1 for w, _, _ in self._waiters if not w.done())

    def fail_waiters(self, error: BaseException) -> None:
        """Fail every caller waiting now, and every caller from now on, with error (the pool is closing)."""
        self._failed = error
        while self._waiters:
            waiter, _, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def acquire(self, key: str | None = None, cap: int = 1) -> Worker:
        """An idle worker, waiting for one if none is free or key already holds cap of them; release it with key."""
        if self._failed is not None:
            raise self._failed
        if self._workers and self._may_take(key, cap) and not any(
                not w.done() and self._may_take(k, c) for w, k, c in self._waiters):
            if key is not None:
                self.held[key] += 1
            return self._workers.popleft()
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, key, cap))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result(), key)  # handed over just as the caller gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((waiter, key, cap))
            raise
