"""A sandbox worker: `python -m edge.sandbox_worker`, one of the agent's processes, speaking
edge.sandbox_protocol frames on its stdin and stdout, one request at a time, in one of two roles (its
WASMLOG_WORKER_ROLE):

- "run": long-lived; runs WASI modules it is handed as attested compiled artifacts (checked by the agent), and
  keeps the ones it has loaded (by digest) in a small LRU; a run of a module it does not hold answers
  "need-module". It never compiles: what it could hand back is never stored.
- "compile": started fresh by the agent to compile verified module bytes into artifacts; it never instantiates or
  runs a module, and refuses to.

At start it lowers its resource limits and builds its Wasmtime engine, then puts up its walls (edge.sandbox_walls):
a syscall allow-list where libseccomp can be loaded, and Landlock where the kernel has it (file system access
confined to reading the interpreter's files, /proc and /sys, so that not even the agent's artifact key can be
read); it says hello with what it managed. The probe op (trying from inside what the walls deny) is answered
only when the agent started the worker with WASMLOG_WORKER_PROBES=1.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import wasmtime

from edge.sandbox_protocol import (
    ENGINE_SETTINGS,
    MAX_BLOB,
    MEMORY_EXPORT,
    MODULE_LRU,
    encode,
    read_frame,
    wasmtime_version,
)
from edge.sandbox_types import imports_granted
from edge.sandbox_walls import Seccomp, apply_landlock, probe, readable_trees, set_limits

STDOUT_MAX = 16 << 20
STDERR_MAX = 1 << 20
TABLE_ELEMENTS = 1 << 20
WASI = "wasi_snapshot_preview1"
ROLES = ("run", "compile")


class Watchdog(threading.Thread):
    """Increments the engine's epoch when an armed deadline passes: a store with epoch deadline 1 then traps."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        super().__init__(daemon=True, name="deadline")
        self._engine = engine
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._fired = False

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._deadline, self._fired = time.monotonic() + seconds, False
            self._cond.notify()

    def disarm(self) -> bool:
        """Stop watching; whether the deadline fired."""
        with self._cond:
            self._deadline = None
            return self._fired

    def run(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._engine.increment_epoch()
                self._fired, self._deadline = True, None


class Capture:
    """A bounded sink for the module's stdout or stderr; past its bound it refuses writes and interrupts the run."""

    def __init__(self, limit: int, interrupt: Callable[[], None]) -> None:
        self.limit, self.size, self.overflow = limit, 0, False
        self.parts: list[bytes] = []
        self._interrupt = interrupt

    def __call__(self, data: bytes) -> int:
        if self.size + len(data) > self.limit:
            if not self.overflow:
                self.overflow = True
                self._interrupt()
            return -errno.EFBIG
        self.size += len(data)
        self.parts.append(data)
        return len(data)


class Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Runtime:
    """The worker's engine and, in the run role, the modules it holds; counts says what it has done."""

    def __init__(self, role: str) -> None:
        config = wasmtime.Config()
        for name, value in ENGINE_SETTINGS.items():
            if not name.startswith("wasmlog_"):  # wasmlog_* settings are ours (edge.sandbox_protocol)
                setattr(config, name, value)
        self.role = role
        self.engine = wasmtime.Engine(config)
        self.watchdog = Watchdog(self.engine)  # started by main() once the walls are up: a thread started
        # before seccomp and Landlock would stay outside both (they bind the calling thread and its children)
        self.modules: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self.counts = {"runs": 0, "compiles": 0, "loads": 0}
        self._wasi = wasmtime.Linker(self.engine)  # every WASI function; runs copy only the granted ones
        self._use_memfd = os.path.isdir("/proc/self/fd") and hasattr(os, "memfd_create")
        self._deadline_ms = 0.0
        if role == "run":
            self._wasi.define_wasi()
            self._probe_wasi()

    def _probe_wasi(self) -> None:
        """Exercise WASI linking and a run once before the seccomp filter goes on (lazy initialisation)."""
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasmtime.WasiConfig())
        self._wasi.get(store, WASI, "fd_write")
        store.set_epoch_deadline(1)
        store.set_fuel(1000)
        self._wasi.instantiate(store, wasmtime.Module(self.engine, b"\0asm\x01\0\0\0"))
        store.close()

    def remember(self, digest: str, module: wasmtime.Module) -> None:
        self.modules[digest] = module
        self.modules.move_to_end(digest)
        while len(self.modules) > MODULE_LRU:
            self.modules.popitem(last=False)

    def load(self, digest: str, artifact: bytes) -> None:
        try:
            module = wasmtime.Module.deserialize(self.engine, artifact)
        except wasmtime.WasmtimeError as e:
            raise Failure("artifact-rejected", f"Wasmtime refused the artifact: {str(e).splitlines()[0]}") from None
        self.counts["loads"] += 1
        self.remember(digest, module)

    def compile(self, wasm: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Compile verified module bytes into an artifact (compile role only: nothing here ever ran a module)."""
        if self.role != "compile":
            raise Failure("refused", "a run worker does not compile: artifacts come only from compile workers")
        self.counts["compiles"] += 1
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise Failure("module-invalid", f"module does not compile: {str(e).splitlines()[0]}") from None
        return {"status": "ok", "stats": {"role": self.role, **self.counts}}, {"artifact": bytes(module.serialize())}

    def _stdin_path(self, data: bytes) -> tuple[str, int]:
        if self._use_memfd:
            fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
            path = f"/proc/self/fd/{fd}"
        else:
            fd = os.open(os.devnull, os.O_RDONLY)  # no /proc: a request body needs memfd; refuse one
            path = os.devnull
            if data:
                os.close(fd)
                raise Failure("unavailable", "this worker cannot pass stdin (no memfd or /proc)")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return path, fd

    def run(self, req: dict[str, Any], stdin: bytes, artifact: bytes | None) -> tuple[dict[str, Any], dict[str, bytes]]:
        """Run a module this worker holds, or the one in artifact (checked by the agent), loaded first."""
        if self.role != "run":
            raise Failure("refused", "a compile worker never instantiates or runs a module")
        digest = req["digest"]
        if artifact is not None:
            self.load(digest, artifact)
        module = self.modules.get(digest)
        if module is None:
            return {"status": "need-module"}, {}
        self.modules.move_to_end(digest)
        profile = req["profile"]
        ungranted = imports_granted(((i.module, i.name or "") for i in module.imports), profile["imports"])
        if ungranted:
            raise Failure("not-granted", f"imports not granted by the profile: {', '.join(ungranted[:10])}")
        if "_start" not in {e.name for e in module.exports}:
            raise Failure("module-invalid", "module has no _start export (not a WASI command)")
        store = wasmtime.Store(self.engine)
        self.counts["runs"] += 1
        try:
            return self._run_in(store, module, req, stdin)
        finally:
            store.close()  # now, not at the next garbage collection: it holds the WASI context and its stdin

    def _run_in(self, store: wasmtime.Store, module: wasmtime.Module, req: dict[str, Any], stdin: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        profile = req["profile"]
        cap = profile["memory_mb"] << 20
        store.set_limits(memory_size=cap, table_elements=TABLE_ELEMENTS, instances=1, tables=4, memories=1)
        store.set_fuel(profile["fuel"] if profile["fuel"] is not None else (1 << 63) - 1)
        store.set_epoch_deadline(1)
        stdout = Capture(STDOUT_MAX, self.engine.increment_epoch)
        stderr = Capture(STDERR_MAX, self.engine.increment_epoch)
        wasi = wasmtime.WasiConfig()
        wasi.argv = req["argv"]
        wasi.env = req["env"]
        stdin_path, stdin_fd = self._stdin_path(stdin)
        try:
            wasi.stdin_file = stdin_path
        finally:
            os.close(stdin_fd)
        wasi.stdout_custom = stdout
        wasi.stderr_custom = stderr
        store.set_wasi(wasi)
        linker = self._linker(store, module)
        exit_code = 0
        instance: wasmtime.Instance | None = None
        self._deadline_ms = float(req.get("deadline_ms", profile["timeout_ms"]))  # what is left of the request's deadline
        self.watchdog.arm(self._deadline_ms / 1000)  # before instantiation: a start function may loop
        try:
            instance = linker.instantiate(store, module)
            start = instance.exports(store)["_start"]
            if not isinstance(start, wasmtime.Func):
                raise Failure("module-invalid", "_start is not a function")
            start(store)
        except wasmtime.ExitTrap as e:
            exit_code = e.code
        except wasmtime.Trap as e:
            raise self._classify(e, self.watchdog.disarm(), stdout, stderr, instance, store, profile) from None
        except wasmtime.WasmtimeError as e:
            message = str(e).splitlines()[0]
            if instance is None and "memory" in message and "exceeds" in message and "limit" in message:
                raise Failure("memory", f"the module's initial memory exceeds the cap of {profile['memory_mb']} MiB") from None
            if instance is None and "unknown import" in message:
                raise Failure("not-granted", f"granted import not provided by this node: {message}") from None
            raise Failure("trap", f"the module failed: {message}") from None
        finally:
            self.watchdog.disarm()
            linker.close()
        if stdout.overflow or stderr.overflow:
            raise Failure("output", self._overflow_message(stdout, stderr))
        return {"status": "ok", "exit_code": exit_code}, {"stdout": b"".join(stdout.parts), "stderr": b"".join(stderr.parts)}

    def _linker(self, store: wasmtime.Store, module: wasmtime.Module) -> wasmtime.Linker:
        """A linker holding only the WASI functions this module imports (all of them granted, checked above):
        nothing else exists for the module."""
        wasi = self._wasi
        linker = wasmtime.Linker(self.engine)
        for imp in module.imports:
            if imp.module != WASI:
                continue  # left undefined: instantiation fails, reported as not provided
            try:
                item = wasi.get(store, imp.module, imp.name or "")
            except wasmtime.WasmtimeError:
                continue
            linker.define(store, imp.module, imp.name or "", item)
        return linker

    @staticmethod
    def _overflow_message(stdout: Capture, stderr: Capture) -> str:
        which = "stdout" if stdout.overflow else "stderr"
        limit = stdout.limit if stdout.overflow else stderr.limit
        return f"output too large: the module wrote more than {limit} bytes to {which}"

    def _classify(self, e: wasmtime.Trap, fired: bool, stdout: Capture, stderr: Capture,
                  instance: wasmtime.Instance | None, store: wasmtime.Store, profile: dict[str, Any]) -> Failure:
        first = str(e).split("Caused by:")[-1].strip().splitlines()[0] if str(e) else "trap"
        if e.trap_code == wasmtime.TrapCode.INTERRUPT:
            if stdout.overflow or stderr.overflow:
                return Failure("output", self._overflow_message(stdout, stderr))
            if fired:
                left = round(self._deadline_ms)
                waited = f" ({left} ms of it were left to run after the wait for a worker)" if left < profile["timeout_ms"] else ""
                return Failure("deadline", f"the run exceeded its deadline of {profile['timeout_ms']} ms{waited}")
        if e.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return Failure("deadline", f"the run used up its fuel ({profile['fuel']})")
        cap = profile["memory_mb"] << 20
        exports = instance.exports(store) if instance is not None else {}
        memory = exports.get(MEMORY_EXPORT) or exports.get("memory")  # ours, added to every compiled module
        if isinstance(memory, wasmtime.Memory) and memory.data_len(store) * 2 > cap:
            # Wasmtime answers a memory.grow past the cap with -1, not a trap; a module that then traps with
            # more than half its cap in use is reported as having hit the cap.
            return Failure("memory", f"memory cap of {profile['memory_mb']} MiB reached "
                                     f"({memory.data_len(store)} bytes in use), then {first}")
        return Failure("trap", first)


def main() -> int:
    data_mb = int(os.environ.get("WASMLOG_WORKER_DATA_MB", "0"))
    role = os.environ.get("WASMLOG_WORKER_ROLE", "run")
    probes = os.environ.get("WASMLOG_WORKER_PROBES") == "1"
    if role not in ROLES:
        print(f"unknown WASMLOG_WORKER_ROLE {role!r}", file=sys.stderr)
        return 2
    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the channel
    os.close(devnull)
    set_limits(data_mb)
    runtime = Runtime(role)
    threads = len(os.listdir("/proc/self/task"))  # the walls bind this thread and the threads it starts later
    seccomp_filter = Seccomp()  # built first: loading the bindings looks for libseccomp on the file system
    landlock, landlock_reason = apply_landlock(readable_trees())
    seccomp, reason = seccomp_filter.load()  # last: the allow-list has no room for Landlock's own syscalls
    if threads != 1:  # never claim a wall that a thread predating it is outside of
        seccomp, reason = False, f"{threads} threads were running when the filter went on; only one is covered"
        landlock, landlock_reason = False, f"{threads} threads were running when the ruleset went on; only one is covered"
    runtime.watchdog.start()

    def read_exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = channel_in.read(min(left, 1 << 20))
            if not chunk:
                if left == n and n == 4:
                    return b""
                raise EOFError("the agent closed the channel mid-frame")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def send(header: dict[str, Any], blobs: dict[str, bytes] | None = None) -> None:
        view = memoryview(encode(header, blobs))
        while view:
            view = view[channel_out.write(view) or 0:]

    send({"op": "hello", "pid": os.getpid(), "role": role, "wasmtime": wasmtime_version(), "seccomp": seccomp,
          "seccomp_reason": reason, "landlock": landlock, "landlock_reason": landlock_reason, "max_blob": MAX_BLOB,
          "threads_at_walls": threads, "probes": probes})
    while True:
        frame = read_frame(read_exactly)
        if frame is None:
            return 0
        req, blobs = frame
        try:
            op = req.get("op")
            if op == "run":
                send(*runtime.run(req, blobs.get("stdin", b""), blobs.get("artifact")))
            elif op == "compile":
                send(*runtime.compile(blobs["wasm"]))
            elif op == "probe" and probes:
                send({"status": "ok", "result": probe(req.get("read"), req.get("own_file"), req.get("new_file"))})
            else:
                send({"status": "error", "kind": "protocol", "message": f"unknown op {op!r}"})
        except Failure as f:
            send({"status": "error", "kind": f.kind, "message": str(f)})
        except Exception as e:  # noqa: BLE001 - a bug or a malformed request: answer it, keep serving
            send({"status": "error", "kind": "internal", "message": f"sandbox worker: {type(e).__name__}: {e}"})


if __name__ == "__main__":
    sys.exit(main())
