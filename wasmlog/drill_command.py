"""`wasmlog drill`: the incident drill (wasmlog/drill.py) as a command."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import click

from tlog.runloop import run

from .common import UnusableInput


@click.command()
@click.option("--data", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Keep the drill's network, keys, agent and logs here (a new or empty directory). Default: a temporary directory, removed after.")
@click.option("--json", "as_json", is_flag=True, help='Print {"steps": [{"name", "ok", "at", "detail"}], "time_to_detect_s", "time_to_recover_s"}.')
@click.option("--grant-escalated", is_flag=True, hidden=True,
              help="(Testing the drill itself) the agent's profile also grants the attacker's new import, so step 4 must fail.")
def drill(data: pathlib.Path | None, as_json: bool, grant_escalated: bool) -> None:
    """Play the malicious-update incident on a local network it starts itself, checking every step.

    Exit status 0 only when every step behaved, 1 when one did not (or the network or agent could not start), 2 for an unusable --data."""
    from .drill import run_drill
    from .drill_parts import DrillError
    from .drill_steps import format_timeline

    if data is not None and data.exists() and any(data.iterdir()):
        raise UnusableInput(f"--data {data} is not empty: the drill starts from nothing")
    root = data if data is not None else pathlib.Path(tempfile.mkdtemp(prefix="wasmlog-drill-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        report = run(run_drill(root.resolve(), grant_escalated=grant_escalated))
    except DrillError as e:
        raise click.ClickException(f"drill: {e}") from None
    finally:
        if data is None:
            shutil.rmtree(root, ignore_errors=True)
    click.echo(json.dumps(report.as_json(), indent=1) if as_json else format_timeline(report))
    if not report.ok:
        raise SystemExit(1)
