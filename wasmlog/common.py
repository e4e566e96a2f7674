"""What the wasmlog commands share: listen addresses, server limits, front-end workers, option groups, one-line errors."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import pathlib
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import click
from aiohttp import web

from registry.client import RegistryClient
from registry.record import PackageRef, check_label, parse_package_ref
from tlog.addipc import AddServer
from tlog.errors import TlogError
from tlog.frontend import HTTP_SOCKET, exit_with_parent, front_ends, supervised
from tlog.httplimits import DEFAULT_LIMITS, ServerLimits, claimed_port, serve
from tlog.note import (
    Ed25519Signer,
)
from tlog.policy import NONE, Policy, parse_policy
from tlog.runloop import new_loop, run, serving_gc
from tlog.sequencer import (
    DEFAULT_BATCH_MAX,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_PENDING,
)
from tlog.witnessing import RequestBudget

T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:7380"
DEFAULT_HEALTHZ_MAX_AGE = 300.0  # five republish intervals


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"want HOST:PORT, got {listen!r}", param_hint="--listen")
    return host.strip("[]") or "127.0.0.1", int(port)


def run_app(app: web.Application, host: str | None, port: int | None, *, path: str | None = None, reuse_port: bool = False,
            limits: ServerLimits = DEFAULT_LIMITS) -> None:
    """Serve app until SIGINT/SIGTERM on runloop.new_loop() (uvloop when installed), with every
    connection and request bounded by limits (tlog/httplimits.py).

    path: serve on this Unix socket (also, or only when port is None); reuse_port: share the port.
    """
    serving_gc()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(app, limits, host, port, path=path, reuse_port=reuse_port))


LIMIT_OPTIONS = [
    click.option("--header-timeout", default=DEFAULT_LIMITS.header_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a connection may take to send a complete request head, from connecting or from its previous response (the keep-alive idle time)."),
    click.option("--body-timeout", default=DEFAULT_LIMITS.body_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a request body may take to arrive; then 408 and the connection is closed."),
    click.option("--write-timeout", default=DEFAULT_LIMITS.write_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a response may wait for a client that does not read; then the connection is closed."),
    click.option("--max-connections", default=DEFAULT_LIMITS.max_connections, show_default=True, type=click.IntRange(1), help="Open connections per process; more are answered 503 and closed."),
]


def server_limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the LIMIT_OPTIONS to a command; f gets them as one ServerLimits argument, limits."""

    @functools.wraps(f)
    def wrapper(*args: Any, header_timeout: float, body_timeout: float, write_timeout: float, max_connections: int, **kwargs: Any) -> Any:
        return f(*args, limits=ServerLimits(header_timeout, body_timeout, write_timeout, max_connections), **kwargs)

    for option in reversed(LIMIT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


PRIVATE_IDLE_TIMEOUT = 60.0


def serve_with_front_ends(app: web.Application, listen: tuple[str, int], workers: int, front_command: Callable[[str], list[str]],
                          servers: Mapping[str, Callable[[web.Application], AddServer]], limits: ServerLimits) -> None:
    """Serve app on a private Unix socket with `workers` front-end processes on the public port
    listen (host, port), which must be free (claimed_port).

    front_command gets the socket directory; the front-ends get limits as flags after it. The
    private socket (only the front-ends reach it) admits all their connections and keeps idle
    ones longer than their connection pools do (aiohttp's default: 15 s)."""
    with claimed_port(*listen):
        ipc_dir = tempfile.mkdtemp(prefix="wasmlog-")  # mode 0700: only this user reaches the sockets
        try:
            command = front_command(ipc_dir) + limits.as_args()
            app.cleanup_ctx.append(front_ends(ipc_dir, command, workers, servers))  # supervised
            private = dataclasses.replace(limits, header_timeout=max(limits.header_timeout, PRIVATE_IDLE_TIMEOUT),
                                          max_connections=limits.max_connections * workers)
            run_app(app, None, None, path=os.path.join(ipc_dir, HTTP_SOCKET), limits=private)
        finally:
            shutil.rmtree(ipc_dir, ignore_errors=True)


def options_given(ctx: click.Context, leave_out: Collection[str] = ()) -> list[str]:
    """The options of this command as invoked (defaults filled in) as arguments, but those whose
    parameter names are in leave_out: to start another process of the same command."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or param.name in leave_out or value is None or value is False:
            continue
        name = param.opts[0]
        if param.is_flag:
            args.append(name)
        else:
            args += [a for v in (value if param.multiple else [value]) for a in (name, str(v))]
    return args


def worker_of_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--worker-of", "worker_of", default=None, type=int, hidden=True,
                        help="(internal) Serve as one of the --workers processes started by this process id.")(f)


def serve_nodes(app: web.Application, host: str, port: int, limits: ServerLimits, *, workers: int, worker_of: int | None,
                command: Sequence[str]) -> None:
    """Serve app on shared storage as one of `workers` full nodes sharing host:port (SO_REUSEPORT).

    Started by hand (worker_of None), this process refuses a port already bound by anyone else
    (claimed_port), then also starts the other workers - 1 as `python -m <command> --worker-of <its
    pid>`, starts another when one dies and stops them when it stops; each of those stops once the
    process that started it is gone, even if it was killed."""
    if worker_of is not None:
        app.cleanup_ctx.append(exit_with_parent(worker_of))
        run_app(app, host, port, reuse_port=True, limits=limits)
        return
    if workers <= 1:
        run_app(app, host, port, limits=limits)
        return
    with claimed_port(host, port):
        app.cleanup_ctx.append(supervised([*command, "--worker-of", str(os.getpid())], workers - 1))
        run_app(app, host, port, reuse_port=True, limits=limits)


def read_witness_policy(path: pathlib.Path, signer: Ed25519Signer) -> Policy:
    """Read a tlog-policy for our log; if it lists logs, ours must be one of them."""
    policy = parse_policy(path.read_bytes())
    if policy.logs and signer.vkey not in {log.verifier.vkey for log in policy.logs}:
        raise TlogError(f"the witness policy does not list this log's key {signer.vkey}")
    if policy.quorum != NONE and not any(w.url for w in policy.witnesses.values()):
        raise TlogError("the witness policy gives no witness URL to submit checkpoints to")
    return policy



SEQUENCER_OPTIONS = [
    click.option("--interval-ms", default=int(DEFAULT_INTERVAL * 1000), show_default=True, type=click.IntRange(1, 60_000), help="Longest wait before a pending batch is integrated."),
    click.option("--batch-max", default=DEFAULT_BATCH_MAX, show_default=True, type=click.IntRange(1, 1 << 20), help="Integrate at once when this many entries wait."),
    click.option("--max-pending", default=DEFAULT_MAX_PENDING, show_default=True, type=click.IntRange(1, 1 << 24), help="Pending entries beyond which submissions get 503."),
]


witness_rounds_option = click.option(
    "--witness-rounds-per-day", "witness_rounds_per_day", default=None, type=click.IntRange(1),
    help="Ask the witnesses at most this often a day (plus a burst of 10); their log lists' qpd must allow it. Default: unpaced.",
)


def witness_budget(rounds_per_day: int | None) -> RequestBudget | None:
    return RequestBudget(rounds_per_day) if rounds_per_day else None


def sequencer_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--interval-ms, --batch-max and --max-pending (Sequencer arguments)."""
    for option in reversed(SEQUENCER_OPTIONS):
        f = option(f)
    return f



def one_line_errors(f: Callable[..., T]) -> Callable[..., T]:
    """Turn our errors, network errors and bad files into one line and exit status 1."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return f(*args, **kwargs)
        except (TimeoutError, TlogError, aiohttp.ClientError, OSError) as e:
            raise click.ClickException(str(e) or type(e).__name__) from None

    return wrapper


class UnusableInput(click.ClickException):
    """A file given on the command line that cannot be used: exit status 2, one line."""

    exit_code = 2



def with_client(url: str, work: Callable[[RegistryClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            return await work(RegistryClient(url, session))

    return run(go())


def package_ref(_ctx: click.Context, _param: click.Parameter, value: str) -> PackageRef:
    try:
        return parse_package_ref(value)
    except TlogError as e:
        raise click.BadParameter(str(e)) from None


def namespace_label(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_label(value, "namespace")
    except TlogError as e:
        raise click.BadParameter(str(e)) from None


registry_opt = click.option("--registry", "url", required=True, help="The registry's URL, e.g. http://127.0.0.1:7380")
key_opt = click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="The publisher's private key file (wasmlog keygen).")


def _with_opts(opts: Sequence[Callable[[Any], Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        for o in reversed(opts):
            f = o(f)
        return f
    return deco
