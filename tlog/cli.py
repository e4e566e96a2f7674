"""The ``wasmlog`` command: thin wrappers that parse flags, build objects, and run one thing."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import click
from aiohttp import web

from .addipc import AddServer
from .errors import TlogError
from .frontend import ADD_SOCKET, HTTP_SOCKET, front_ends, make_frontend_app
from .httplimits import DEFAULT_LIMITS, ServerLimits, serve
from .keys import read_signer, write_key_pair
from .log import Log
from .note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    OWN_KEY_NAME_RULE,
    Ed25519Signer,
    is_own_key_name,
)
from .policy import NONE, Policy, parse_policy
from .runloop import new_loop
from .sequencer import (
    DEFAULT_BATCH_MAX,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_PENDING,
    DEFAULT_REPUBLISH_INTERVAL,
    Sequencer,
)
from .server import SEQUENCER, make_app, status_for
from .storage.lmdb_store import DEFAULT_MAP_SIZE, LMDBLogStore
from .witnessing import DEFAULT_WITNESS_TIMEOUT, RequestBudget

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
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(app, limits, host, port, path=path, reuse_port=reuse_port))


LIMIT_OPTIONS = [
    click.option("--header-timeout", default=DEFAULT_LIMITS.header_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a connection may take to send a complete request head, from connecting or from its previous response (the keep-alive idle time)."),
    click.option("--body-timeout", default=DEFAULT_LIMITS.body_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a request body may take to arrive; then 408 and the connection is closed."),
    click.option("--write-timeout", default=DEFAULT_LIMITS.write_timeout, show_default=True, type=click.FloatRange(0.1), help="Seconds a response may wait for a client that does not read; then the connection is closed."),
    click.option("--max-connections", default=DEFAULT_LIMITS.max_connections, show_default=True, type=click.IntRange(1), help="Open connections per process; more are answered 503 and closed."),
]


def server_limit_options(f):  # type: ignore[no-untyped-def]
    """Add the LIMIT_OPTIONS to a command; f gets them as one ServerLimits argument, limits."""

    @functools.wraps(f)
    def wrapper(*args: Any, header_timeout: float, body_timeout: float, write_timeout: float, max_connections: int, **kwargs: Any) -> Any:
        return f(*args, limits=ServerLimits(header_timeout, body_timeout, write_timeout, max_connections), **kwargs)

    for option in reversed(LIMIT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


PRIVATE_IDLE_TIMEOUT = 60.0


def serve_with_front_ends(app: web.Application, workers: int, front_command: Callable[[str], list[str]],
                          servers: Mapping[str, Callable[[web.Application], AddServer]], limits: ServerLimits) -> None:
    """Serve app on a private Unix socket with `workers` front-end processes on the public port.

    front_command gets the socket directory; the front-ends get limits as flags after it. The
    private socket (only the front-ends reach it) admits all their connections and keeps idle
    ones longer than their connection pools do (aiohttp's default: 15 s)."""
    ipc_dir = tempfile.mkdtemp(prefix="wasmlog-")  # mode 0700: only this user reaches the sockets
    try:
        command = front_command(ipc_dir) + limits.as_args()
        app.cleanup_ctx.append(front_ends(ipc_dir, command, workers, servers))  # supervised
        private = dataclasses.replace(limits, header_timeout=max(limits.header_timeout, PRIVATE_IDLE_TIMEOUT),
                                      max_connections=limits.max_connections * workers)
        run_app(app, None, None, path=os.path.join(ipc_dir, HTTP_SOCKET), limits=private)
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)


def read_witness_policy(path: pathlib.Path, signer: Ed25519Signer) -> Policy:
    """Read a tlog-policy for our log; if it lists logs, ours must be one of them."""
    policy = parse_policy(path.read_bytes())
    if policy.logs and signer.vkey not in {log.verifier.vkey for log in policy.logs}:
        raise TlogError(f"the witness policy does not list this log's key {signer.vkey}")
    if policy.quorum != NONE and not any(w.url for w in policy.witnesses.values()):
        raise TlogError("the witness policy gives no witness URL to submit checkpoints to")
    return policy


