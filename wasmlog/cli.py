"""The ``wasmlog`` command: one click tree; each command family lives in its own module."""

from __future__ import annotations

import json
import logging
import pathlib
import re
import sys

import click

from tlog.httplimits import ServerLimits
from tlog.keys import write_key_pair
from tlog.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    OWN_KEY_NAME_RULE,
    Ed25519Signer,
    is_own_key_name,
)
from tlog.runloop import run

from .agent_command import agent_group
from .audit_commands import audit, diff, mirror, monitor
from .common import DEFAULT_LISTEN, one_line_errors, server_limit_options, split_listen
from .drill_command import drill
from .edge_commands import verify
from .log_commands import log_group
from .network import NetworkConfig, run_network
from .registry_commands import fetch, key_group, publish, registry_group, yank
from .telemetry_commands import agent_events, collector_group, telemetry_group
from .witness_commands import witness_group


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
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines as text or one JSON object each.")
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


@main.command()
@click.option("--data", default="wasmlog-data", show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT of the registry; witnesses take the next three ports.")
@server_limit_options
@one_line_errors
def up(data: pathlib.Path, listen: str, limits: ServerLimits) -> None:
    """Start the whole network on embedded defaults: a registry with its log and three witnesses (quorum 2)."""
    host, port = split_listen(listen)
    run(run_network(NetworkConfig(data=data, host=host, port=port, limits=limits)))


for command in (log_group, witness_group, registry_group, publish, fetch, key_group, yank, verify, audit, monitor, diff, mirror, agent_group, drill):
    main.add_command(command)
for command in (telemetry_group, collector_group):
    main.add_command(command)
agent_group.add_command(agent_events)
