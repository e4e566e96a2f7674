"""`wasmlog agent serve --config agent.toml`: the edge agent (edge/agent.py)."""

from __future__ import annotations

import asyncio
import pathlib
import signal

import click

from tlog.httplimits import ServerLimits
from tlog.runloop import new_loop

from .common import server_limit_options


@click.group("agent")
def agent_group() -> None:
    """Run verified WebAssembly modules, confined to the capabilities their profile grants."""


@agent_group.command("serve")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="agent.toml: trust policy, registries, data directory, listen address, profiles, modules.")
@server_limit_options
def agent_serve(config_file: pathlib.Path, limits: ServerLimits) -> None:
    """Admit the configured modules, serve them WAGI-style on /run/NS/NAME, sweep every sweep_interval.

    Exit status 2 for a config, trust policy, state file, artifact key or telemetry spool that cannot be used (one line naming the key or file)."""
    from edge.agent_config import ConfigError, parse_config
    from edge.agent_state import StateError
    from edge.artifacts import KeyFileError
    from edge.telemetry_spool import SpoolError
    from edge.verify import VerifyError

    try:
        text = config_file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise click.exceptions.Exit(_fail(f"cannot read {config_file}: {e}")) from None
    try:
        config = parse_config(text, config_file.resolve().parent)
    except ConfigError as e:
        raise click.exceptions.Exit(_fail(f"{config_file}: {e}")) from None
    from edge.agent_server import serve_agent

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_agent(config, limits, stop)

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(go())
    except (VerifyError, StateError, KeyFileError, SpoolError) as e:  # the trust policy, state.json, the artifact key, the spool
        raise click.exceptions.Exit(_fail(str(e))) from None
    except OSError as e:  # the listen address is taken, the data directory cannot be written
        raise click.exceptions.Exit(_fail(f"agent: {e}", 1)) from None


def _fail(message: str, code: int = 2) -> int:
    click.echo(f"error: {message}", err=True)
    return code