def serve_log(
    *, data: pathlib.Path, signer: Ed25519Signer, origin: str | None, listen: str,
    interval_ms: int, batch_max: int, max_pending: int, map_size: int, banner: str = "",
    witness_policy: Policy | None = None, republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
    witness_timeout: float = DEFAULT_WITNESS_TIMEOUT, healthz_max_age: float = 300.0, workers: int = 1,
    witness_rounds_per_day: int | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
) -> None:
    """Serve a log; with workers > 1, that many HTTP front-end processes serve the port and this one sequences."""
    host, port = split_listen(listen)
    store = LMDBLogStore(str(data), map_size=map_size)
    try:
        log = Log(store, signer, origin=origin, witnessed=witness_policy is not None)
        sequencer = Sequencer(
            log, interval=interval_ms / 1000, batch_max=batch_max, max_pending=max_pending,
            republish_interval=republish_interval,
            witness_budget=witness_budget(witness_rounds_per_day),
        )
        app = make_app(sequencer, witness_policy=witness_policy, witness_timeout=witness_timeout, max_checkpoint_age=healthz_max_age)
        click.echo(banner or f"log {log.origin} at http://{host}:{port}/ (size {log.published.checkpoint.size})")
        if workers <= 1:
            run_app(app, host, port, limits=limits)
            return
        serve_with_front_ends(
            app, workers, lambda ipc_dir: ["tlog", "log", "front", "--ipc", ipc_dir, "--listen", listen],
            {ADD_SOCKET: lambda a: AddServer(a[SEQUENCER].submit, status_for)}, limits,
        )
    finally:
        store.close()


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def configure_logging(verbose: int, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Log lines as text or one JSON object each.")
def main(verbose: int, log_format: str) -> None:
    """wasmlog: a transparency log and registry for WebAssembly modules."""
    configure_logging(verbose, log_format)


@main.command()
@click.argument("name")
@click.option("--out", "prefix", type=click.Path(path_type=pathlib.Path), help="Write PREFIX.key and PREFIX.vkey.")
@click.option("--witness", is_flag=True, help="A cosigner key (tlog-cosignature v1, type 0x04).")
def keygen(name: str, prefix: pathlib.Path | None, witness: bool) -> None:
    """Generate an Ed25519 key pair in signed-note form."""
    if not is_own_key_name(name):
        raise click.BadParameter(OWN_KEY_NAME_RULE, param_hint="NAME")
    prefix = prefix or pathlib.Path(re.sub(r"[^A-Za-z0-9._-]", "_", name))
    signer = Ed25519Signer.generate(name, ALG_COSIGNATURE_V1 if witness else ALG_ED25519)
    try:
        key_path, vkey_path = write_key_pair(signer, prefix)
    except FileExistsError as e:
        raise click.ClickException(f"{e.filename} exists; not overwriting a key") from None
    click.echo(f"wrote {key_path} and {vkey_path}")
    click.echo(signer.vkey)


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


def sequencer_options(f):  # type: ignore[no-untyped-def]
    """--interval-ms, --batch-max and --max-pending (Sequencer arguments)."""
    for option in reversed(SEQUENCER_OPTIONS):
        f = option(f)
    return f


def log_options(f):  # type: ignore[no-untyped-def]
    for option in reversed(
        [
            click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve on."),
            *SEQUENCER_OPTIONS,
            click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="With N > 1, N HTTP front-end processes share the port and forward to this one, which sequences."),
            click.option("--healthz-max-age", default=DEFAULT_HEALTHZ_MAX_AGE, show_default=True, type=click.FloatRange(1), help="GET /healthz fails when a witnessed log's checkpoint is older (seconds)."),
            click.option("--map-size", default=DEFAULT_MAP_SIZE, show_default=True, type=click.IntRange(1 << 20), help="LMDB map size in bytes (address space)."),
        ]
    ):
        f = option(f)
    return f


