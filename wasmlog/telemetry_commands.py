"""`wasmlog telemetry verify`, `wasmlog collector serve` and `wasmlog agent events` (the agent's telemetry)."""

from __future__ import annotations

import datetime
import json
import pathlib
from collections.abc import Iterator

import click

from tlog.httplimits import ServerLimits

from .common import run_app, server_limit_options, split_listen

DEFAULT_COLLECTOR_LISTEN = "127.0.0.1:4318"


def _time(value: str | None) -> int | None:
    """POSIX seconds or an ISO 8601 time (UTC unless it says otherwise), as POSIX nanoseconds."""
    if value is None:
        return None
    try:
        return int(float(value) * 1e9)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither POSIX seconds nor an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return int(t.timestamp() * 1e9)


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _spool_dir(path: pathlib.Path) -> pathlib.Path | None:
    for d in (path, path / "telemetry"):
        if (d / "data.mdb").is_file():
            return d
    return None


@click.command("events")
@click.option("--config", "config_file", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The agent's agent.toml.")
@click.option("--since", help="Only events at or after this time (POSIX seconds or ISO 8601).")
@click.option("--until", help="Only events before this time.")
@click.option("--module", "module", help="Only events of this module (its configured ref, or NS:NAME for every version).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def agent_events(config_file: pathlib.Path, since: str | None, until: str | None, module: str | None, as_json: bool) -> None:
    """Read the node's own telemetry spool, oldest first (the agent may be running)."""
    from edge.agent_config import ConfigError, parse_config
    from edge.telemetry_spool import Spool, SpoolError

    try:
        config = parse_config(config_file.read_text("utf-8"), config_file.resolve().parent)
        spool = Spool(config.data / "telemetry", config.telemetry.spool_bytes, readonly=True)
    except (OSError, UnicodeDecodeError, ConfigError, SpoolError) as e:
        raise click.exceptions.Exit(_fail(f"{config_file}: {e}")) from None
    low, high = _time(since), _time(until)
    try:
        for ev in spool.scan():
            ref = ev.attr("wasmlog.module.ref")
            if (low is not None and ev.time_ns < low) or (high is not None and ev.time_ns >= high):
                continue
            if module is not None and not (isinstance(ref, str) and (ref == module or ref.startswith(module + "@"))):
                continue
            if as_json:
                click.echo(json.dumps(ev.as_json()))
            else:
                click.echo(f"{_iso(ev.time_ns)}  seq {ev.seq}  {ev.name}  {ev.body}")
    except SpoolError as e:
        raise click.exceptions.Exit(_fail(str(e))) from None
    finally:
        spool.close()


@click.group("telemetry")
def telemetry_group() -> None:
    """The edge agent's telemetry: check an export or a spool."""


@telemetry_group.command("verify")
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--key", help="The node's telemetry vkey (or a file holding it): pins whose signatures count.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def telemetry_verify(source: pathlib.Path, key: str | None, as_json: bool) -> None:
    """Check SOURCE (an OTLP JSON export, JSON lines as the collector stores them, a collector's data
    directory: every segment and what retention dropped, or an agent's data directory or spool) for
    gaps, edits, reordering and bad chain-head signatures.

    Exit status 0 when everything verifies, 1 with each finding and where it is, 2 for unusable input."""
    from edge.telemetry_events import Event, EventError
    from edge.telemetry_otlp import export_items
    from edge.telemetry_spool import Spool, SpoolError
    from edge.telemetry_store import dropped_through, read_retention, segments, stored_items
    from edge.telemetry_verify import verify_events

    if key is not None and pathlib.Path(key).is_file():
        key = pathlib.Path(key).read_text().strip()
    spool_dir = _spool_dir(source) if source.is_dir() else None
    try:
        if spool_dir is not None:
            spool = Spool(spool_dir, 1 << 20, readonly=True)

            def spooled() -> Iterator[tuple[str, Event | EventError]]:
                for e in spool.scan():
                    yield f"spool seq {e.seq}", e

            try:
                report = verify_events(spooled(), key)
            finally:
                spool.close()
        elif source.is_dir() and segments(source):  # a collector's data directory
            try:
                retention = dropped_through(read_retention(source))
            except ValueError as e:
                raise click.exceptions.Exit(_fail(f"{source}: {e}")) from None
            report = verify_events(stored_items(source), key, retention)
        elif source.is_dir():
            raise click.exceptions.Exit(_fail(f"{source} holds no telemetry spool and no collector's logs.jsonl"))
        else:
            report = verify_events(export_items(source.read_bytes()), key)
    except (OSError, SpoolError) as e:
        raise click.exceptions.Exit(_fail(f"{source}: {e}")) from None
    except ValueError as e:  # a --key that is not a vkey
        raise click.exceptions.Exit(_fail(f"--key: {e}")) from None
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=1))
    else:
        for node, r in report.nodes.items():
            tail = r.last_seq - r.signed_through
            click.echo(f"node {node}: {r.events} events, seq {r.first_seq}..{r.last_seq}, {r.duplicates} redelivered, "
                       f"{r.declared_dropped} declared dropped, {r.retention_dropped} dropped by the collector's retention, signed through seq {r.signed_through}"
                       f"{' (key pinned)' if r.key_pinned else ' (key not pinned: pass --key)'}"
                       f"{f', {tail} events after the last signed head' if tail else ''}")
        for f in report.findings:
            click.echo(f"FAIL {f.kind} at {f.where}: {f.message}")
        click.echo("OK" if report.ok else "FAILED" if report.findings else "FAILED: no telemetry events found")
    if not report.ok:
        raise click.exceptions.Exit(1)


@click.group("collector")
def collector_group() -> None:
    """A small OTLP/HTTP JSON logs collector (for development networks and tests)."""


@collector_group.command("serve")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Where logs.jsonl is kept.")
@click.option("--listen", default=DEFAULT_COLLECTOR_LISTEN, show_default=True, help="HOST:PORT.")
@click.option("--retain-bytes", type=click.IntRange(64 << 10), default=1 << 30, show_default=True,
              help="Keep at most this many bytes of logs (segments of a quarter of it, at most 16 MiB; the oldest go first).")
@server_limit_options
def collector_serve(data: pathlib.Path, listen: str, retain_bytes: int, limits: ServerLimits) -> None:
    """Accept OTLP/HTTP JSON logs at POST /v1/logs; store them in DATA/logs.jsonl and its numbered
    segments; GET /v1/logs/export, GET /v1/logs/retention."""
    from edge.telemetry_collector import make_collector_app

    host, port = split_listen(listen)
    click.echo(f"wasmlog collector: http://{host}:{port}/v1/logs", err=True)
    run_app(make_collector_app(data, retain_bytes), host, port, limits=limits)


def _fail(message: str, code: int = 2) -> int:
    click.echo(f"error: {message}", err=True)
    return code
