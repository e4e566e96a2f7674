"""edge.sandbox: admitted WASI modules run in real worker processes under real Wasmtime, confined to their profile."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import time
from typing import Any

import pytest
import wasmtime
from helpers import wait_until

from edge.artifacts import ArtifactCache, load_or_create_key
from edge.sandbox import (
    GRACE,
    DeadlineExceeded,
    IntegrityError,
    MemoryExceeded,
    NoLongerAllowed,
    NotGranted,
    Profile,
    Sandbox,
    SandboxBusy,
    SandboxError,
    Trapped,
    WorkerCrashed,
)
from edge.sandbox_pool import Idle

WAT = pathlib.Path(__file__).parent / "wasm"
STDOUT_ONLY = Profile(imports=("wasi_snapshot_preview1.fd_write",), memory_mb=16, timeout_ms=2000)
ALL_WASI = Profile(imports=("wasi_snapshot_preview1.*",), memory_mb=16, timeout_ms=2000)


def module(tmp_path: pathlib.Path, name: str, wat: str | None = None) -> tuple[str, pathlib.Path]:
    """Compile tests/wasm/agent_<name>.wat (or the given text) and store it content-addressed, as the agent does."""
    wasm = wasmtime.wat2wasm(wat if wat is not None else (WAT / f"agent_{name}.wat").read_text())
    digest = hashlib.sha256(wasm).hexdigest()
    path = tmp_path / "modules" / f"{digest}.wasm"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(wasm)
    return digest, path


@pytest.fixture
async def sandbox(tmp_path: pathlib.Path):
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=2)
    yield sb
    await sb.close()


async def until_handed_out(sandbox: Sandbox, run: asyncio.Future[Any]) -> None:
    """Wait, with a deadline, until a run has been handed to a worker; a run that ends first fails the test."""

    def handed_out() -> bool:
        assert not run.done(), "the run ended before a worker took it"
        return bool(sandbox.status()["busy"])

    await wait_until(handed_out, "the run to be handed to a worker", 30)


async def test_hello_world(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "hello")
    result = await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"", 0)
    again = await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    assert again.stdout == b"hello\n"
    # Compiled once, by a compile worker; each run worker (one run each: a module holds one worker of two at a
    # time, and the idle workers are handed out in turn) loaded the attested artifact.
    assert (sandbox.status()["compiled"], sandbox.status()["artifacts_loaded"]) == (1, 2)


async def test_stdin_env_and_argv_reach_the_module_and_nothing_else(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "echo")
    body = bytes(range(256)) * 1024 + b"tail"  # several reads of the module's 64 KiB buffer
    env = {"REQUEST_METHOD": "POST", "QUERY_STRING": "a=1&b=2", "HTTP_X_TOKEN": "t", "GREETING": "from request"}
    profile = Profile(imports=ALL_WASI.imports, memory_mb=16, timeout_ms=2000, env={"GREETING": "hi"})
    result = await sandbox.run(digest, path, profile, stdin=body, env=env, argv0="echo")
    assert result.stdout[:len(body)] == body
    lines = result.stdout[len(body):].decode().splitlines()
    # Exactly the request's variables overlaid by the profile's: no PATH, HOME or anything else of the host.
    assert sorted(lines) == sorted(["REQUEST_METHOD=POST", "QUERY_STRING=a=1&b=2", "HTTP_X_TOKEN=t", "GREETING=hi"])
    assert result.stderr == b"echo\n"
    assert result.exit_code == 0


async def test_argv_defaults_to_the_module_file_name(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "echo")
    result = await sandbox.run(digest, path, ALL_WASI, stdin=b"", env={})
    assert result.stderr == f"{digest}\n".encode()
    assert result.stdout == b""  # empty stdin, empty environment


async def test_ungranted_import_refused_before_instantiation(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "socket")
    with pytest.raises(NotGranted, match=r"wasi_snapshot_preview1\.sock_accept"):
        await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    status = sandbox.status()
    assert status["failed_not-granted"] == 1 and "runs" not in status
    # The same module under a profile that grants it runs: the refusal was the profile's.
    assert (await sandbox.run(digest, path, ALL_WASI, stdin=b"", env={})).exit_code == 0


async def test_granted_import_the_node_does_not_provide_is_refused(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    wat = '(module (import "env" "host_secret" (func)) (memory (export "memory") 1) (func (export "_start")))'
    digest, path = module(tmp_path, "", wat)
    with pytest.raises(NotGranted, match="host_secret"):
        await sandbox.run(digest, path, Profile(imports=("*.*",), memory_mb=1, timeout_ms=1000), stdin=b"", env={})


async def test_runaway_loop_stopped_at_its_deadline_while_another_run_completes(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    loop_digest, loop_path = module(tmp_path, "loop")
    hello_digest, hello_path = module(tmp_path, "hello")
    timeout_ms = 1500
    started = time.monotonic()
    runaway = asyncio.ensure_future(sandbox.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=timeout_ms), stdin=b"", env={}))
    hello = asyncio.ensure_future(sandbox.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={}))
    done, _ = await asyncio.wait({runaway, hello}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {hello} and hello.result().stdout == b"hello\n"
    with pytest.raises(DeadlineExceeded, match=f"deadline of {timeout_ms} ms"):
        await runaway
    elapsed = time.monotonic() - started
    assert timeout_ms / 1000 <= elapsed < timeout_ms / 1000 + GRACE  # stopped by its epoch deadline, not killed
    assert "worker_restarts" not in sandbox.status()
    # The worker that ran the loop is still good.
    results = await asyncio.gather(*(sandbox.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={}) for _ in range(4)))
    assert all(r.stdout == b"hello\n" for r in results)


async def test_a_module_stopped_while_its_request_waits_never_runs(tmp_path: pathlib.Path) -> None:
    """still_allowed is asked when a worker frees up: a module quarantined meanwhile is not run (issue 14:
    a yanked release stops serving at once, also for requests already queued)."""
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        busy = asyncio.ensure_future(sb.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=1000), stdin=b"", env={}))
        await until_handed_out(sb, busy)  # the loop holds the only worker
        allowed = {"hello": True}
        asked: list[bool] = []

        def still_allowed() -> bool:
            asked.append(allowed["hello"])
            return allowed["hello"]

        waiting = asyncio.ensure_future(sb.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={}, still_allowed=still_allowed))
        allowed["hello"] = False  # a sweep quarantines it while it waits (the only worker is busy until the loop's deadline)
        with pytest.raises(NoLongerAllowed):
            await waiting
        assert asked == [False]  # asked once, when the worker came free, after the stop
        with pytest.raises(DeadlineExceeded):
            await busy
        allowed["hello"] = True  # and a module still admitted runs as before
        assert (await sb.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={}, still_allowed=still_allowed)).stdout == b"hello\n"
    finally:
        await sb.close()


async def test_requests_beyond_the_waiting_bound_are_refused_at_once(tmp_path: pathlib.Path) -> None:
    """All workers busy and max_waiting requests queued: the next one is SandboxBusy (503), not one more in an
    unbounded queue (each waiting request holds its stdin)."""
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1, max_waiting=2)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        busy = asyncio.ensure_future(sb.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=1500), stdin=b"", env={}))
        await until_handed_out(sb, busy)  # the loop holds the only worker
        queued = [asyncio.ensure_future(sb.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})) for _ in range(2)]
        await wait_until(lambda: sb.status()["waiting"] == 2, "two requests to wait for the worker")
        with pytest.raises(SandboxBusy):
            await sb.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})
        with pytest.raises(DeadlineExceeded):
            await busy
        assert [(await q).stdout for q in queued] == [b"hello\n", b"hello\n"]  # the waiting ones were served
    finally:
        await sb.close()


async def test_one_module_never_holds_every_worker_and_its_excess_is_refused(tmp_path: pathlib.Path) -> None:
    """A runaway module flooded with more requests than workers: it runs on at most module_workers of them, its
    requests past max_in_flight are SandboxBusy at once, and another module keeps running meanwhile."""
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=2)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        spin = Profile(imports=(), memory_mb=1, timeout_ms=1000, max_in_flight=3)
        first = asyncio.ensure_future(sb.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=3000, max_in_flight=3), stdin=b"", env={}))
        await until_handed_out(sb, first)
        flood = [first] + [asyncio.ensure_future(sb.run(loop_digest, loop_path, spin, stdin=b"", env={})) for _ in range(2)]
        await wait_until(lambda: sb.status()["busy"] == 1 and sb.status()["waiting"] == 2, "one loop running, two waiting")
        with pytest.raises(SandboxBusy, match="max_in_flight"):
            await sb.run(loop_digest, loop_path, spin, stdin=b"", env={})
        for _ in range(3):  # served on the worker the loop may not take, while the loop runs
            assert (await sb.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
            assert sb.status()["busy"] == 1 and not flood[0].done()
        results = await asyncio.gather(*flood, return_exceptions=True)
        # The first ran to its 3 s deadline; the other two waited for the one worker the loop may hold, past their 1 s.
        kinds = sorted(type(r).__name__ for r in results)
        assert kinds == ["DeadlineExceeded", "NoWorkerInTime", "NoWorkerInTime"], results
        assert all(isinstance(r, SandboxBusy) for r in results if type(r).__name__ == "NoWorkerInTime")
        status = sb.status()
        assert status["no_worker_in_time"] == 2 and status["refused_max_in_flight"] == 1 and status["in_flight"] == 0
    finally:
        await sb.close()


async def test_a_requests_deadline_covers_its_wait_for_a_worker(tmp_path: pathlib.Path) -> None:
    """timeout_ms is per request: a run that waited for a worker has only the rest of it to run."""
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        other = module(tmp_path, "", '(module (func (export "_start") (loop $l (br $l))) (func (export "other")))')
        await sb.prewarm([(loop_digest, loop_path), other])  # both compiled: the clock below is the wait and the run
        blocker = asyncio.ensure_future(sb.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=1000), stdin=b"", env={}))
        await until_handed_out(sb, blocker)
        with pytest.raises(DeadlineExceeded, match=r"deadline of 1600 ms \((\d+) ms of it were left") as caught:
            await sb.run(other[0], other[1], Profile(imports=(), memory_mb=1, timeout_ms=1600), stdin=b"", env={})
        left = int(re.search(r"\((\d+) ms of it", str(caught.value))[1])  # type: ignore[index]
        assert left < 1000  # it waited most of the blocker's 1 s for the only worker: that came off its own deadline
        with pytest.raises(DeadlineExceeded):
            await blocker
    finally:
        await sb.close()


async def test_prewarm_compiles_ahead_of_the_first_request(tmp_path: pathlib.Path) -> None:
    sb = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        hello, hello_path = module(tmp_path, "hello")
        broken, broken_path = module(tmp_path, "trap")
        broken_path.write_bytes(b"tampered")
        failures = await sb.prewarm([(hello, hello_path), (broken, broken_path)])
        assert list(failures) == [broken] and "IntegrityError" in failures[broken]
        assert sb.status()["compiled"] == 1 and len(list((tmp_path / "cache").glob(f"{hello}.*.cwasm"))) == 1
        assert (await sb.run(hello, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        status = sb.status()
        assert status["compiled"] == 1 and status["artifacts_loaded"] == 1  # the first request compiled nothing
        assert (await sb.prewarm([(hello, hello_path)])) == {} and sb.status()["compiled"] == 1  # cached: nothing to do
    finally:
        await sb.close()


async def test_fuel_bounds_a_run(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "loop")
    with pytest.raises(DeadlineExceeded, match="fuel"):
        await sandbox.run(digest, path, Profile(imports=(), memory_mb=1, timeout_ms=60_000, fuel=1_000_000), stdin=b"", env={})


async def test_memory_bomb_stopped_at_its_cap(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "membomb")
    with pytest.raises(MemoryExceeded, match="memory cap of 16 MiB"):
        await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    with pytest.raises(MemoryExceeded, match="memory cap of 64 MiB"):
        await sandbox.run(digest, path, Profile(imports=(), memory_mb=64, timeout_ms=2000), stdin=b"", env={})
    # A module that keeps its memory to itself (no export) is told apart from a plain trap just the same.
    wat = (WAT / "agent_membomb.wat").read_text()
    hidden, hidden_path = module(tmp_path, "", wat.replace('(memory (export "memory") 1)', "(memory 1)"))
    assert hidden != digest
    with pytest.raises(MemoryExceeded, match="memory cap of 16 MiB"):
        await sandbox.run(hidden, hidden_path, STDOUT_ONLY, stdin=b"", env={})
    trap, trap_path = module(tmp_path, "", '(module (memory 1) (func (export "_start") unreachable))')
    with pytest.raises(Trapped, match="unreachable"):  # a trap with little memory in use stays a trap
        await sandbox.run(trap, trap_path, STDOUT_ONLY, stdin=b"", env={})


async def test_initial_memory_over_the_cap_is_refused(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "", '(module (memory (export "memory") 32) (func (export "_start")))')
    with pytest.raises(MemoryExceeded, match="initial memory exceeds the cap of 1 MiB"):
        await sandbox.run(digest, path, Profile(imports=(), memory_mb=1, timeout_ms=1000), stdin=b"", env={})
    assert (await sandbox.run(digest, path, Profile(imports=(), memory_mb=2, timeout_ms=1000), stdin=b"", env={})).exit_code == 0


async def test_trap(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "trap")
    with pytest.raises(Trapped, match="divide by zero"):
        await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})


async def test_proc_exit_is_a_normal_exit_with_its_code(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "exit")
    result = await sandbox.run(digest, path, Profile(imports=("wasi_snapshot_preview1.fd_write", "wasi_snapshot_preview1.proc_exit"),
                                                     memory_mb=1, timeout_ms=1000), stdin=b"", env={})
    assert (result.stdout, result.exit_code) == (b"bye\n", 7)


async def test_output_too_large(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "spew")
    started = time.monotonic()
    with pytest.raises(Trapped, match="output too large"):
        await sandbox.run(digest, path, Profile(imports=STDOUT_ONLY.imports, memory_mb=1, timeout_ms=60_000), stdin=b"", env={})
    assert time.monotonic() - started < 30  # interrupted at the bound, not at the deadline


async def test_tampered_artifact_is_never_deserialized_and_is_rebuilt(tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "hello")
    first = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        await first.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    finally:
        await first.close()
    (artifact,) = (tmp_path / "cache").glob(f"{digest}.*.cwasm")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # a byte of the compiled code
    artifact.write_bytes(bytes(data))

    second = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        assert (await second.run(digest, path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        status = second.status()
        assert status["artifacts_rejected"] == 1 and status["compiled"] == 1 and status["artifacts_loaded"] == 1
        assert "artifacts_refused_by_wasmtime" not in status  # Wasmtime never saw the tampered bytes
        assert artifact.read_bytes() != bytes(data)
        assert second.verify_cache() == []  # the rebuilt artifact carries a good MAC
    finally:
        await second.close()
    third = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        await third.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
        assert third.status()["artifacts_loaded"] == 1 and "compiled" not in third.status()
    finally:
        await third.close()


async def test_verify_cache_deletes_bad_artifacts(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        good, good_path = module(tmp_path, "hello")
        bad, bad_path = module(tmp_path, "exit")
        for digest, path in ((good, good_path), (bad, bad_path)):
            await sandbox.run(digest, path, ALL_WASI, stdin=b"", env={})
        assert sandbox.verify_cache() == []
        (bad_artifact,) = (tmp_path / "cache").glob(f"{bad}.*.cwasm")
        data = bytearray(bad_artifact.read_bytes())
        data[-1] ^= 0x80
        bad_artifact.write_bytes(bytes(data))
        assert sandbox.verify_cache() == [bad]
        assert not bad_artifact.exists() and len(list((tmp_path / "cache").glob(f"{good}.*.cwasm"))) == 1
    finally:
        await sandbox.close()
    # Under another node's key, every artifact is bad.
    other = Sandbox(tmp_path / "cache", tmp_path / "other.key", workers=1)
    try:
        assert other.verify_cache() == [good]
        assert list((tmp_path / "cache").glob("*.cwasm")) == []
    finally:
        await other.close()


async def test_tampered_module_file_is_an_integrity_error(sandbox: Sandbox, tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "hello")
    _, other = module(tmp_path, "trap")
    path.write_bytes(other.read_bytes())
    with pytest.raises(IntegrityError, match=digest):
        await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})
    assert list((tmp_path / "cache").glob("*.cwasm")) == []
    path.unlink()
    with pytest.raises(IntegrityError, match="unreadable"):
        await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})


async def test_worker_killed_mid_run_fails_that_run_and_is_replaced(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        await sandbox.start()
        (pid,) = sandbox.status()["pids"]
        run = asyncio.ensure_future(sandbox.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=60_000), stdin=b"", env={}))
        await until_handed_out(sandbox, run)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed, match=rf"pid {pid} died .*signal 9"):
            await run
        assert (await sandbox.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        status = sandbox.status()
        assert status["worker_restarts"] == 1 and status["pids"] != [pid] and status["alive"] == 1
    finally:
        await sandbox.close()


def test_key_file_is_created_owner_only_and_a_shared_one_refused(tmp_path: pathlib.Path) -> None:
    Sandbox(tmp_path / "cache", tmp_path / "k", workers=1)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600 and len((tmp_path / "k").read_bytes()) == 32
    (tmp_path / "k").chmod(0o640)
    with pytest.raises(Exception, match="0600"):
        Sandbox(tmp_path / "cache", tmp_path / "k", workers=1)


def test_profile_and_run_arguments_are_checked(tmp_path: pathlib.Path) -> None:
    for bad in ({"memory_mb": 0}, {"timeout_ms": -1}, {"fuel": 0}, {"env": {"A=B": "c"}}, {"imports": "wasi.*"}):
        with pytest.raises(ValueError):
            Profile(**{"imports": (), "memory_mb": 1, "timeout_ms": 1, **bad})  # type: ignore[arg-type]
    listed = Profile(imports=["wasi_snapshot_preview1.*"], memory_mb=1, timeout_ms=1, env={"A": "b"})  # type: ignore[arg-type]
    assert listed.imports == ("wasi_snapshot_preview1.*",) and hash(listed) == hash(Profile(("wasi_snapshot_preview1.*",), 1, 1))

    async def bad_digest() -> None:
        sb = Sandbox(tmp_path / "cache", tmp_path / "k", workers=1)
        try:
            with pytest.raises(ValueError, match="digest"):
                await sb.run("sha256:" + "0" * 64, tmp_path / "m.wasm", STDOUT_ONLY, stdin=b"", env={})
        finally:
            await sb.close()
    asyncio.run(bad_digest())


async def test_closed_sandbox_refuses_runs(tmp_path: pathlib.Path) -> None:
    sb = Sandbox(tmp_path / "cache", tmp_path / "k", workers=1)
    await sb.close()
    digest, path = module(tmp_path, "hello")
    with pytest.raises(SandboxError, match="closed"):
        await sb.run(digest, path, STDOUT_ONLY, stdin=b"", env={})


async def test_hung_worker_is_killed_after_the_grace_and_replaced(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        await sandbox.start()
        (pid,) = sandbox.status()["pids"]
        started = time.monotonic()
        run = asyncio.ensure_future(sandbox.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=200), stdin=b"", env={}))
        await until_handed_out(sandbox, run)
        os.kill(pid, signal.SIGSTOP)  # the worker stops answering, deadline or not
        with pytest.raises(DeadlineExceeded, match=rf"pid {pid} did not answer .*killed"):
            await run
        assert time.monotonic() - started >= 0.2 + GRACE
        assert (await sandbox.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        assert sandbox.status()["worker_restarts"] == 1 and pid not in sandbox.status()["pids"]
    finally:
        await sandbox.close()


async def test_workers_run_with_lowered_resource_limits(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1, worker_data_mb=1024)
    try:
        await sandbox.start()
        (pid,) = sandbox.status()["pids"]
        limits = {line[:26].strip(): line[26:].split()[:2] for line in pathlib.Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]}
        assert limits["Max core file size"] == ["0", "0"]
        assert limits["Max open files"] == ["1024", "1024"]
        assert limits["Max data size"] == [str(1024 << 20)] * 2
        # A 64 MiB memory bomb is still stopped by its store limit, well inside the worker's data limit.
        digest, path = module(tmp_path, "membomb")
        with pytest.raises(MemoryExceeded, match="64 MiB"):
            await sandbox.run(digest, path, Profile(imports=(), memory_mb=64, timeout_ms=2000), stdin=b"", env={})
        with pytest.raises(SandboxError, match="does not fit the workers' data limit"):
            await sandbox.run(digest, path, Profile(imports=(), memory_mb=1000, timeout_ms=2000), stdin=b"", env={})
    finally:
        await sandbox.close()


async def test_artifact_with_a_good_mac_that_wasmtime_refuses_is_rebuilt(tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "hello")
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        # Bytes MAC'd under this node's key (as if the key had leaked, or a Wasmtime upgrade kept the settings id).
        cache = ArtifactCache(tmp_path / "cache", load_or_create_key(tmp_path / "artifact.key"), sandbox.status()["engine_settings"])
        cache.store(digest, b"\x7fELF not a wasmtime artifact")
        assert (await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        status = sandbox.status()
        assert status["artifacts_refused_by_wasmtime"] == 1 and status["compiled"] == 1
        assert cache.load(digest)[0] not in (None, b"\x7fELF not a wasmtime artifact")
    finally:
        await sandbox.close()


async def test_many_modules_on_one_worker(tmp_path: pathlib.Path) -> None:
    """More modules than the worker keeps loaded (each loaded module may hold a descriptor): all run, and the
    ones it evicted come back from the attested cache."""
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    template = (WAT / "agent_hello.wat").read_text()
    try:
        modules = [module(tmp_path, "", template.replace('"hello\\n"', f'"he{i:03d}\\n"')) for i in range(80)]
        for i, (digest, path) in enumerate(modules + modules[:8]):
            assert (await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"he%03d\n" % (i % 80)
        status = sandbox.status()
        assert status["compiled"] == 80 and status["artifacts_loaded"] == 88 and "worker_restarts" not in status
    finally:
        await sandbox.close()


async def test_a_cancelled_run_costs_its_worker_and_the_pool_recovers(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    try:
        loop_digest, loop_path = module(tmp_path, "loop")
        hello_digest, hello_path = module(tmp_path, "hello")
        await sandbox.start()
        (pid,) = sandbox.status()["pids"]
        run = asyncio.ensure_future(sandbox.run(loop_digest, loop_path, Profile(imports=(), memory_mb=1, timeout_ms=60_000), stdin=b"", env={}))
        await until_handed_out(sandbox, run)
        run.cancel()  # e.g. the HTTP client went away
        with pytest.raises(asyncio.CancelledError):
            await run
        assert (await sandbox.run(hello_digest, hello_path, STDOUT_ONLY, stdin=b"", env={})).stdout == b"hello\n"
        assert pid not in sandbox.status()["pids"] and sandbox.status()["worker_restarts"] == 1
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped, not left running the loop
    finally:
        await sandbox.close()


def test_workers_are_handed_out_first_come_first_served() -> None:

    async def scenario() -> list[str]:
        idle = Idle()
        worker = object()
        idle.release(worker)  # type: ignore[arg-type]
        held = await idle.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            w = await idle.acquire()
            order.append(name)
            idle.release(w)
        first, second = asyncio.ensure_future(waiter("first")), asyncio.ensure_future(waiter("second"))
        cancelled = asyncio.ensure_future(waiter("cancelled"))
        await asyncio.sleep(0)  # let the three queue up
        cancelled.cancel()
        idle.release(held)
        again = asyncio.ensure_future(waiter("the releaser, asking again"))
        await asyncio.gather(first, second, again)
        return order
    assert asyncio.run(scenario()) == ["first", "second", "the releaser, asking again"]


def test_a_key_never_holds_more_workers_than_its_cap() -> None:
    """Idle with caps: a module at its cap waits even beside an idle worker, which another module takes at once;
    the capped waiter gets a worker as soon as its module holds one fewer, whether given back or lost."""

    async def scenario() -> None:
        idle = Idle()
        a, b, c = object(), object(), object()
        for w in (a, b):
            idle.release(w)  # type: ignore[arg-type]
        first = await idle.acquire("loop", 1)
        assert first is a
        second = asyncio.ensure_future(idle.acquire("loop", 1))
        await asyncio.sleep(0)  # let it queue (nothing else can run meanwhile: one event loop, no I/O)
        assert not second.done() and idle.waiting == 1
        assert await idle.acquire("hello", 1) is b  # the idle worker the loop may not take
        idle.release(b, "hello")
        assert not second.done()  # still capped
        idle.release(first, "loop")
        assert await second is b and idle.held == {"loop": 1}  # the longest idle worker
        third = asyncio.ensure_future(idle.acquire("loop", 1))
        await asyncio.sleep(0)
        assert not third.done()
        idle.forget("loop")  # the worker the loop held died (it is being replaced)
        assert await third is a
        idle.release(c)  # type: ignore[arg-type]
        assert await idle.acquire("other", 1) is c and idle.held == {"loop": 1, "other": 1}
    asyncio.run(scenario())


def test_an_unclosed_sandbox_with_a_replacement_starting_does_not_hang_the_loop(tmp_path: pathlib.Path) -> None:
    digest, path = module(tmp_path, "hello")
    script = f"""
