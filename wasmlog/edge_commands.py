"""`wasmlog verify`: the edge verifier on the command line."""

from __future__ import annotations

import pathlib
import time

import click


@click.command()
@click.option("--policy", "policy_file", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The edge trust policy (TOML, spec/trust-policy.md).")
@click.option("--proof", "proof_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The module's tlog-proof (default: MODULE.tlog-proof).")
@click.option("--status", "status_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="The release's status proof (default: MODULE.status-proof, if it exists).")
@click.option("--sbom", "sbom_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Check this SBOM against the release's digest.")
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), help="Anti-rollback state: the newest checkpoint accepted per log.")
@click.option("--consistency", "consistency_file", type=click.Path(dir_okay=False, path_type=pathlib.Path), help="Offline consistency proof (base64 lines) between the stored and the proof's checkpoint.")
@click.option("--registry", "url", help="Online: fetch consistency proofs, the namespace's yanks and revocations, and the status proof if none is beside the module.")
@click.option("--now", type=int, help="POSIX seconds to judge freshness at (default: the clock).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.argument("module_file", metavar="MODULE.wasm", type=click.Path(dir_okay=False, path_type=pathlib.Path))
def verify(
    policy_file: pathlib.Path, proof_file: pathlib.Path | None, status_file: pathlib.Path | None, sbom_file: pathlib.Path | None, state_dir: pathlib.Path | None,
    consistency_file: pathlib.Path | None, url: str | None, now: int | None, as_json: bool, module_file: pathlib.Path,
) -> None:
    """Decide offline whether to run MODULE.wasm. Exit 0 if every check passes, 1 if one fails, 2 for unusable input."""
    from edge.verify_cli import (
        run_verify,  # imported when run: the verifier's start-up is what an edge node pays
    )

    code, line = run_verify(
        policy_file=policy_file, module_file=module_file, proof_file=proof_file or module_file.with_name(module_file.name + ".tlog-proof"),
        status_file=status_file or _if_exists(module_file.with_name(module_file.name + ".status-proof")),
        sbom_file=sbom_file, state_dir=state_dir, consistency_file=consistency_file, url=url,
        now=int(time.time()) if now is None else now, as_json=as_json,
    )
    click.echo(line, err=code != 0 and not as_json)
    raise SystemExit(code)


def _if_exists(path: pathlib.Path) -> pathlib.Path | None:
    return path if path.exists() else None
