"""`wasmlog log`: a standalone transparency log (and its hidden front-end worker command)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import click

from tlog.addipc import AddServer
from tlog.errors import TlogError
from tlog.frontend import ADD_SOCKET, make_frontend_app
from tlog.httplimits import DEFAULT_LIMITS, ServerLimits
from tlog.keys import read_signer
from tlog.log import Log
from tlog.note import (
    Ed25519Signer,
    Ed25519Verifier,
    verifier_from_vkey,
)
from tlog.policy import Policy
from tlog.sequencer import (
    DEFAULT_REPUBLISH_INTERVAL,
    Sequencer,
)
from tlog.server import SEQUENCER, make_app, status_for
from tlog.shared_sequencer import SharedSequencer
from tlog.storage.base import LogStore
from tlog.storage.lmdb_store import DEFAULT_MAP_SIZE, LMDBLogStore
from tlog.witnessing import DEFAULT_WITNESS_TIMEOUT

from .common import (
    DEFAULT_HEALTHZ_MAX_AGE,
    DEFAULT_LISTEN,
    SEQUENCER_OPTIONS,
    options_given,
    read_witness_policy,
    run_app,
    serve_nodes,
    serve_with_front_ends,
    server_limit_options,
    split_listen,
    witness_budget,
    witness_rounds_option,
    worker_of_option,
)


def open_store(data: pathlib.Path | None, store: str | None, objects: str | None, *, witnessed: bool, map_size: int) -> LogStore:
    """The LMDB store in data, or the shared store on PostgreSQL (store, a libpq DSN) and a bucket (objects, s3://BUCKET/PREFIX)."""
    if (data is None) == (store is None) or (store is None) != (objects is None):
        raise TlogError("give --data DIR, or --store postgresql://... with --objects s3://BUCKET/PREFIX")
    if store is None:
        assert data is not None
        return LMDBLogStore(str(data), map_size=map_size)
    from tlog.storage.shared import SharedLogStore

    assert objects is not None
    return SharedLogStore(store, objects, publish_integrated=not witnessed)


def serve_log(
    *, data: pathlib.Path | None, signer: Ed25519Signer, origin: str | None, listen: str,
    interval_ms: int, batch_max: int, max_pending: int, map_size: int, banner: str = "",
    witness_policy: Policy | None = None, republish_interval: float = DEFAULT_REPUBLISH_INTERVAL,
    witness_timeout: float = DEFAULT_WITNESS_TIMEOUT, healthz_max_age: float = 300.0, workers: int = 1,
    witness_rounds_per_day: int | None = None,
    limits: ServerLimits = DEFAULT_LIMITS, store: str | None = None, objects: str | None = None,
    worker_of: int | None = None, node_command: Sequence[str] = (),
) -> None:
    """Serve a log; with workers > 1, that many HTTP front-end processes serve the port and this one sequences.

    With store and objects (shared storage), every process started so is one log with the others, and
    workers > 1 runs that many such processes on the port (common.serve_nodes; node_command starts one)."""
    host, port = split_listen(listen)
    if worker_of is not None and store is None:
        raise TlogError("--worker-of is for the processes of --workers with --store")
    log_store = open_store(data, store, objects, witnessed=witness_policy is not None, map_size=map_size)
    try:
        log = Log(log_store, signer, origin=origin, witnessed=witness_policy is not None)
        sequencer_class = Sequencer if store is None else SharedSequencer
        sequencer = sequencer_class(
            log, interval=interval_ms / 1000, batch_max=batch_max, max_pending=max_pending,
            republish_interval=republish_interval,
            witness_budget=witness_budget(witness_rounds_per_day),
        )
        app = make_app(sequencer, witness_policy=witness_policy, witness_timeout=witness_timeout, max_checkpoint_age=healthz_max_age)
        click.echo(banner or f"log {log.origin} at http://{host}:{port}/ (size {log.published.checkpoint.size})")
        if store is not None:
            serve_nodes(app, host, port, limits, workers=workers, worker_of=worker_of, command=node_command)
            return
        if workers <= 1:
            run_app(app, host, port, limits=limits)
            return
        serve_with_front_ends(
            app, (host, port), workers, lambda ipc_dir: ["wasmlog", "log", "front", "--ipc", ipc_dir, "--listen", listen],
            {ADD_SOCKET: lambda a: AddServer(a[SEQUENCER].submit, status_for)}, limits,
        )
    finally:
        log_store.close()


def log_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve on."),
            *SEQUENCER_OPTIONS,
            click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="With N > 1, N HTTP front-end processes share the port and forward to this one, which sequences; with --store, N processes that are each a full node share the port."),
            click.option("--healthz-max-age", default=DEFAULT_HEALTHZ_MAX_AGE, show_default=True, type=click.FloatRange(1), help="GET /healthz fails when a witnessed log's checkpoint is older (seconds)."),
            click.option("--map-size", default=DEFAULT_MAP_SIZE, show_default=True, type=click.IntRange(1 << 20), help="LMDB map size in bytes (address space)."),
        ]
    ):
        f = option(f)
    return f


@click.group("log")
def log_group() -> None:
    """Run a standalone transparency log."""