@main.group("log")
def log_group() -> None:
    """Run a standalone transparency log."""


@log_group.command("serve")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="LMDB directory.")
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--origin", default=None, help="Checkpoint origin (default: the key name).")
@click.option("--witness-policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A c2sp.org/tlog-policy file: publish only checkpoints its witness quorum cosigned.")
@click.option("--republish-interval", default=DEFAULT_REPUBLISH_INTERVAL, show_default=True, type=click.FloatRange(1), help="Seconds between witness cosignings of an unchanged tree.")
@click.option("--witness-timeout", default=DEFAULT_WITNESS_TIMEOUT, show_default=True, type=click.FloatRange(0.1), help="Seconds to wait for witnesses per checkpoint.")
@witness_rounds_option
@log_options
@server_limit_options
def log_serve(
    data: pathlib.Path, key_file: pathlib.Path, origin: str | None, policy_file: pathlib.Path | None,
    republish_interval: float, witness_timeout: float, witness_rounds_per_day: int | None, **opts: int | str,
) -> None:
    """Serve a c2sp.org/tlog-tiles log with POST /add and proof endpoints."""
    try:
        signer = read_signer(key_file)
        policy = read_witness_policy(policy_file, signer) if policy_file else None
        serve_log(
            data=data, signer=signer, origin=origin, witness_policy=policy,
            republish_interval=republish_interval, witness_timeout=witness_timeout,
            witness_rounds_per_day=witness_rounds_per_day, **opts,  # type: ignore[arg-type]
        )
    except TlogError as e:
        raise click.ClickException(str(e)) from e


@log_group.command("front", hidden=True)
@click.option("--ipc", "ipc_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The sequencing process's socket directory.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@server_limit_options
def log_front(ipc_dir: str, listen: str, limits: ServerLimits) -> None:
    """An HTTP front-end process of `log serve --workers N` (started by it, not by hand)."""
    host, port = split_listen(listen)
    run_app(make_frontend_app(ipc_dir), host, port, reuse_port=True, limits=limits)


@main.group("witness")
def witness_group() -> None:
    """Run a c2sp.org/tlog-witness cosigner."""


@witness_group.command("serve")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="LMDB directory.")
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A cosigner key (keygen --witness).")
@click.option("--log-list", "log_list", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="Known logs, witness-network logs/v0 format.")
@click.option("--listen", default="127.0.0.1:7381", show_default=True)
@click.option("--peer", "peers", multiple=True, help="Another witness's monitoring prefix URL to gossip with (repeatable).")
@click.option("--gossip-interval", default=60.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between gossip rounds.")
@server_limit_options
def witness_serve(
    data: pathlib.Path, key_file: pathlib.Path, log_list: pathlib.Path, listen: str,
    peers: tuple[str, ...], gossip_interval: float, limits: ServerLimits,
) -> None:
    """Serve POST /add-checkpoint, GET /<sha256(origin)>/checkpoint and GET /evidence."""
    from witness.loglist import parse_log_list
    from witness.server import make_app as make_witness_app
    from witness.state import WitnessState
    from witness.witness import Witness

    host, port = split_listen(listen)
    try:
        signer = read_signer(key_file, alg=ALG_COSIGNATURE_V1)
        logs = parse_log_list(log_list.read_text())
        state = WitnessState(str(data))
    except TlogError as e:
        raise click.ClickException(str(e)) from e
    try:
        app = make_witness_app(Witness(signer=signer, logs=logs, state=state), peers=peers, gossip_interval=gossip_interval)
        click.echo(f"witness {signer.name} at http://{host}:{port}/ for {len(logs)} log(s)\n{signer.vkey}")
        run_app(app, host, port, limits=limits)
    finally:
        state.close()
