"""SBOM validation in worker processes of its own, each validation within a time budget.

The libraries' validation is not linear in the document and holds the GIL, so it runs in
``python -m registry.sbom_pool`` worker processes, never in the event loop's thread pool.
A validation that passes its budget is answered with SbomTooSlow (422) and its worker is
killed and replaced; a request that finds every worker busy and too many waiting is answered
with SbomValidatorsBusy (503, retry). Workers start on first use.

Frames on a worker's stdin/stdout (big-endian uint32 lengths):

    request: len, media type (UTF-8), len, document
    reply:   len, b"ok" | b"!" + the RecordError message (UTF-8); b"ready" once at start-up
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import struct
import subprocess
import sys
import threading
import time

from tlog.errors import PushbackError

from .record import RecordError
from .sbom import require_validator

LENGTH = struct.Struct(">I")
BUDGET_SECONDS = 20.0  # a document within sbom.py's limits takes a few seconds on a slow machine
START_SECONDS = 60.0  # a worker's start-up: a Python process and the validation libraries
MAX_REPLY = 4096
WORKER_MEMORY = 2 << 30  # address space of a worker (bytes)


class SbomTooSlow(RecordError):
    """An SBOM whose validation passed its time budget (HTTP 422)."""


class SbomValidatorsBusy(PushbackError):
    """Every SBOM validator is busy and too many requests wait (HTTP 503, retry)."""


def _frame(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


class _Worker:
    """One worker process, driven by one pool thread at a time (blocking I/O with deadlines)."""

    def __init__(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "registry.sbom_pool"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in, self._out = self.process.stdin, self.process.stdout.fileno()

    def _read(self, n: int, deadline: float) -> bytes | None:
        """Exactly n bytes of the reply, or None if the deadline passed. Raises EOFError."""
        buf = bytearray()
        while len(buf) < n:
            timeout = deadline - time.monotonic()
            if timeout <= 0 or not select.select([self._out], [], [], timeout)[0]:
                return None
            chunk = os.read(self._out, n - len(buf))
            if not chunk:
                raise EOFError("the SBOM validator exited")
            buf += chunk
        return bytes(buf)

    def reply(self, seconds: float) -> bytes | None:
        """The next reply, or None if it did not come within seconds. Raises EOFError."""
        deadline = time.monotonic() + seconds
        head = self._read(LENGTH.size, deadline)
        if head is None:
            return None
        (n,) = LENGTH.unpack(head)
        if n > MAX_REPLY:
            raise EOFError(f"the SBOM validator sent a reply of {n} bytes")
        return self._read(n, deadline)

    def send(self, media_type: str, data: bytes) -> None:
        self._in.write(_frame(media_type.encode()) + LENGTH.pack(len(data)))
        self._in.write(data)
        self._in.flush()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._in.close()
        assert self.process.stdout is not None
        self.process.stdout.close()


class SbomPool:
    """Validates SBOMs (registry.sbom.validate_sbom) in `workers` processes, each call within `budget` seconds."""

    def __init__(self, workers: int = 1, budget: float = BUDGET_SECONDS, max_waiting: int = 8) -> None:
        self.workers = workers
        self.budget = budget
        self.max_waiting = max_waiting
        self.validations = 0  # validations started (a worker was given a document)
        self._in_flight = 0
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    async def validate(self, media_type: str, data: bytes) -> None:
        """Raise RecordError (SbomTooSlow) unless the SBOM is valid; SbomValidatorsBusy (PushbackError) when overloaded.

        Raises MissingDependencyError, before any worker starts, when the format's library is not installed.
        """
        require_validator(media_type)
        if self._in_flight >= self.workers + self.max_waiting:
            raise SbomValidatorsBusy(f"all {self.workers} SBOM validators are busy; retry")
        if self._threads is None:
            self._closed = False
            self._threads = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="wasmlog-sbom")
        self._in_flight += 1
        try:
            error = await asyncio.get_running_loop().run_in_executor(self._threads, self._validate, media_type, data)
        finally:
            self._in_flight -= 1
        if error is not None:
            raise error

    def _validate(self, media_type: str, data: bytes) -> RecordError | PushbackError | None:
        """In a pool thread: run one validation on an idle (or new) worker; return the error to raise."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            try:
                worker = _Worker()
            except OSError as e:  # no process to be had (limits on processes or files)
                return SbomValidatorsBusy(f"an SBOM validator could not start ({e}); retry")
            try:
                ready = worker.reply(START_SECONDS) == b"ready"
            except EOFError:
                ready = False
            if not ready:
                worker.kill()
                return SbomValidatorsBusy("an SBOM validator did not start; retry")
        try:
            worker.send(media_type, data)
        except OSError:  # it exited while idle: not this document's doing
            worker.kill()
            return SbomValidatorsBusy("an SBOM validator exited; retry")
        with self._lock:
            self.validations += 1
        try:
            answer = worker.reply(self.budget)
        except EOFError as e:  # it died on this document (its memory limit?)
            worker.kill()
            return RecordError(f"the SBOM validator failed on this document ({e})")
        if answer is None:
            worker.kill()
            return SbomTooSlow(f"SBOM validation took longer than its budget of {self.budget:g} s")
        with self._lock:
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
        return None if answer == b"ok" else RecordError(answer[1:].decode("utf-8", "replace"))

    def close(self) -> None:
        """Stop every worker (a busy one when its validation ends). The pool starts again if used again."""
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for worker in idle:
            worker.kill()
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None


def _read_exactly(stream: object, n: int) -> bytes:
    data = stream.read(n)  # type: ignore[attr-defined]
    if len(data) != n:
        raise EOFError
    return bytes(data)


def serve() -> None:
    """A worker: answer each request frame on stdin with a reply frame on stdout until EOF."""
    import resource

    from .sbom import preload, validate_sbom

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies
    stdin = sys.stdin.buffer
    preload()
    out.write(_frame(b"ready"))
    out.flush()
    while True:
        try:
            media_type = _read_exactly(stdin, LENGTH.unpack(_read_exactly(stdin, LENGTH.size))[0]).decode()
            data = _read_exactly(stdin, LENGTH.unpack(_read_exactly(stdin, LENGTH.size))[0])
        except EOFError:
            return
        try:
            validate_sbom(media_type, data)
            answer = b"ok"
        except RecordError as e:
            answer = b"!" + str(e).encode()[: MAX_REPLY - 1]
        except MemoryError:
            answer = b"!the SBOM needs more memory to validate than a validator has"
        except Exception as e:  # noqa: BLE001 -- TooLargeError and the like: still the document's problem
            answer = b"!" + f"invalid SBOM ({type(e).__name__}: {e})".encode()[: MAX_REPLY - 1]
        out.write(_frame(answer))
        out.flush()


if __name__ == "__main__":
    serve()
