"""`wasmlog audit`, monitor, diff, mirror: checking a registry from the outside."""

from __future__ import annotations

import asyncio
import pathlib

import aiohttp
import click

from registry.audit_state import AuditState, AuditStateError
from registry.client import RegistryClient
from registry.record import PackageRef
from tlog.httplimits import ServerLimits
from tlog.runloop import run

from .common import (
    UnusableInput,
    _with_opts,
    one_line_errors,
    package_ref,
    registry_opt,
    run_app,
    server_limit_options,
    split_listen,
    with_client,
)


def load_audit_state(state_dir: pathlib.Path | None) -> AuditState:
    """The audit state saved in state_dir (fresh when there is none); an unusable file is exit status 2."""
    try:
        return AuditState.load(state_dir)
    except AuditStateError as e:
        raise UnusableInput(str(e)) from None


def _verifiers(vkeys: tuple[str, ...], policy_file: pathlib.Path | None) -> list:  # type: ignore[type-arg]
    from registry.trust_policy import parse_trust_policy
    from tlog.note import verifier_from_vkey

    verifiers = [verifier_from_vkey(v) for v in vkeys]
    if policy_file is not None:
        verifiers += [log.verifier for log in parse_trust_policy(policy_file.read_text()).tlog.logs]
    if not verifiers:
        raise click.UsageError("give the log's key with --vkey or a trust policy with --policy")
    return verifiers


async def _log_and_registry(session: aiohttp.ClientSession, url: str) -> tuple[str, str | None]:
    """A registry URL serves its log under /log/; a plain log URL serves /checkpoint itself."""
    url = url.rstrip("/")
    async with session.get(url + "/checkpoint") as r:
        if r.status == 200:
            return url, None
    return url + "/log", url


audit_opts = [
    click.option("--vkey", "vkeys", multiple=True, help="The log's verifier key (repeatable)."),
    click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="Take the log keys from an edge trust policy."),
    click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Resume from (and save) progress here."),
]




@click.command()
@click.argument("url")
@_with_opts(audit_opts)
@click.option("--no-blobs", is_flag=True, help="Do not fetch modules and SBOMs to check their digests and imports.")
@one_line_errors
def audit(url: str, vkeys: tuple[str, ...], policy_file: pathlib.Path | None, state_dir: pathlib.Path | None, no_blobs: bool) -> None:
    """Replay a log from its tiles: recompute every hash, check signatures, re-derive the registry.

    Prints a JSON report; exit status 1 if there is any finding, 2 if the --state file is unusable.
    """
    import sys

    from registry.audit import dumps_report, make_auditor

    verifiers = _verifiers(vkeys, policy_file)
    state = load_audit_state(state_dir)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            width = 40
            filled = width * done // max(total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} entries")
            sys.stderr.flush()

    async def go() -> dict:  # type: ignore[type-arg]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            log_url, registry_url = await _log_and_registry(session, url)
            auditor = make_auditor(log_url=log_url, session=session, verifiers=verifiers, state=state,
                                   registry_url=None if no_blobs else registry_url)
            await auditor.run(progress)
            return auditor.report(log_url)

    report = run(go())
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    if state_dir is not None:
        state.save(state_dir)
    click.echo(dumps_report(report))
    if report["findings"]:
        raise SystemExit(1)


@click.command()
@click.argument("url")
@_with_opts(audit_opts)
@click.option("--namespace", "namespaces", multiple=True, required=True, help="A namespace to watch (repeatable).")
@click.option("--expect-key", "expected", multiple=True, help="A vkey the owner expects to sign; any other signer is reported.")
@click.option("--follow", is_flag=True, help="Keep following the log.")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between polls with --follow.")
@click.option("--webhook", help="Also POST each event as JSON to this URL.")
@one_line_errors
def monitor(
    url: str, vkeys: tuple[str, ...], policy_file: pathlib.Path | None, state_dir: pathlib.Path | None,
    namespaces: tuple[str, ...], expected: tuple[str, ...], follow: bool, interval: float, webhook: str | None,
) -> None:
    """Report releases, key changes, yanks, unexpected signers, capability escalations and SBOM changes as JSON lines."""
    import json
    import sys

    from registry.audit import make_auditor

    verifiers = _verifiers(vkeys, policy_file)
    state = load_audit_state(state_dir)

    async def go() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            log_url, registry_url = await _log_and_registry(session, url)
            pending: list[dict] = []  # type: ignore[type-arg]
            auditor = make_auditor(log_url=log_url, session=session, verifiers=verifiers, state=state,
                                   namespaces=frozenset(namespaces), expected_keys=frozenset(expected),
                                   sbom_source=None if registry_url is None else RegistryClient(registry_url, session),
                                   on_event=lambda e: pending.append(e.as_json()))
            while True:
                await auditor.run()
                for event in pending:
                    click.echo(json.dumps(event, sort_keys=True))
                    if webhook:
                        try:
                            async with session.post(webhook, json=event) as r:
                                await r.read()
                        except aiohttp.ClientError as e:
                            print(f"webhook: {e}", file=sys.stderr)
                pending.clear()
                for f in auditor.findings:
                    click.echo(json.dumps({"event": "finding", **f.as_json()}, sort_keys=True))
                found = len(auditor.findings)
                auditor.findings.clear()
                if state_dir is not None:
                    state.save(state_dir)
                if not follow:
                    return found
                await asyncio.sleep(interval)

    if run(go()):
        raise SystemExit(1)


@click.command()
@registry_opt
@click.option("--json", "as_json", is_flag=True)
@click.argument("old", metavar="NAMESPACE:NAME@V1", callback=package_ref)
@click.argument("new", metavar="NAMESPACE:NAME@V2", callback=package_ref)
@one_line_errors
def diff(url: str, as_json: bool, old: PackageRef, new: PackageRef) -> None:
    """The SBOM and import differences between two releases."""
    import json

    from registry.diff import format_diff

    d = with_client(url, lambda c: c.release_diff(old, new))
    click.echo(json.dumps(d, indent=1) if as_json else format_diff(d))


@click.command()
@click.option("--from", "source", required=True, help="The source registry's URL.")
@click.option("--policy", "policy_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="Edge trust policy: the log key and witness quorum every copied checkpoint must meet.")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--listen", default="127.0.0.1:7390", show_default=True)
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between copy rounds.")
@server_limit_options
@one_line_errors
def mirror(source: str, policy_file: pathlib.Path, data: pathlib.Path, listen: str, interval: float, limits: ServerLimits) -> None:
    """Replicate a registry's log and blobs, verifying everything, and serve the same read API."""
    from registry.mirror import run_mirror
    from registry.trust_policy import parse_trust_policy

    host, port = split_listen(listen)
    policy = parse_trust_policy(policy_file.read_text())
    app = run_mirror(source=source, policy=policy, data=data, interval=interval)
    click.echo(f"mirror of {source} at http://{host}:{port}/ (data in {data})")
    run_app(app, host, port, limits=limits)
