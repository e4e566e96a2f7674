"""`wasmlog witness`: a c2sp.org/tlog-witness cosigner."""

from __future__ import annotations

import pathlib

import click

from tlog.errors import TlogError
from tlog.httplimits import ServerLimits
from tlog.keys import read_signer
from tlog.note import (
    ALG_COSIGNATURE_V1,
)

from .common import run_app, server_limit_options, split_listen


@click.group("witness")
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
