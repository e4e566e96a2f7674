"""docker-compose.yml and the Dockerfile, checked without a container engine (none runs here)."""

from __future__ import annotations

import pathlib
import re

import click
import yaml

from wasmlog.cli import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
INIT = (ROOT / "docker" / "init-keys.sh").read_text()
SERVICES = COMPOSE["services"]


def resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """Walk the wasmlog command tree along args; return the leaf command and its arguments."""
    cmd: click.Command = main
    i = 0
    while isinstance(cmd, click.Group):
        name = args[i]
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"wasmlog has no command {' '.join(args[: i + 1])}"
        cmd, i = sub, i + 1
    return cmd, args[i:]


def options_of(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}


def test_every_service_runs_a_real_command_with_real_options() -> None:
    assert set(SERVICES) == {"init", "registry", "witness1", "witness2", "witness3", "monitor", "mirror"}
    assert "wasmlog" in (ROOT / "Dockerfile").read_text()
    for name, svc in SERVICES.items():
        if name == "init":
            continue
        cmd, rest = resolve(svc["command"])
        declared = options_of(cmd)
        for token in rest:
            if token.startswith("--"):
                assert token in declared, f"{name}: {token} is not an option of {cmd.name}"
        required = {p.opts[0] for p in cmd.params if isinstance(p, click.Option) and p.required}
        assert required <= set(rest), f"{name} misses {required - set(rest)}"


def test_ports_volumes_and_references() -> None:
    volumes = set(COMPOSE["volumes"])
    keys_made = set(re.findall(r"(\w[\w-]*\.(?:key|txt|toml))", INIT)) | {f"witness{i}.key" for i in (1, 2, 3)}
    for name, svc in SERVICES.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            assert source.startswith(".") or source in volumes, f"{name}: volume {source} is not declared"
        args = svc.get("command", [])
        if "--listen" in args:
            port = args[args.index("--listen") + 1].rsplit(":", 1)[1]
            assert any(p.split(":")[-1] == port for p in svc.get("ports", [])), f"{name}: port {port} not published"
        for arg in args:
            for ref in re.findall(r"/keys/([\w.-]+)", arg):
                assert ref in keys_made, f"{name}: /keys/{ref} is never created by init"
            for host in re.findall(r"http://([\w-]+):", arg):
                assert host in SERVICES, f"{name}: {host} is not a service"
        for dep in svc.get("depends_on", []):
            assert dep in SERVICES
    peers = [a for a in SERVICES["witness1"]["command"] if a.startswith("http://witness")]
    assert peers == ["http://witness2:7381", "http://witness3:7381"]
