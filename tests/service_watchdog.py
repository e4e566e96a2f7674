"""Stop the test servers (tests/services.py) of a process that died without stopping them.

A server's directory (wasmlog-pg-*, wasmlog-weed-* in the temporary directory) holds an ``owner``
file naming the process that made it (pid and start time: a reused pid is not the owner) and the
pid files of what runs there (PostgreSQL's data/postmaster.pid, our weed.pid). cleanup() stops
those processes and removes the directory.

Run as a script, this is the watchdog: started by the owner with the read end of a pipe as its
stdin, it reads lines ``watch DIR`` and ``done DIR`` until the pipe closes, which happens when the
owner exits however it exits (SIGKILL included: the kernel closes the owner's write end), and then
cleans up every directory still watched. Standard library only: it starts fast and imports nothing
of the project.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import sys
import tempfile
import time

PREFIXES = ("wasmlog-pg-", "wasmlog-weed-")
OWNER = "owner"
WEED_PID = "weed.pid"
STOP_SECONDS = 15.0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[19]  # fields after the command name start at field 3


def owner_line(pid: int) -> str:
    """What the owner file of a directory made by process pid holds."""
    return f"{pid} {_start_time(pid)}\n"


def owner_alive(directory: str) -> bool | None:
    """Whether the process that made directory still runs; None if it names no owner (not ours to judge)."""
    try:
        with open(os.path.join(directory, OWNER)) as f:
            pid, started = f.read().split()
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return _start_time(int(pid)) == started


def _pid_in(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.readline())
    except (FileNotFoundError, ValueError):
        return None


def _runs(pid: int, program: str) -> bool:
    """Whether pid is alive and runs program (a pid file may outlive its process, and pids are reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return os.path.basename(argv0).decode(errors="replace").startswith(program)


def _stop(pid: int, program: str, sig: signal.Signals, *, group: bool = False) -> None:
    """Send sig to pid (or its process group) if it runs program; SIGKILL it if it is still there after STOP_SECONDS."""
    if not _runs(pid, program):
        return
    send = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        send(pid, sig)
    deadline = time.monotonic() + STOP_SECONDS
    while _runs(pid, program) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _runs(pid, program):
        with contextlib.suppress(ProcessLookupError):
            send(pid, signal.SIGKILL)


def cleanup(directory: str) -> None:
    """Stop the servers running in a test server's directory and remove it."""
    postmaster = _pid_in(os.path.join(directory, "data", "postmaster.pid"))
    if postmaster is not None:
        _stop(postmaster, "postgres", signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    weed = _pid_in(os.path.join(directory, WEED_PID))
    if weed is not None:
        _stop(weed, "weed", signal.SIGKILL, group=True)  # weed runs in a session of its own
    shutil.rmtree(directory, ignore_errors=True)


def sweep_stale(root: str | None = None) -> list[str]:
    """Clean up every test server directory under root whose owner is gone; return them."""
    root = root or tempfile.gettempdir()
    stale = [d for prefix in PREFIXES for d in glob.glob(os.path.join(root, prefix + "*")) if owner_alive(d) is False]
    for directory in stale:
        cleanup(directory)
    return stale


def watch(stdin: int = 0) -> None:
    """Read watch/done lines from stdin until it closes, then clean up what is still watched."""
    watched: set[str] = set()
    with os.fdopen(stdin, "rb", buffering=0) as pipe:
        for line in pipe:
            verb, _, directory = line.decode().rstrip("\n").partition(" ")
            if verb == "watch":
                watched.add(directory)
            elif verb == "done":
                watched.discard(directory)
    for directory in sorted(watched):
        cleanup(directory)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe's end ends the watch
    watch()
    sys.exit(0)
