"""A sandbox worker: `python -m edge.sandbox_worker`, one of the agent's long-lived processes that compile and
run WASI modules, one request at a time, speaking edge.sandbox_protocol frames on its stdin and stdout.

At start it lowers its resource limits, builds its Wasmtime engine and deadline watchdog, then (where libseccomp
can be loaded) installs a syscall filter that denies creating processes, sockets, tracing, file writes and the
like, and (where the kernel has Landlock) confines its file system access to reading the interpreter's files,
/proc and /sys, so that not even the agent's artifact key can be read; it says hello with what it managed.
It keeps the modules it has loaded (by digest) in a small LRU; a run of a
module it does not hold answers "need-module"; the agent sends the checked artifact along with a run, or has the
verified bytes compiled first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import wasmtime

from edge.sandbox import imports_granted
from edge.sandbox_protocol import (
    ENGINE_SETTINGS,
    MAX_BLOB,
    MODULE_LRU,
    encode,
    read_frame,
    wasmtime_version,
)

STDOUT_MAX = 16 << 20
STDERR_MAX = 1 << 20
NOFILE = 1024  # each loaded module may hold a memfd (its copy-on-write memory image); MODULE_LRU of them
TABLE_ELEMENTS = 1 << 20
WASI = "wasi_snapshot_preview1"


def set_limits(data_mb: int) -> None:
    """No core dumps, few descriptors, and a cap on writable private memory (RLIMIT_DATA counts mappings as they
    become writable, so Wasmtime's large PROT_NONE reservations for linear memory do not count against it)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    if data_mb > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (data_mb << 20, data_mb << 20))


# Denied once the engine is up: starting programs and processes, networking, tracing or reading other
# processes, changing the file system, and the kernel's administrative surface. Threads stay allowed (clone
# with CLONE_THREAD), and so do signals to the worker itself and opening files for reading.
DENIED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
    "pidfd_getfd", "pidfd_send_signal", "tkill", "socket", "socketpair", "connect", "bind", "listen", "accept",
    "accept4", "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "bpf", "perf_event_open",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "keyctl", "add_key",
    "request_key", "userfaultfd", "iopl", "ioperm", "reboot", "swapon", "swapoff", "acct", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "personality", "io_uring_setup",
    "open_by_handle_at", "name_to_handle_at", "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
    "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat", "rmdir", "truncate", "chmod", "fchmod",
    "fchmodat", "chown", "fchown", "lchown", "fchownat", "mknod", "mknodat",
)
CLONE_THREAD = 0x00010000


def _deny_rules(seccomp: Any) -> list[tuple[int, str, tuple[Any, ...]]]:
    """(action, syscall, argument conditions) for the filter; rules on one syscall are alternatives."""
    eperm, pid = seccomp.ERRNO(errno.EPERM), os.getpid()
    rules: list[tuple[int, str, tuple[Any, ...]]] = [(eperm, name, ()) for name in DENIED_SYSCALLS]
    # A process, not a thread: clone without CLONE_THREAD. clone3 and openat2 hide their flags in memory the
    # filter cannot read, so they answer ENOSYS and the C library falls back to clone and openat.
    rules.append((eperm, "clone", (seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0),)))
    rules += [(seccomp.ERRNO(errno.ENOSYS), "clone3", ()), (seccomp.ERRNO(errno.ENOSYS), "openat2", ())]
    # Signals only to itself.
    rules += [(eperm, "kill", (seccomp.Arg(0, seccomp.NE, pid),)), (eperm, "tgkill", (seccomp.Arg(0, seccomp.NE, pid),))]
    # Files open for reading only: no O_WRONLY, O_RDWR or O_CREAT.
    for syscall, flags in (("open", 1), ("openat", 2)):
        for mask, value in ((os.O_ACCMODE, os.O_WRONLY), (os.O_ACCMODE, os.O_RDWR), (os.O_CREAT, os.O_CREAT)):
            rules.append((eperm, syscall, (seccomp.Arg(flags, seccomp.MASKED_EQ, mask, value),)))
    return rules


def apply_seccomp() -> tuple[bool, str]:
    """Install the deny-list filter; (active, why not when it is not)."""
    try:
        import pyseccomp as seccomp  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError when libseccomp.so is missing
        return False, f"no seccomp bindings: {type(e).__name__}: {e}"
    try:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        rules = _deny_rules(seccomp)
        skipped = []
        for action, name, args in rules:
            try:
                f.add_rule(action, name, *args)
            except (OSError, ValueError, RuntimeError):
                skipped.append(name)  # a syscall this architecture does not have
        f.load()
    except Exception as e:  # noqa: BLE001 - the kernel or library refused: say so, do not pretend
        return False, f"seccomp filter not loaded: {type(e).__name__}: {e}"
    return True, (f"deny-list filter, {len(rules) - len(skipped)} rules: no processes, programs, sockets, tracing, "
                  "signals to others, file writes or administration" + (f" (not on this architecture: {', '.join(skipped)})" if skipped else ""))


# Landlock (Linux 5.13+): once the worker is up, the file system is out of reach except for reading the
# interpreter's own files (late imports), /proc (the run's stdin is a memfd opened through /proc/self/fd) and
# /sys; nothing can be written, and in particular the agent's data directory (its artifact key) cannot be read.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_READ_FILE, _READ_DIR = 1 << 2, 1 << 3
_ACCESS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}


