"""docker-compose.yml and the Dockerfile, checked without a container engine (none runs here)."""

from __future__ import annotations

import json
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


SHARED = {"postgres", "s3", "s3-init", "registry-shared-1", "registry-shared-2"}  # the "shared" profile


def test_every_service_runs_a_real_command_with_real_options() -> None:
    assert set(SERVICES) == {"init", "registry", "witness1", "witness2", "witness3", "monitor", "mirror", *SHARED}
    assert "wasmlog" in (ROOT / "Dockerfile").read_text()
    for name, svc in SERVICES.items():
        if name in ("init", "s3-init") or "image" in svc:  # scripts, and the PostgreSQL and S3 servers' own images
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


def test_the_shared_profile_is_one_registry_on_the_database_and_bucket_it_starts() -> None:
    """Two registry processes on the profile's PostgreSQL and S3 server, with the standard variables, the
    bucket s3-init creates, and a log key of their own (a second log must never sign with the first's key)."""
    assert all(SERVICES[name].get("profiles") == ["shared"] for name in SHARED)
    assert "shared" in (ROOT / "Dockerfile").read_text()  # the image has psycopg and botocore
    bucket = SERVICES["s3-init"]["entrypoint"][-1]
    assert (ROOT / "docker" / "create-bucket.py").exists()
    db = SERVICES["postgres"]["environment"]
    registries = [SERVICES["registry-shared-1"], SERVICES["registry-shared-2"]]
    for svc in registries:
        args = svc["command"]
        store, objects, key = (args[args.index(o) + 1] for o in ("--store", "--objects", "--key"))
        assert store == f"postgresql://{db['POSTGRES_USER']}@postgres:5432/{db['POSTGRES_DB']}"
        assert objects.startswith(f"s3://{bucket}/")
        assert key == "/keys/shared-log.key" and key != SERVICES["registry"]["command"][SERVICES["registry"]["command"].index("--key") + 1]
        env = svc["environment"]
        assert env["PGPASSWORD"] == db["POSTGRES_PASSWORD"]
        assert set(env) == {"PGPASSWORD", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", env["AWS_ENDPOINT_URL"]).groups()  # type: ignore[union-attr]
        assert host == "s3" and f"-s3.port={port}" in SERVICES["s3"]["command"]
        assert set(svc["depends_on"]) == {"init", "postgres", "s3-init"}
    assert registries[0]["command"][:-1] == registries[1]["command"][:-1]  # one registry: the same store and objects
    s3_config = json.loads((ROOT / "docker" / "s3.json").read_text())
    creds = {(c["accessKey"], c["secretKey"]) for i in s3_config["identities"] for c in i.get("credentials", [])}
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) in creds