import asyncio, os, pathlib, signal
from edge.sandbox import Sandbox, Profile, WorkerCrashed
async def main():
    sb = Sandbox(pathlib.Path({str(tmp_path / "cache")!r}), pathlib.Path({str(tmp_path / "k")!r}), workers=1)
    await sb.start()
    os.kill(sb.status()["pids"][0], signal.SIGKILL)
    try:
        await sb.run({digest!r}, pathlib.Path({str(path)!r}), Profile(("*.*",), 1, 1000), stdin=b"", env={{}})
    except WorkerCrashed:
        pass
    raise SystemExit(3)  # a replacement worker is starting; the sandbox is never closed
asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parent.parent)},
                          timeout=60, capture_output=True)
    assert done.returncode == 3, done.stderr.decode()[-2000:]


async def test_verify_cache_in_a_thread_beside_cold_starts(tmp_path: pathlib.Path) -> None:
    """The agent's sweep re-MACs artifacts in a thread while modules keep starting: neither disturbs the other."""
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=2)
    template = (WAT / "agent_hello.wat").read_text()
    try:
        modules = [module(tmp_path, "", template.replace('"hello\\n"', f'"hi{i:03d}\\n"')) for i in range(30)]
        stop = False

        def sweep() -> int:
            sweeps = 0
            while not stop or sweeps == 0:
                assert sandbox.verify_cache() == []
                sweeps += 1
            return sweeps
        sweeping = asyncio.ensure_future(asyncio.to_thread(sweep))
        for digest, path in modules:
            assert (await sandbox.run(digest, path, STDOUT_ONLY, stdin=b"", env={})).exit_code == 0
        stop = True
        assert await sweeping >= 1
        assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 30 and sandbox.verify_cache() == []
    finally:
        await sandbox.close()


async def test_close_fails_runs_in_progress_and_waiting(tmp_path: pathlib.Path) -> None:
    sandbox = Sandbox(tmp_path / "cache", tmp_path / "artifact.key", workers=1)
    digest, path = module(tmp_path, "loop")
    profile = Profile(imports=(), memory_mb=1, timeout_ms=60_000)
    running = asyncio.ensure_future(sandbox.run(digest, path, profile, stdin=b"", env={}))
    await until_handed_out(sandbox, running)
    waiting = asyncio.ensure_future(sandbox.run(digest, path, profile, stdin=b"", env={}))
    await wait_until(lambda: sandbox.status()["waiting"] == 1, "the second run to wait for the only worker")
    await sandbox.close()
    with pytest.raises(WorkerCrashed):
        await running
    with pytest.raises(SandboxError, match="closed"):
        await waiting
    assert sandbox.status()["alive"] == 0