@log_group.command("serve")
@click.option("--data", type=click.Path(file_okay=False, path_type=pathlib.Path), help="LMDB directory (or --store and --objects).")
@click.option("--store", default=None, help="Shared storage: a PostgreSQL DSN (postgresql://USER@HOST:PORT/DB; PGPASSWORD and the other libpq variables apply). Every process on it is one log.")
@click.option("--objects", default=None, help="With --store: s3://BUCKET/PREFIX for the tiles and checkpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION apply).")
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("--origin", default=None, help="Checkpoint origin (default: the key name).")
@click.option("--witness-policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A c2sp.org/tlog-policy file: publish only checkpoints its witness quorum cosigned.")
@click.option("--republish-interval", default=DEFAULT_REPUBLISH_INTERVAL, show_default=True, type=click.FloatRange(1), help="Seconds between witness cosignings of an unchanged tree.")
@click.option("--witness-timeout", default=DEFAULT_WITNESS_TIMEOUT, show_default=True, type=click.FloatRange(0.1), help="Seconds to wait for witnesses per checkpoint.")
@witness_rounds_option
@log_options
@worker_of_option
@server_limit_options
def log_serve(
    data: pathlib.Path | None, store: str | None, objects: str | None, key_file: pathlib.Path, origin: str | None, policy_file: pathlib.Path | None,
    republish_interval: float, witness_timeout: float, witness_rounds_per_day: int | None, **opts: int | str,
) -> None:
    """Serve a c2sp.org/tlog-tiles log with POST /add and proof endpoints."""
    try:
        signer = read_signer(key_file)
        policy = read_witness_policy(policy_file, signer) if policy_file else None
        node_command = ["wasmlog", "log", "serve", *options_given(click.get_current_context(), {"workers", "worker_of"})]
        serve_log(
            data=data, store=store, objects=objects, signer=signer, origin=origin, witness_policy=policy,
            republish_interval=republish_interval, witness_timeout=witness_timeout,
            witness_rounds_per_day=witness_rounds_per_day, node_command=node_command, **opts,  # type: ignore[arg-type]
        )
    except (TlogError, OSError) as e:  # OSError: the port is taken (claimed_port), a file unreadable
        raise click.ClickException(str(e)) from e


@log_group.command("front", hidden=True)
@click.option("--ipc", "ipc_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The sequencing process's socket directory.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@server_limit_options
def log_front(ipc_dir: str, listen: str, limits: ServerLimits) -> None:
    """An HTTP front-end process of `log serve --workers N` (started by it, not by hand)."""
    host, port = split_listen(listen)
    run_app(make_frontend_app(ipc_dir), host, port, reuse_port=True, limits=limits)


def log_verifier(_ctx: click.Context, _param: click.Parameter, value: str) -> Ed25519Verifier:
    """A --vkey value: the vkey text, or a file holding it."""
    path = pathlib.Path(value)
    try:
        return verifier_from_vkey(path.read_text().strip() if path.is_file() else value)
    except (TlogError, OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"not a vkey or a file holding one: {e}") from None


@log_group.command("migrate")
@click.option("--from", "from_dir", type=click.Path(exists=True, file_okay=False, path_type=pathlib.Path), help="Copy from this LMDB directory ...")
@click.option("--from-store", default=None, help="... or from this PostgreSQL DSN (with --from-objects).")
@click.option("--from-objects", default=None, help="s3://BUCKET/PREFIX of --from-store.")
@click.option("--to", "to_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Copy into this LMDB directory ...")
@click.option("--to-store", default=None, help="... or into this PostgreSQL DSN (with --to-objects).")
@click.option("--to-objects", default=None, help="s3://BUCKET/PREFIX of --to-store.")
@click.option("--registry", is_flag=True, help="A registry's data: DIR/log and DIR/blobs, PREFIX/log and PREFIX/blobs (blobs are copied too).")
@click.option("--vkey", "verifier", required=True, callback=log_verifier,
              help="The log's verifier key (its vkey, or a file holding it: PREFIX.vkey of wasmlog keygen). The source's checkpoint, and the target's when resuming, must be signed by it.")
def log_migrate(from_dir: pathlib.Path | None, from_store: str | None, from_objects: str | None, to_dir: pathlib.Path | None,
                to_store: str | None, to_objects: str | None, registry: bool, verifier: Ed25519Verifier) -> None:
    """Copy a log between LMDB and PostgreSQL + S3, recomputing every hash and checking the log's
    signature on the source's checkpoint; run it again to resume."""
    from registry.bucket_blobs import BucketBlobStore

    from .migrate import migrate, open_lmdb, open_shared

    def side(directory: pathlib.Path | None, store: str | None, objects: str | None, name: str) -> Any:
        if (directory is None) == (store is None) or (store is None) != (objects is None):
            raise click.UsageError(f"give --{name} DIR, or --{name}-store DSN with --{name}-objects s3://BUCKET/PREFIX")
        return open_lmdb(directory, registry) if directory is not None else open_shared(store, objects, registry)  # type: ignore[arg-type]

    opened: list[Any] = []
    try:
        opened.append(side(from_dir, from_store, from_objects, "from"))
        opened.append(side(to_dir, to_store, to_objects, "to"))
        report = migrate(opened[0], opened[1], verifier, progress=lambda done, size: click.echo(f"{done}/{size}", err=True))
    except TlogError as e:
        raise click.ClickException(str(e)) from e
    finally:
        for log_store, blobs in opened:
            if isinstance(blobs, BucketBlobStore):
                blobs.close()
            log_store.close()
    click.echo(f"copied {report.copied} entries (the copy has {report.size}) and {report.blobs} blobs")
