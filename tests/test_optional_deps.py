"""Optional dependencies stay optional: the commands run with uvloop, the SBOM libraries and the
shared-storage drivers hidden.

Each command runs in a subprocess whose first import hook refuses the hidden packages, as if
they were not installed (Windows has no uvloop; `pip install wasmlog` has no SBOM libraries).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
from helpers import free_port, wait_ready
from test_verify import MODULE

from tlog.note import Ed25519Signer

OPTIONAL = ("uvloop", "cyclonedx", "spdx_tools", "psycopg", "boto3", "botocore")
REGISTRY_KEY = Ed25519Signer.generate("optional.example/log")
ALICE = Ed25519Signer.generate("alice")

# Run the wasmlog command line (python -m wasmlog) with the named top-level packages hidden.
_WITHOUT = '''
import runpy, sys

class HideOptional:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {hidden!r}:
            raise ImportError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, HideOptional())
runpy.run_module("{module}", run_name="__main__", alter_sys=True)
'''


def without(hidden: tuple[str, ...], *args: str, module: str = "wasmlog") -> list[str]:
    return [sys.executable, "-c", _WITHOUT.format(hidden=set(hidden), module=module), *args]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(without(OPTIONAL, *args), capture_output=True, text=True, timeout=120, check=False)


def test_the_hook_hides_the_optional_packages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "probe.py").write_text("import importlib, sys\nfor m in sys.argv[1:]:\n"
                                       "    try:\n        importlib.import_module(m)\n    except ImportError:\n        print('hidden', m)\n")
    out = subprocess.run(without(OPTIONAL, *OPTIONAL, module="probe"), capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split("\n")[:-1] == [f"hidden {m}" for m in OPTIONAL]


def test_verify_help_without_optional_packages() -> None:
    out = run("verify", "--help")
    assert out.returncode == 0 and "MODULE.wasm" in out.stdout, out.stderr


def test_log_serve_on_shared_storage_names_the_extra_without_its_drivers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "log.key"
    key.write_text(REGISTRY_KEY.private_key + "\n")
    out = run("log", "serve", "--key", str(key), "--store", "postgresql://x@127.0.0.1:1/x", "--objects", "s3://bucket/p")
    assert out.returncode == 1 and "wasmlog[shared]" in out.stderr, out.stderr


def test_log_serve_on_shared_storage_needs_botocore_but_not_boto3(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """boto3 is no run-time dependency (the bucket clients are our own; botocore resolves the endpoint and
    credentials): with boto3 hidden, log serve gets past the bucket's client to the database."""
    key = tmp_path / "log.key"
    key.write_text(REGISTRY_KEY.private_key + "\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"}
    out = subprocess.run(without(("boto3",), "log", "serve", "--key", str(key), "--store", "postgresql://x@127.0.0.1:1/x", "--objects", "s3://bucket/p"),
                         capture_output=True, text=True, timeout=120, check=False, env=env)
    assert out.returncode == 1 and "the log's database" in out.stderr and "wasmlog[shared]" not in out.stderr, out.stderr


async def _ready(url: str, server: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, url + "/log", server)


def test_registry_publish_and_edge_verify_without_optional_packages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A registry and its clients on asyncio's loop: a release without SBOM is published and verified
    online; a release with an SBOM is refused with the extra to install, not a traceback."""
    (tmp_path / "registry.key").write_text(REGISTRY_KEY.private_key + "\n")
    (tmp_path / "alice.key").write_text(ALICE.private_key + "\n")
    module = tmp_path / "hello.wasm"
    module.write_bytes(MODULE)
    (tmp_path / "sbom.json").write_text('{"bomFormat":"CycloneDX","specVersion":"1.5","version":1}')
    (tmp_path / "policy.toml").write_text(f'tlog_policy = """\nlog {REGISTRY_KEY.vkey}\nquorum none\n"""\n')
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        without(OPTIONAL, "registry", "serve", "--data", str(tmp_path / "data"), "--key", str(tmp_path / "registry.key"),
                "--listen", url.removeprefix("http://"), "--interval-ms", "5"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        asyncio.run(_ready(url, server))
        key = ("--registry", url, "--key", str(tmp_path / "alice.key"))
        published = run("publish", *key, "acme:hello@1.0.0", str(module))
        assert published.returncode == 0, published.stderr
        verified = run("verify", "--policy", str(tmp_path / "policy.toml"), "--registry", url, "--state", str(tmp_path / "state"), str(module))
        assert verified.returncode == 0 and verified.stdout.startswith("OK acme:hello@1.0.0"), verified.stdout + verified.stderr
        newer = tmp_path / "hello-1.0.1.wasm"  # in a bigger tree: the online refresh fetches the consistency proof
        newer.write_bytes(MODULE)
        assert run("publish", *key, "acme:hello@1.0.1", str(newer)).returncode == 0
        verified = run("verify", "--policy", str(tmp_path / "policy.toml"), "--registry", url, "--state", str(tmp_path / "state"), str(newer))
        assert verified.returncode == 0 and verified.stdout.startswith("OK acme:hello@1.0.1"), verified.stdout + verified.stderr
        offline = run("verify", "--policy", str(tmp_path / "policy.toml"), "--state", str(tmp_path / "state"), str(module))
        assert offline.returncode == 1 and "consistency-required" in offline.stderr, offline.stdout + offline.stderr

        refused = run("publish", *key, "--sbom", str(tmp_path / "sbom.json"), "acme:hello@2.0.0", str(module))
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "registry answered 415" in refused.stderr and "pip install 'wasmlog[registry]'" in refused.stderr, refused.stderr
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert b"Traceback" not in stderr, stderr.decode()
