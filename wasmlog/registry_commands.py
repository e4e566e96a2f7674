"""`wasmlog registry`, publish, fetch, key, yank: the registry and its publishers."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import click

from registry.blobs import BlobStore
from registry.client import RegistryClient, RegistryError
from registry.frontend import CHECK_SOCKET, make_registry_frontend_app
from registry.record import Action, PackageRef
from registry.sbom import CYCLONEDX, SPDX
from registry.server import error_body, make_app, status_for
from registry.service import Registry
from tlog.addipc import AddServer
from tlog.errors import TlogError
from tlog.frontend import ADD_SOCKET
from tlog.httplimits import ServerLimits
from tlog.keys import read_signer
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.sequencer import (
    Sequencer,
)
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.objects import objects_url_under
from tlog.witnessing import DEFAULT_WITNESS_TIMEOUT

from .common import (
    DEFAULT_HEALTHZ_MAX_AGE,
    DEFAULT_LISTEN,
    key_opt,
    namespace_label,
    one_line_errors,
    options_given,
    package_ref,
    read_witness_policy,
    registry_opt,
    run_app,
    sequencer_options,
    serve_nodes,
    serve_with_front_ends,
    server_limit_options,
    split_listen,
    with_client,
    witness_budget,
    witness_rounds_option,
    worker_of_option,
)


@click.group("registry")
def registry_group() -> None:
    """Run a registry with its embedded log."""


def open_registry(
    data: pathlib.Path | None, store: str | None, objects: str | None, signer: Ed25519Signer, *, witnessed: bool,
    interval_ms: int, batch_max: int, max_pending: int, witness_rounds_per_day: int | None,
) -> tuple[Registry, Sequencer, Callable[[], None]]:
    """A registry on LMDB and files under data (DIR/log, DIR/blobs), or on PostgreSQL (store) and a bucket
    (objects, s3://BUCKET/PREFIX: the log's objects under PREFIX/log, blobs under PREFIX/blobs); and its closer."""
    options = {"interval": interval_ms / 1000, "batch_max": batch_max, "max_pending": max_pending}
    if store is None:
        assert data is not None
        lmdb_store = LMDBLogStore(str(data / "log"))
        try:
            sequencer = Sequencer(Log(lmdb_store, signer, witnessed=witnessed), witness_budget=witness_budget(witness_rounds_per_day),
                                  **options)  # type: ignore[arg-type]
            return Registry(sequencer=sequencer, blobs=BlobStore(str(data / "blobs"))), sequencer, lmdb_store.close
        except BaseException:
            lmdb_store.close()
            raise
    from registry.bucket_blobs import BucketBlobStore
    from registry.shared_service import SharedRegistry
    from tlog.shared_sequencer import SharedSequencer
    from tlog.storage.shared import SharedLogStore

    assert objects is not None
    log_url, blobs_url = objects_url_under(objects, "log"), objects_url_under(objects, "blobs")
    shared_store = SharedLogStore(store, log_url, publish_integrated=not witnessed)  # witnessed: the bucket's checkpoint is the cosigned one
    try:
        blobs = BucketBlobStore(blobs_url)
        shared = SharedSequencer(Log(shared_store, signer, witnessed=witnessed), witness_budget=witness_budget(witness_rounds_per_day),
                                 **options)

        def close() -> None:
            blobs.close()
            shared_store.close()

        return SharedRegistry(sequencer=shared, blobs=blobs), shared, close
    except BaseException:
        shared_store.close()
        raise


@registry_group.command("serve")
@click.option("--data", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Data directory (LMDB log, blobs), or --store and --objects.")
@click.option("--store", default=None, help="Shared storage: a PostgreSQL DSN (postgresql://USER@HOST:PORT/DB; PGPASSWORD and the other libpq variables apply). Every process on it is one registry.")
@click.option("--objects", default=None, help="With --store: s3://BUCKET/PREFIX for the log's tiles (PREFIX/log) and the blobs (PREFIX/blobs) (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION apply).")
@key_opt
@click.option("--witness-policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A c2sp.org/tlog-policy file: publish only checkpoints its witness quorum cosigned.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@sequencer_options
@witness_rounds_option
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="With N > 1, N HTTP front-end processes share the port, check publishes and write blobs; this one keeps the state and the log. With --store, N processes that are each a full node share the port.")
@worker_of_option
@server_limit_options
@one_line_errors
def registry_serve(
    data: pathlib.Path | None, store: str | None, objects: str | None, key_file: pathlib.Path, policy_file: pathlib.Path | None, listen: str,
    interval_ms: int, batch_max: int, max_pending: int, witness_rounds_per_day: int | None, workers: int, worker_of: int | None,
    limits: ServerLimits,
) -> None:
    """Serve the registry API under /api/v1/ and its log under /log/."""
    if (data is None) == (store is None) or (store is None) != (objects is None):
        raise TlogError("give --data DIR, or --store postgresql://... with --objects s3://BUCKET/PREFIX")
    if worker_of is not None and store is None:
        raise TlogError("--worker-of is for the processes of --workers with --store")
    node_command = ["wasmlog", "registry", "serve", *options_given(click.get_current_context(), {"workers", "worker_of"})]
    host, port = split_listen(listen)
    signer = read_signer(key_file)
    policy = read_witness_policy(policy_file, signer) if policy_file else None
    registry, sequencer, close = open_registry(data, store, objects, signer, witnessed=policy is not None, interval_ms=interval_ms,
                                               batch_max=batch_max, max_pending=max_pending, witness_rounds_per_day=witness_rounds_per_day)
    try:
        click.echo(f"registry at http://{host}:{port}/api/v1/ with its log {sequencer.log.origin} at /log/")
        app = make_app(registry, sequencer, witness_policy=policy, witness_timeout=DEFAULT_WITNESS_TIMEOUT,
                       max_checkpoint_age=DEFAULT_HEALTHZ_MAX_AGE)
        if store is not None:
            serve_nodes(app, host, port, limits, workers=workers, worker_of=worker_of, command=node_command)
            return
        if workers <= 1:
            run_app(app, host, port, limits=limits)
            return
        serve_with_front_ends(
            app, (host, port), workers,
            lambda ipc_dir: ["wasmlog", "registry", "front", "--ipc", ipc_dir, "--data", str(data), "--listen", listen],
            {
                CHECK_SOCKET: lambda _: AddServer(registry.check_entry, status_for, error_body),
                ADD_SOCKET: lambda _: AddServer(registry.submit_entry, status_for, error_body),
            },
            limits,
        )
    finally:
        close()


@registry_group.command("front", hidden=True)
@click.option("--ipc", "ipc_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The registry process's socket directory.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="The registry's data directory (blobs are written here).")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@server_limit_options
def registry_front(ipc_dir: str, data: str, listen: str, limits: ServerLimits) -> None:
    """An HTTP front-end process of `registry serve --workers N` (started by it, not by hand)."""
    host, port = split_listen(listen)
    run_app(make_registry_frontend_app(ipc_dir, data), host, port, reuse_port=True, limits=limits)


@click.command()
@registry_opt
@key_opt
@click.option("--sbom", "sbom_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A CycloneDX or SPDX JSON SBOM.")
@click.argument("ref", metavar="NAMESPACE:NAME@VERSION", callback=package_ref)
@click.argument("module", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@one_line_errors
def publish(url: str, key_file: pathlib.Path, sbom_file: pathlib.Path | None, ref: PackageRef, module: pathlib.Path) -> None:
    """Sign and publish a module; write MODULE.tlog-proof beside it."""
    signer = read_signer(key_file)
    sbom = sbom_file.read_bytes() if sbom_file else None
    media_type = None
    if sbom is not None:
        media_type = CYCLONEDX if b'"bomFormat"' in sbom else SPDX
    proof = with_client(url, lambda c: c.publish(signer, ref, module.read_bytes(), sbom, media_type))
    out = module.with_name(module.name + ".tlog-proof")
    out.write_bytes(proof)
    click.echo(f"published {ref}; proof written to {out}")


@click.command()
@registry_opt
@click.option("-o", "--out", "out_dir", default=".", type=click.Path(file_okay=False, path_type=pathlib.Path), show_default=True)
@click.argument("ref", metavar="NAMESPACE:NAME@VERSION", callback=package_ref)
@one_line_errors
def fetch(url: str, out_dir: pathlib.Path, ref: PackageRef) -> None:
    """Download a module, its .tlog-proof, its .status-proof and its SBOM."""

    async def go(c: RegistryClient) -> list[pathlib.Path]:
        path = c.package_path(ref)
        meta = await c.get_json(path)
        out_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the first write
        stem = f"{ref.namespace}_{ref.name}_{ref.version}"  # labels and semver only: safe file names
        written = [out_dir / f"{stem}.wasm", out_dir / f"{stem}.wasm.tlog-proof"]
        written[0].write_bytes(await c.get(path + "/module.wasm"))
        written[1].write_bytes(await c.get(path + "/tlog-proof"))
        try:
            status = await c.get(path + "/status-proof")
        except RegistryError as e:  # a registry with no index root yet (503), or one from before status proofs (404)
            click.echo(f"no status proof: {e}", err=True)
        else:
            written.append(out_dir / f"{stem}.wasm.status-proof")
            written[-1].write_bytes(status)
        if meta["sbom"] is not None:
            written.append(out_dir / f"{stem}.sbom.json")
            written[-1].write_bytes(await c.get(path + "/sbom"))
        return written

    for p in with_client(url, go):
        click.echo(f"wrote {p}")


@click.group("key")
def key_group() -> None:
    """Grant or revoke a publisher key in a namespace."""


def _act(url: str, key_file: pathlib.Path, action: Action) -> None:
    signer = read_signer(key_file)
    with_client(url, lambda c: c.act(signer, action))
    click.echo(f"logged {action.action} in {action.namespace}")


@key_group.command("grant")
@registry_opt
@key_opt
@click.argument("namespace", callback=namespace_label)
@click.argument("vkey")
@one_line_errors
def key_grant(url: str, key_file: pathlib.Path, namespace: str, vkey: str) -> None:
    """Allow VKEY to publish, grant, revoke and yank in NAMESPACE."""
    _act(url, key_file, Action("key-grant", namespace, key=vkey, issued=int(time.time())))


@key_group.command("revoke")
@registry_opt
@key_opt
@click.argument("namespace", callback=namespace_label)
@click.argument("vkey")
@one_line_errors
def key_revoke(url: str, key_file: pathlib.Path, namespace: str, vkey: str) -> None:
    """Revoke VKEY in NAMESPACE: nothing it signs is accepted after this record."""
    _act(url, key_file, Action("key-revocation", namespace, key=vkey, issued=int(time.time())))


@click.command()
@registry_opt
@key_opt
@click.option("--reason", default="", help="Why (logged).")
@click.argument("ref", metavar="NAMESPACE:NAME@VERSION", callback=package_ref)
@one_line_errors
def yank(url: str, key_file: pathlib.Path, reason: str, ref: PackageRef) -> None:
    """Mark a release as yanked (it stays in the log; verifiers refuse it)."""
    _act(url, key_file, Action("yank", ref.namespace, name=ref.name, version=ref.version, issued=int(time.time()), reason=reason))