def apply_landlock(readable: Iterable[str]) -> tuple[bool, str]:
    """Restrict the worker's file system access to reading the readable trees; (active, why not when not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False, f"Landlock unavailable: {os.strerror(ctypes.get_errno())}"
    handled = _ACCESS_BY_ABI.get(abi, _ACCESS_BY_ABI[5])
    attr = struct.pack("=Q", handled)  # handled_access_fs; network and scopes left alone (seccomp covers them)
    ruleset = libc.syscall(_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return False, f"Landlock ruleset refused: {os.strerror(ctypes.get_errno())}"
    try:
        allowed = []
        for tree in sorted(set(readable)):
            try:
                fd = os.open(tree, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = struct.pack("=Qi", _READ_FILE | _READ_DIR, fd)  # struct landlock_path_beneath_attr (packed)
                if libc.syscall(_LANDLOCK_ADD_RULE, ruleset, ctypes.c_int(1), ctypes.c_char_p(rule), ctypes.c_uint32(0)) == 0:
                    allowed.append(tree)
            finally:
                os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required to restrict an unprivileged process
            return False, f"no_new_privs refused: {os.strerror(ctypes.get_errno())}"
        if libc.syscall(_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            return False, f"Landlock restriction refused: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return True, f"Landlock ABI {abi}: read-only access to {', '.join(allowed)}; nothing else"


def readable_trees() -> list[str]:
    return [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "/proc", "/sys", os.devnull]


def self_test(forbidden_read: str | None = None) -> dict[str, str]:
    """What the worker gets when it tries what its walls deny: 'allowed' or the errno name."""
    def attempt(action: Callable[[], object]) -> str:
        try:
            action()
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))
        return "allowed"

    def fork() -> None:
        if os.fork() == 0:
            os._exit(0)
        os.wait()

    return {
        "fork": attempt(fork),
        "execve": attempt(lambda: os.execv("/nonexistent/wasmlog-selftest", ["x"])),  # ENOENT if not denied
        "socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "open_for_write": attempt(lambda: os.close(os.open(os.devnull, os.O_WRONLY))),
        "signal_parent": attempt(lambda: os.kill(os.getppid(), 0)),
        **({"read_outside": attempt(lambda: os.close(os.open(forbidden_read, os.O_RDONLY)))} if forbidden_read else {}),
    }


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
    def __init__(self) -> None:
        config = wasmtime.Config()
        for name, value in ENGINE_SETTINGS.items():
            setattr(config, name, value)
        self.engine = wasmtime.Engine(config)
        self.watchdog = Watchdog(self.engine)  # started by main() once the walls are up: a thread started
        # before seccomp and Landlock would stay outside both (they bind the calling thread and its children)
        self.modules: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._wasi = wasmtime.Linker(self.engine)  # every WASI function; runs copy only the granted ones
        self._wasi.define_wasi()
        self._probe_wasi()
        self._use_memfd = os.path.isdir("/proc/self/fd") and hasattr(os, "memfd_create")

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
        self.remember(digest, module)

    def compile(self, digest: str, wasm: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise Failure("module-invalid", f"module does not compile: {str(e).splitlines()[0]}") from None
        self.remember(digest, module)
        return {"status": "ok"}, {"artifact": bytes(module.serialize())}

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
        self.watchdog.arm(profile["timeout_ms"] / 1000)  # before instantiation: a start function may loop
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
                return Failure("deadline", f"the run exceeded its deadline of {profile['timeout_ms']} ms")
        if e.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            return Failure("deadline", f"the run used up its fuel ({profile['fuel']})")
        cap = profile["memory_mb"] << 20
        memory = instance.exports(store).get("memory") if instance is not None else None
        if isinstance(memory, wasmtime.Memory) and memory.data_len(store) * 2 > cap:
            # Wasmtime answers a memory.grow past the cap with -1, not a trap; a module that then traps with
            # more than half its cap in use is reported as having hit the cap.
            return Failure("memory", f"memory cap of {profile['memory_mb']} MiB reached "
                                     f"({memory.data_len(store)} bytes in use), then {first}")
        return Failure("trap", first)


def main() -> int:
    data_mb = int(os.environ.get("WASMLOG_WORKER_DATA_MB", "0"))
    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the channel
    os.close(devnull)
    set_limits(data_mb)
    runtime = Runtime()
    threads = len(os.listdir("/proc/self/task"))  # the walls bind this thread and the threads it starts later
    seccomp, reason = apply_seccomp()  # first: loading the bindings looks for libseccomp on the file system
    landlock, landlock_reason = apply_landlock(readable_trees())
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

    send({"op": "hello", "pid": os.getpid(), "wasmtime": wasmtime_version(), "seccomp": seccomp,
          "seccomp_reason": reason, "landlock": landlock, "landlock_reason": landlock_reason, "max_blob": MAX_BLOB,
          "threads_at_walls": threads})
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
                send(*runtime.compile(req["digest"], blobs["wasm"]))
            elif op == "selftest":
                send({"status": "ok", "result": self_test(req.get("read"))})
            else:
                send({"status": "error", "kind": "protocol", "message": f"unknown op {op!r}"})
        except Failure as f:
            send({"status": "error", "kind": f.kind, "message": str(f)})
        except Exception as e:  # noqa: BLE001 - a bug or a malformed request: answer it, keep serving
            send({"status": "error", "kind": "internal", "message": f"sandbox worker: {type(e).__name__}: {e}"})


if __name__ == "__main__":
    sys.exit(main())
