"""The ``wasmlog`` command: the log and witness commands of tlog.cli plus the registry's."""

from __future__ import annotations

import asyncio
import functools
import pathlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import click

from tlog.addipc import AddServer
from tlog.cli import (
    DEFAULT_HEALTHZ_MAX_AGE,
    DEFAULT_LISTEN,
    configure_logging,
    keygen,
    log_group,
    read_witness_policy,
    run_app,
    sequencer_options,
    serve_with_front_ends,
    server_limit_options,
    split_listen,
    witness_budget,
    witness_group,
    witness_rounds_option,
)
from tlog.errors import TlogError
from tlog.frontend import ADD_SOCKET
from tlog.httplimits import ServerLimits
from tlog.keys import read_signer
from tlog.log import Log
from tlog.runloop import run
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.witnessing import DEFAULT_WITNESS_TIMEOUT
from wasmlog.agent_command import agent_group  # TEMPORARY (issue 14, k14-agent)

from .audit_state import AuditState, AuditStateError
from .blobs import BlobStore
from .client import RegistryClient
from .frontend import CHECK_SOCKET, make_registry_frontend_app
from .network import NetworkConfig, run_network
from .record import Action, PackageRef, check_label, parse_package_ref
from .sbom import CYCLONEDX, SPDX
from .server import error_body, make_app, status_for
from .service import Registry

T = TypeVar("T")


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Log lines as text or one JSON object each.")
def main(verbose: int, log_format: str) -> None:
    """wasmlog: a transparency log and registry for WebAssembly modules."""
    configure_logging(verbose, log_format)


main.add_command(keygen)
main.add_command(log_group)
main.add_command(witness_group)
main.add_command(agent_group, "agent")  # TEMPORARY (issue 14, k14-agent): the lead moves it to wasmlog/cli.py


