"""The sandbox workers' walls, tried from inside real walled workers: the seccomp allow-list, Landlock, and the
split between run workers (which never compile) and compile workers (which never run)."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import pathlib
import stat
from typing import Any

import pytest
import wasmtime
from helpers import wait_until
from test_sandbox import ALL_WASI, STDOUT_ONLY, module

from edge.sandbox import Sandbox, SandboxError
from edge.sandbox_pool import Worker

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What each probe attempt must get from a worker whose allow-list is loaded: EPERM, the filter's default action.
DENIED = ["fork", "execve", "socket", "socket_unix", "open_for_write", "signal_parent", "signal_group", "tgkill_parent",
          "sigqueue_parent", "prlimit_parent", "prlimit_set_self", "sigio_to_parent"]
DENIED_ON_FILES = ["chmod", "fchmodat2", "utime", "setxattr", "create"]


def seccomp_available() -> bool:
    try:
        import pyseccomp  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except Exception:
        return False
    return True


def landlock_available() -> bool:
    return int(ctypes.CDLL(None, use_errno=True).syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))) >= 1


async def started_status(tmp_path: pathlib.Path) -> dict[str, Any]:
    """The status of a one-worker sandbox once its worker has started (and said which walls it has)."""
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        await sb.start()
        return sb.status()
    finally:
        await sb.close()


def test_seccomp_is_an_active_allow_list_where_the_bindings_load(tmp_path: pathlib.Path) -> None:
    """On a machine with pyseccomp and libseccomp (this project's test extra installs the bindings) the filter
    must actually be on, and /status says it is an allow-list; elsewhere the status says why not."""
    status = asyncio.run(started_status(tmp_path))
    assert status["threads_at_walls"] == 1  # no thread of the worker predates the walls (they bind threads)
    if not seccomp_available():
        assert status["seccomp"] is False and status["seccomp_policy"] is None and status["seccomp_reason"]
        pytest.skip(f"seccomp unavailable here: {status['seccomp_reason']}")
    assert status["seccomp"] is True, status["seccomp_reason"]
    assert status["seccomp_policy"] == "allow-list, anything else EPERM"
    assert status["seccomp_reason"].startswith("allow-list filter")


def test_landlock_is_active_where_the_kernel_has_it(tmp_path: pathlib.Path) -> None:
    """Landlock needs no library: on a kernel that reports an ABI version the workers must be restricted."""
    if not landlock_available():
        pytest.skip("this kernel has no Landlock")
    status = asyncio.run(started_status(tmp_path))
    assert status["landlock"] is True, status["landlock_reason"]


@pytest.mark.parametrize("role", ["run", "compile"])
async def test_every_forbidden_call_fails_inside_a_walled_worker(tmp_path: pathlib.Path, role: str) -> None:
    """From inside a real worker of each role: signals, limits and tracing of others, processes, programs,
    sockets, writes, and changes to a file's mode, times or attributes all fail with EPERM, and change nothing."""
    if not seccomp_available():
        pytest.skip("seccomp is unavailable on this machine")
    own = tmp_path / "own-file"  # a file of the worker's own user: only the filter stands between it and a change
    own.write_bytes(b"x")
    own.chmod(0o600)
    os.utime(own, (1_000_000, 1_000_000))
    before = own.stat()
    created = tmp_path / "created-by-worker"
    key = tmp_path / "artifact.key"  # the agent's secret
    sb = Sandbox(tmp_path / "cache", key, workers=1, probes=True)
    try:
        await sb.start()
        attempts = await sb.probe(role, own_file=own, new_file=created, forbidden_read=key)
        assert {k: attempts[k] for k in DENIED + DENIED_ON_FILES} == dict.fromkeys(DENIED + DENIED_ON_FILES, "EPERM")
        assert attempts["signal_self"] == "allowed"  # the filter is an allow-list with room for what a worker needs
        assert attempts["read_outside"] == ("EACCES" if landlock_available() else "allowed")
        after = own.stat()
        assert (stat.S_IMODE(after.st_mode), after.st_mtime) == (0o600, before.st_mtime)
        assert os.listxattr(own) == []
        assert not created.exists()
        # Behind those walls a module still gets its stdin (a memfd opened through /proc) and writes its output.
        digest, path = module(tmp_path, "echo")
        assert (await sb.run(digest, path, ALL_WASI, stdin=b"through the walls", env={})).stdout == b"through the walls"
        walls = sb.status()["compile_worker_walls"]
        assert walls == {"seccomp": True, "landlock": landlock_available(), "threads_at_walls": 1}
    finally:
        await sb.close()


async def test_probes_are_refused_unless_enabled(tmp_path: pathlib.Path) -> None:
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        with pytest.raises(SandboxError, match="probes=False"):
            await sb.probe()
    finally:
        await sb.close()
    worker = await Worker.start(worker_env("run"))  # a worker started without WASMLOG_WORKER_PROBES=1
    try:
        reply, _ = await worker.call({"op": "probe"}, {}, 30)
        assert (reply["status"], reply["kind"]) == ("error", "protocol") and "result" not in reply
    finally:
        await worker.close()


def worker_env(role: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "WASMLOG_WORKER_ROLE": role, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


async def test_the_stored_artifact_comes_from_a_compile_worker_that_never_ran_a_module(tmp_path: pathlib.Path) -> None:
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=2, compiles_per_process=1)
    try:
        hello, hello_path = module(tmp_path, "hello")
        echo, echo_path = module(tmp_path, "echo")
        for _ in range(3):
            assert (await sb.run(hello, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        status = sb.status()
        last = status["last_compile"]
        assert last["role"] == "compile" and last["runs"] == 0 and last["compiles"] == 1
        assert last["pid"] not in status["pids"]  # not one of the run workers
        assert status["compiled"] == 1 and status["artifacts_loaded"] >= 1 and status["runs"] == 3
        first_compiler = last["pid"]
        await wait_until(lambda: not pid_alive(first_compiler), "the compile worker to exit after its one compile")
        await sb.run(echo, echo_path, ALL_WASI, stdin=b"", env={})
        assert sb.status()["last_compile"]["pid"] != first_compiler and sb.status()["compile_workers_started"] == 2
        assert sorted(p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.cwasm")) == sorted([hello, echo])
    finally:
        await sb.close()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_worker_that_ran_a_module_cannot_compile_and_a_compile_worker_cannot_run(tmp_path: pathlib.Path) -> None:
    """The roles, at the protocol: a run worker refuses to compile (so nothing it hands back is an artifact), a
    compile worker refuses to run."""
    wasm = bytes(wasmtime.wat2wasm((pathlib.Path(__file__).parent / "wasm" / "agent_hello.wat").read_text()))
    digest = hashlib.sha256(wasm).hexdigest()
    compiler, runner = await Worker.start(worker_env("compile")), await Worker.start(worker_env("run"))
    try:
        assert (compiler.hello["role"], runner.hello["role"]) == ("compile", "run")
        reply, out = await compiler.call({"op": "compile", "digest": digest}, {"wasm": wasm}, 60)
        assert reply["status"] == "ok" and reply["stats"] == {"role": "compile", "runs": 0, "compiles": 1, "loads": 0}
        artifact = out["artifact"]
        run = {"op": "run", "digest": digest, "argv": ["hello"], "env": [],
               "profile": {"imports": ["wasi_snapshot_preview1.fd_write"], "memory_mb": 1, "timeout_ms": 1000, "fuel": None}}
        reply, _ = await compiler.call(run, {"stdin": b"", "artifact": artifact}, 30)
        assert (reply["status"], reply["kind"]) == ("error", "refused")
        reply, out = await runner.call(run, {"stdin": b"", "artifact": artifact}, 30)
        assert reply["status"] == "ok" and out["stdout"] == b"hello\n"
        reply, out = await runner.call({"op": "compile", "digest": digest}, {"wasm": wasm}, 60)
        assert (reply["status"], reply["kind"]) == ("error", "refused") and "artifact" not in out
    finally:
        await asyncio.gather(compiler.close(), runner.close())



# The legacy x86_64 syscalls aarch64 does not have, each with the successor both have (and the list allows).
AARCH64_SUCCESSOR = {"open": "openat", "stat": "newfstatat", "lstat": "newfstatat", "readlink": "readlinkat",
                     "access": "faccessat", "dup2": "dup3", "epoll_wait": "epoll_pwait", "poll": "ppoll",
                     "select": "pselect6", "time": "clock_gettime"}


def test_the_allow_list_names_real_syscalls_on_x86_64_and_aarch64() -> None:
    """Every name the filter allows is a syscall of x86_64; on aarch64 too, or it is a legacy call whose
    successor aarch64 has and the list allows (so the filter means the same on both)."""
    if not seccomp_available():
        pytest.skip("seccomp is unavailable on this machine (no libseccomp to resolve names with)")
    import pyseccomp  # type: ignore[import-untyped,import-not-found,unused-ignore]

    from edge.sandbox_walls import ALLOWED, ENOSYS_SYSCALLS, _conditional_rules

    names = {*ALLOWED, *ENOSYS_SYSCALLS, *(name for name, _ in _conditional_rules(pyseccomp, os.getpid()))}
    x86 = {n for n in names if pyseccomp.resolve_syscall(pyseccomp.Arch.X86_64, n) >= 0}
    arm = {n for n in names if pyseccomp.resolve_syscall(pyseccomp.Arch.AARCH64, n) >= 0}
    assert x86 == names
    assert names - arm == set(AARCH64_SUCCESSOR) & names
    assert all(AARCH64_SUCCESSOR[n] in arm for n in names - arm)
