"""The walls a sandbox worker puts up around itself once its engine is built: lowered resource limits, a seccomp
syscall allow-list and a Landlock file-system ruleset; and the probe that tries, from inside, what they deny.

The allow-list's default action is EPERM, not a kill: a syscall the list does not name fails and has no effect,
exactly as a kill would prevent it, but a harmless call that some future libc, Python or Wasmtime makes on an
unusual path (a new way to name a thread, to size a stack) becomes an error that code handles, not a dead worker
that fails every request it holds. Syscalls of another architecture's ABI (i386 `int 0x80` on x86_64) kill the
process (libseccomp's bad-architecture action): there is nothing legitimate to fail softly there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import resource
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

NOFILE = 1024  # each loaded module may hold a memfd (its copy-on-write memory image); MODULE_LRU of them


def set_limits(data_mb: int) -> None:
    """No core dumps, few descriptors, and a cap on writable private memory (RLIMIT_DATA counts mappings as they
    become writable, so Wasmtime's large PROT_NONE reservations for linear memory do not count against it)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    if data_mb > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (data_mb << 20, data_mb << 20))


# What a walled worker (Python running Wasmtime on a WASI module, and the threads Wasmtime's WASI starts) calls,
# read off strace of real runs (stdin, output, deadlines, traps, memory caps, compiles, late imports), with the
# x86_64 and aarch64 names of each (a name the running architecture lacks is skipped). Allowed whatever the arguments:
ALLOWED = (
    # pipes to the agent, the run's stdin memfd, read-only files (late imports), their metadata
    "read", "readv", "pread64", "preadv", "write", "writev", "close", "lseek", "fstat", "stat", "lstat", "newfstatat",
    "statx", "fstatfs", "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2", "getcwd",
    "dup", "dup2", "dup3", "memfd_create", "ftruncate", "pipe2", "eventfd2",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
    # memory: Wasmtime maps, protects, resets and releases linear memories and code; aarch64 syncs the icache
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk", "membarrier",
    # threads and their synchronisation (a thread, never a process: see clone below)
    "futex", "set_robust_list", "rseq", "set_tid_address", "exit", "exit_group", "gettid", "getpid", "getppid",
    "sched_yield", "sched_getaffinity", "getrandom", "restart_syscall",
    # signals: Wasmtime turns faults in compiled code into traps with handlers on an alternate stack
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
    # time
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    # who am I (read only)
    "getuid", "geteuid", "getgid", "getegid", "uname", "getrusage", "getrlimit",
)
PR_SET_NAME, PR_GET_NAME = 15, 16
TCGETS, FIONBIO, FIONCLEX, FIOCLEX = 0x5401, 0x5421, 0x5450, 0x5451
# fcntl: duplicate, descriptor and status flags, memfd seals (Wasmtime seals its memory images); not
# F_SETOWN/F_SETSIG (which would aim SIGIO at another process) nor locks or leases.
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC, F_ADD_SEALS, F_GET_SEALS = 0, 1, 2, 3, 4, 1030, 1033, 1034
F_SETOWN = 8
CLONE_THREAD = 0x00010000
OPEN_WRITE_FLAGS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC  # O_TRUNC truncates even a file opened O_RDONLY
# What clone3 and openat2 ask for sits in memory the filter cannot read: they answer ENOSYS, and the C library
# falls back to clone and openat, whose flags it can.
ENOSYS_SYSCALLS = ("clone3", "openat2")


def _conditional_rules(seccomp: Any, pid: int) -> list[tuple[str, tuple[Any, ...]]]:
    """(syscall, argument conditions, all of which must hold) allowed besides ALLOWED; rules on one syscall are
    alternatives."""
    arg = seccomp.Arg
    rules: list[tuple[str, tuple[Any, ...]]] = [
        ("clone", (arg(0, seccomp.MASKED_EQ, CLONE_THREAD, CLONE_THREAD),)),  # a thread, not a process
        ("kill", (arg(0, seccomp.EQ, pid),)),  # signals to itself only
        ("tgkill", (arg(0, seccomp.EQ, pid),)),
        ("prlimit64", (arg(0, seccomp.EQ, 0), arg(2, seccomp.EQ, 0))),  # its own limits, read only
        ("openat", (arg(2, seccomp.MASKED_EQ, OPEN_WRITE_FLAGS, 0),)),  # for reading, creating nothing
        ("open", (arg(1, seccomp.MASKED_EQ, OPEN_WRITE_FLAGS, 0),)),
    ]
    rules += [("ioctl", (arg(1, seccomp.EQ, request),)) for request in (TCGETS, FIONBIO, FIONCLEX, FIOCLEX)]
    rules += [("prctl", (arg(0, seccomp.EQ, option),)) for option in (PR_SET_NAME, PR_GET_NAME)]  # naming threads
    rules += [("fcntl", (arg(1, seccomp.EQ, command),)) for command in (F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC,
                                                                      F_ADD_SEALS, F_GET_SEALS)]
    return rules


class Seccomp:
    """The allow-list filter, built before the other walls (the bindings look for libseccomp on the file system,
    which Landlock then hides) and loaded after them."""

    def __init__(self) -> None:
        self.filter: Any = None
        self.reason = ""
        try:
            import pyseccomp as seccomp  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except Exception as e:  # noqa: BLE001 - ImportError, or RuntimeError when libseccomp.so is missing
            self.reason = f"no seccomp bindings: {type(e).__name__}: {e}"
            return
        try:
            f = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
            skipped, rules = [], 0
            for name, args in [*((n, ()) for n in ALLOWED), *_conditional_rules(seccomp, os.getpid())]:
                try:
                    f.add_rule(seccomp.ALLOW, name, *args)
                    rules += 1
                except (OSError, ValueError, RuntimeError):
                    skipped.append(name)  # a syscall this architecture does not have
            for name in ENOSYS_SYSCALLS:
                f.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
        except Exception as e:  # noqa: BLE001 - the library refused the filter: say so, do not pretend
            self.reason = f"seccomp filter not built: {type(e).__name__}: {e}"
            return
        self.filter = f
        self.reason = (f"allow-list filter ({platform.machine()}), {rules} rules, anything else fails with EPERM: "
                       "no processes, programs, sockets, tracing, signals or limits of others, file writes, "
                       "attribute changes or administration" + (f" (not on this architecture: {', '.join(sorted(set(skipped)))})" if skipped else ""))

    def load(self) -> tuple[bool, str]:
        """Install the filter on this thread and the threads it starts later; (active, what it is or why not)."""
        if self.filter is None:
            return False, self.reason
        try:
            self.filter.load()
        except Exception as e:  # noqa: BLE001 - the kernel refused: say so, do not pretend
            return False, f"seccomp filter not loaded: {type(e).__name__}: {e}"
        return True, self.reason


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


# Syscall numbers the probe calls directly (no Python wrapper reaches them with these arguments).
_NUMBERS = {"x86_64": {"rt_sigqueueinfo": 129, "tgkill": 234, "fchmodat2": 452},
            "aarch64": {"rt_sigqueueinfo": 138, "tgkill": 131, "fchmodat2": 452}}


def probe(forbidden_read: str | None = None, own_file: str | None = None, new_file: str | None = None) -> dict[str, str]:
    """What the worker gets when it tries what its walls deny: 'allowed' or the errno name, for each attempt.
    own_file is a file of the worker's user it tries to change (mode, times, extended attributes); new_file one
    it tries to create; forbidden_read one it tries to read."""
    libc = ctypes.CDLL(None, use_errno=True)
    numbers = _NUMBERS.get(platform.machine(), {})
    parent = os.getppid()

    def attempt(action: Callable[[], object]) -> str:
        try:
            action()
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e.errno))
        return "allowed"

    def raw(name: str, *args: object) -> Callable[[], None]:
        def call() -> None:
            if name not in numbers:
                raise OSError(errno.ENOSYS, f"no number for {name} on {platform.machine()}")
            if libc.syscall(numbers[name], *args) < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return call

    def fork() -> None:
        if os.fork() == 0:
            os._exit(0)
        os.wait()

    def aim_sigio_at_parent() -> None:
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(read_end, F_SETOWN, parent)
        finally:
            os.close(read_end)
            os.close(write_end)

    siginfo = ctypes.create_string_buffer(128)  # a zeroed siginfo_t
    result = {
        "fork": attempt(fork),
        "execve": attempt(lambda: os.execv("/nonexistent/wasmlog-probe", ["x"])),  # ENOENT if not denied
        "socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "socket_unix": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
        "open_for_write": attempt(lambda: os.close(os.open(os.devnull, os.O_WRONLY))),
        "signal_parent": attempt(lambda: os.kill(parent, 0)),
        "signal_group": attempt(lambda: os.kill(0, 0)),
        "tgkill_parent": attempt(raw("tgkill", parent, parent, 0)),
        "sigqueue_parent": attempt(raw("rt_sigqueueinfo", parent, signal.SIGCONT, siginfo)),
        "prlimit_parent": attempt(lambda: resource.prlimit(parent, resource.RLIMIT_NOFILE)),
        "prlimit_set_self": attempt(lambda: resource.prlimit(0, resource.RLIMIT_CORE, (0, 0))),
        "sigio_to_parent": attempt(aim_sigio_at_parent),
        "signal_self": attempt(lambda: os.kill(os.getpid(), 0)),  # allowed: the worker's own
    }
    if own_file:
        result |= {
            "chmod": attempt(lambda: os.chmod(own_file, 0o777)),
            "fchmodat2": attempt(raw("fchmodat2", -100, own_file.encode(), 0o777, 0)),  # AT_FDCWD
            "utime": attempt(lambda: os.utime(own_file, (0, 0))),
            "setxattr": attempt(lambda: os.setxattr(own_file, "user.wasmlog-probe", b"1")),
        }
    if new_file:
        result["create"] = attempt(lambda: os.close(os.open(new_file, os.O_WRONLY | os.O_CREAT, 0o600)))
    if forbidden_read:
        result["read_outside"] = attempt(lambda: os.close(os.open(forbidden_read, os.O_RDONLY)))
    return result