def one_line_errors(f: Callable[..., T]) -> Callable[..., T]:
    """Turn our errors, network errors and bad files into one line and exit status 1."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return f(*args, **kwargs)
        except (TlogError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            raise click.ClickException(str(e) or type(e).__name__) from None

    return wrapper


class UnusableInput(click.ClickException):
    """A file given on the command line that cannot be used: exit status 2, one line."""

    exit_code = 2


def load_audit_state(state_dir: pathlib.Path | None) -> AuditState:
    """The audit state saved in state_dir (fresh when there is none); an unusable file is exit status 2."""
    try:
        return AuditState.load(state_dir)
    except AuditStateError as e:
        raise UnusableInput(str(e)) from None


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


@main.group("registry")
def registry_group() -> None:
    """Run a registry with its embedded log."""


@registry_group.command("serve")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path), help="Data directory (LMDB log, blobs).")
@key_opt
@click.option("--witness-policy", "policy_file", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="A c2sp.org/tlog-policy file: publish only checkpoints its witness quorum cosigned.")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@sequencer_options
@witness_rounds_option
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="With N > 1, N HTTP front-end processes share the port, check publishes and write blobs; this one keeps the state and the log.")
@server_limit_options
@one_line_errors
def registry_serve(
    data: pathlib.Path, key_file: pathlib.Path, policy_file: pathlib.Path | None, listen: str,
    interval_ms: int, batch_max: int, max_pending: int, witness_rounds_per_day: int | None, workers: int, limits: ServerLimits,
) -> None:
    """Serve the registry API under /api/v1/ and its log under /log/."""
    host, port = split_listen(listen)
    signer = read_signer(key_file)
    policy = read_witness_policy(policy_file, signer) if policy_file else None
    store = LMDBLogStore(str(data / "log"))
    try:
        sequencer = Sequencer(Log(store, signer, witnessed=policy is not None), interval=interval_ms / 1000,
                              batch_max=batch_max, max_pending=max_pending, witness_budget=witness_budget(witness_rounds_per_day))
        registry = Registry(sequencer=sequencer, blobs=BlobStore(str(data / "blobs")))
        click.echo(f"registry at http://{host}:{port}/api/v1/ with its log {sequencer.log.origin} at /log/")
        app = make_app(registry, sequencer, witness_policy=policy, witness_timeout=DEFAULT_WITNESS_TIMEOUT,
                       max_checkpoint_age=DEFAULT_HEALTHZ_MAX_AGE)
        if workers <= 1:
            run_app(app, host, port, limits=limits)
            return
        serve_with_front_ends(
            app, workers,
            lambda ipc_dir: ["registry", "registry", "front", "--ipc", ipc_dir, "--data", str(data), "--listen", listen],
            {
                CHECK_SOCKET: lambda _: AddServer(registry.check_entry, status_for, error_body),
                ADD_SOCKET: lambda _: AddServer(registry.submit_entry, status_for, error_body),
            },
            limits,
        )
    finally:
        store.close()


@registry_group.command("front", hidden=True)
@click.option("--ipc", "ipc_dir", required=True, type=click.Path(exists=True, file_okay=False), help="The registry process's socket directory.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="The registry's data directory (blobs are written here).")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True)
@server_limit_options
def registry_front(ipc_dir: str, data: str, listen: str, limits: ServerLimits) -> None:
    """An HTTP front-end process of `registry serve --workers N` (started by it, not by hand)."""
    host, port = split_listen(listen)
    run_app(make_registry_frontend_app(ipc_dir, data), host, port, reuse_port=True, limits=limits)


@main.command()
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


@main.command()
@registry_opt
@click.option("-o", "--out", "out_dir", default=".", type=click.Path(file_okay=False, path_type=pathlib.Path), show_default=True)
@click.argument("ref", metavar="NAMESPACE:NAME@VERSION", callback=package_ref)
@one_line_errors
def fetch(url: str, out_dir: pathlib.Path, ref: PackageRef) -> None:
    """Download a module, its .tlog-proof and its SBOM."""

    async def go(c: RegistryClient) -> list[pathlib.Path]:
        path = c.package_path(ref)
        meta = await c.get_json(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{ref.namespace}_{ref.name}_{ref.version}"  # labels and semver only: safe file names
        written = [out_dir / f"{stem}.wasm", out_dir / f"{stem}.wasm.tlog-proof"]
        written[0].write_bytes(await c.get(path + "/module.wasm"))
        written[1].write_bytes(await c.get(path + "/tlog-proof"))
        if meta["sbom"] is not None:
            written.append(out_dir / f"{stem}.sbom.json")
            written[-1].write_bytes(await c.get(path + "/sbom"))
        return written

    for p in with_client(url, go):
        click.echo(f"wrote {p}")


@main.group("key")
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


@main.command()
@registry_opt
@key_opt
@click.option("--reason", default="", help="Why (logged).")
@click.argument("ref", metavar="NAMESPACE:NAME@VERSION", callback=package_ref)
@one_line_errors
def yank(url: str, key_file: pathlib.Path, reason: str, ref: PackageRef) -> None:
    """Mark a release as yanked (it stays in the log; verifiers refuse it)."""
    _act(url, key_file, Action("yank", ref.namespace, name=ref.name, version=ref.version, issued=int(time.time()), reason=reason))


@main.command()
@click.option("--data", default="wasmlog-data", show_default=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT of the registry; witnesses take the next three ports.")
@server_limit_options
@one_line_errors
def up(data: pathlib.Path, listen: str, limits: ServerLimits) -> None:
    """Start the whole network on embedded defaults: a registry with its log and three witnesses (quorum 2)."""
    host, port = split_listen(listen)
    run(run_network(NetworkConfig(data=data, host=host, port=port, limits=limits)))


@main.command()
@click.option("--policy", "policy_file", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The edge trust policy (TOML, spec/trust-policy.md).")
@click.option("--proof", "proof_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The module's tlog-proof (default: MODULE.tlog-proof).")
@click.option("--sbom", "sbom_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Check this SBOM against the release's digest.")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Anti-rollback state: the newest checkpoint accepted per log.")
@click.option("--consistency", "consistency_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Offline consistency proof (base64 lines) between the stored and the proof's checkpoint.")
@click.option("--registry", "url", help="Online: fetch consistency proofs and the namespace's yanks and revocations.")
@click.option("--now", type=int, help="POSIX seconds to judge freshness at (default: the clock).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("module_file", metavar="MODULE.wasm", type=click.Path(dir_okay=False, path_type=pathlib.Path))
def verify(
    policy_file: pathlib.Path, proof_file: pathlib.Path | None, sbom_file: pathlib.Path | None, state_dir: pathlib.Path | None,
    consistency_file: pathlib.Path | None, url: str | None, now: int | None, as_json: bool, module_file: pathlib.Path,
) -> None:
    """Decide offline whether to run MODULE.wasm. Exit 0 if every check passes, 1 if one fails, 2 for unusable input."""
    from .verify_cli import run_verify

    code, line = run_verify(
        policy_file=policy_file, module_file=module_file, proof_file=proof_file or module_file.with_name(module_file.name + ".tlog-proof"),
        sbom_file=sbom_file, state_dir=state_dir, consistency_file=consistency_file, url=url,
        now=int(time.time()) if now is None else now, as_json=as_json,
    )
    click.echo(line, err=code != 0 and not as_json)
    raise SystemExit(code)


def _verifiers(vkeys: tuple[str, ...], policy_file: pathlib.Path | None) -> list:  # type: ignore[type-arg]
    from tlog.note import verifier_from_vkey

    from .verify import parse_trust_policy

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


def _with_opts(opts):  # type: ignore[no-untyped-def]
    def deco(f):  # type: ignore[no-untyped-def]
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@main.command()
@click.argument("url")
@_with_opts(audit_opts)
@click.option("--no-blobs", is_flag=True, help="Do not fetch modules and SBOMs to check their digests and imports.")
@one_line_errors
def audit(url: str, vkeys: tuple[str, ...], policy_file: pathlib.Path | None, state_dir: pathlib.Path | None, no_blobs: bool) -> None:
    """Replay a log from its tiles: recompute every hash, check signatures, re-derive the registry.

    Prints a JSON report; exit status 1 if there is any finding, 2 if the --state file is unusable.
    """
    import sys

    from .audit import dumps_report, make_auditor

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


@main.command()
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
    """Report releases, key changes, yanks, unexpected signers and capability escalations as JSON lines."""
    import json
    import sys

    from .audit import make_auditor

    verifiers = _verifiers(vkeys, policy_file)
    state = load_audit_state(state_dir)

    async def go() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            log_url, _ = await _log_and_registry(session, url)
            pending: list[dict] = []  # type: ignore[type-arg]
            auditor = make_auditor(log_url=log_url, session=session, verifiers=verifiers, state=state,
                                   namespaces=frozenset(namespaces), expected_keys=frozenset(expected),
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


@main.command()
@registry_opt
@click.option("--json", "as_json", is_flag=True)
@click.argument("old", metavar="NAMESPACE:NAME@V1", callback=package_ref)
@click.argument("new", metavar="NAMESPACE:NAME@V2", callback=package_ref)
@one_line_errors
def diff(url: str, as_json: bool, old: PackageRef, new: PackageRef) -> None:
    """The SBOM and import differences between two releases."""
    import json

    from .diff import diff_releases, format_diff

    async def go(c: RegistryClient) -> dict:  # type: ignore[type-arg]
        metas, sboms = [], []
        for ref in (old, new):
            meta = await c.get_json(c.package_path(ref))
            metas.append(meta)
            sboms.append(await c.get(c.package_path(ref) + "/sbom") if meta["sbom"] else None)
        return diff_releases(metas[0], metas[1], sboms[0], sboms[1])

    d = with_client(url, go)
    click.echo(json.dumps(d, indent=1) if as_json else format_diff(d))


@main.command()
@click.option("--from", "source", required=True, help="The source registry's URL.")
@click.option("--policy", "policy_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), help="Edge trust policy: the log key and witness quorum every copied checkpoint must meet.")
@click.option("--data", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--listen", default="127.0.0.1:7390", show_default=True)
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between copy rounds.")
@server_limit_options
@one_line_errors
def mirror(source: str, policy_file: pathlib.Path, data: pathlib.Path, listen: str, interval: float, limits: ServerLimits) -> None:
    """Replicate a registry's log and blobs, verifying everything, and serve the same read API."""
    from .mirror import run_mirror
    from .verify import parse_trust_policy

    host, port = split_listen(listen)
    policy = parse_trust_policy(policy_file.read_text())
    app = run_mirror(source=source, policy=policy, data=data, interval=interval)
    click.echo(f"mirror of {source} at http://{host}:{port}/ (data in {data})")
    run_app(app, host, port, limits=limits)
