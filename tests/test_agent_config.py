"""agent.toml: every kind of mistake is one error naming its key; the issue's example parses."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.agent_cgi import CgiError, cgi_environment, parse_cgi
from edge.agent_config import ConfigError, check_pattern, parse_config
from tlog.note import Ed25519Signer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = pathlib.Path("/etc/agent")

EXAMPLE = '''
trust_policy = "trust-policy.toml"
registries = ["http://127.0.0.1:7380"]
data = "agent-data"
listen = "127.0.0.1:7400"
sweep_interval = 300            # seconds

[profiles.stdout]
imports = ["wasi_snapshot_preview1.fd_write"]
memory_mb = 16
timeout_ms = 500
env = {}

[[modules]]
ref = "acme:hello@1.0.0"
profile = "stdout"
'''


def test_the_issue_example_parses() -> None:
    c = parse_config(EXAMPLE, BASE)
    assert c.trust_policy == BASE / "trust-policy.toml" and c.data == BASE / "agent-data"
    assert c.registries == ("http://127.0.0.1:7380",) and (c.host, c.port) == ("127.0.0.1", 7400) and c.sweep_interval == 300
    p = c.profiles["stdout"]
    assert (p.imports, p.memory_mb, p.timeout_ms, p.fuel, dict(p.env)) == (("wasi_snapshot_preview1.fd_write",), 16, 500, None, {})
    assert p.max_in_flight == 16  # the default: README "The config"
    assert parse_config(EXAMPLE.replace("timeout_ms = 500", "timeout_ms = 500\nmax_in_flight = 3"), BASE).profiles["stdout"].max_in_flight == 3
    (m,) = c.modules
    assert (m.ref, m.namespace, m.name, m.version, m.profile) == ("acme:hello@1.0.0", "acme", "hello", "1.0.0", "stdout")
    assert c.module("acme", "hello") is m and c.module("acme", "other") is None


def test_defaults_and_an_unpinned_ref() -> None:
    text = EXAMPLE.replace('listen = "127.0.0.1:7400"\n', "").replace("sweep_interval = 300", "").replace("acme:hello@1.0.0", "acme:hello")
    c = parse_config(text, BASE)
    assert (c.host, c.port, c.sweep_interval) == ("127.0.0.1", 7400, 300)  # loopback by default
    assert (c.admin_host, c.admin_port) == ("127.0.0.1", 7401)  # the admin API too, on a port of its own
    assert c.modules[0].version is None


def test_the_admin_listener() -> None:
    c = parse_config(EXAMPLE.replace('listen = "127.0.0.1:7400"', 'listen = "0.0.0.0:8080"\nadmin_listen = "[::1]:9090"'), BASE)
    assert (c.host, c.port, c.admin_host, c.admin_port) == ("0.0.0.0", 8080, "::1", 9090)
    c = parse_config(EXAMPLE.replace('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"'), BASE)
    assert c.port == c.admin_port == 0  # each listener gets a free port of its own


@pytest.mark.parametrize(("old", "new", "key"), [
    ("sweep_interval = 300", "sweep_interval = 300\ncolour = 1", "colour"),  # unknown top-level key
    ("env = {}", "env = {}\nnetwork = true", "profiles.stdout.network"),  # unknown profile key
    ('profile = "stdout"', 'profile = "stdout"\nweight = 2', "modules[0].weight"),  # unknown module key
    ('profile = "stdout"', "", "modules[0].profile"),  # a module with no profile
    ('profile = "stdout"', 'profile = "network"', "modules[0].profile"),  # an unknown profile
    ('profile = "stdout"', "profile = 3", "modules[0].profile"),
    ('"wasi_snapshot_preview1.fd_write"', '"fd_write"', "profiles.stdout.imports[0]"),  # no module part
    ('"wasi_snapshot_preview1.fd_write"', '"wasi.fd_[wr]ite"', "profiles.stdout.imports[0]"),  # a glob class
    ('"wasi_snapshot_preview1.fd_write"', '"wasi. fd"', "profiles.stdout.imports[0]"),
    ('"wasi_snapshot_preview1.fd_write"', '"wasi."', "profiles.stdout.imports[0]"),
    ('"wasi_snapshot_preview1.fd_write"', "3", "profiles.stdout.imports[0]"),
    ('imports = ["wasi_snapshot_preview1.fd_write"]', 'imports = "wasi.*"', "profiles.stdout.imports"),
    ('imports = ["wasi_snapshot_preview1.fd_write"]', "", "profiles.stdout.imports"),  # missing
    ("memory_mb = 16", "memory_mb = 0", "profiles.stdout.memory_mb"),
    ("memory_mb = 16", "memory_mb = 99999", "profiles.stdout.memory_mb"),
    ("memory_mb = 16", "memory_mb = 3585", "profiles.stdout.memory_mb"),  # more than a sandbox worker can hold
    ("memory_mb = 16", 'memory_mb = "16"', "profiles.stdout.memory_mb"),
    ("memory_mb = 16", "memory_mb = true", "profiles.stdout.memory_mb"),
    ("timeout_ms = 500", "timeout_ms = -1", "profiles.stdout.timeout_ms"),
    ("timeout_ms = 500", "timeout_ms = 1.5", "profiles.stdout.timeout_ms"),
    ("timeout_ms = 500", "timeout_ms = 500\nfuel = 0", "profiles.stdout.fuel"),
    ("timeout_ms = 500", "timeout_ms = 500\nmax_in_flight = 0", "profiles.stdout.max_in_flight"),
    ("timeout_ms = 500", "timeout_ms = 500\nmax_in_flight = 1025", "profiles.stdout.max_in_flight"),
    ("timeout_ms = 500", 'timeout_ms = 500\nmax_in_flight = "4"', "profiles.stdout.max_in_flight"),
    ("timeout_ms = 500", "timeout_ms = 500\nmax_in_flight = true", "profiles.stdout.max_in_flight"),
    ("env = {}", 'env = {"1BAD" = "x"}', "profiles.stdout.env.1BAD"),
    ("env = {}", "env = {A = 1}", "profiles.stdout.env.A"),
    ("env = {}", 'env = "A=1"', "profiles.stdout.env"),
    ("[profiles.stdout]", "[profiles.\"std out\"]", "profiles.std out"),
    ('ref = "acme:hello@1.0.0"', 'ref = "acme/hello"', "modules[0].ref"),
    ('ref = "acme:hello@1.0.0"', 'ref = "acme:Hello@1.0.0"', "modules[0].ref"),
    ('ref = "acme:hello@1.0.0"', 'ref = "acme:hello@latest"', "modules[0].ref"),
    ('ref = "acme:hello@1.0.0"', "", "modules[0].ref"),
    ('registries = ["http://127.0.0.1:7380"]', "registries = []", "registries"),
    ('registries = ["http://127.0.0.1:7380"]', 'registries = "http://127.0.0.1:7380"', "registries"),
    ('registries = ["http://127.0.0.1:7380"]', 'registries = ["ftp://x"]', "registries[0]"),
    ('registries = ["http://127.0.0.1:7380"]', 'registries = ["http://h:99999"]', "registries[0]"),
    ('registries = ["http://127.0.0.1:7380"]', "", "registries"),
    ('trust_policy = "trust-policy.toml"', "", "trust_policy"),
    ('trust_policy = "trust-policy.toml"', "trust_policy = 1", "trust_policy"),
    ('data = "agent-data"', 'data = ""', "data"),
    ('listen = "127.0.0.1:7400"', 'listen = "7400"', "listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:http"', "listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "127.0.0.1:7400"', "admin_listen"),  # one origin
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "0.0.0.0:7400"', "admin_listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7401"', "admin_listen"),  # the default admin port
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "7401"', "admin_listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "127.0.0.1:65536"', "admin_listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "127.0.0.1:\u0667"', "admin_listen"),  # not ASCII digits
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = 7401', "admin_listen"),
    ("sweep_interval = 300", "sweep_interval = 0", "sweep_interval"),
    ("sweep_interval = 300", 'sweep_interval = "5m"', "sweep_interval"),
    ("sweep_interval = 300", "sweep_interval = 300 300", "(syntax)"),
    ('registries = ["http://127.0.0.1:7380"]', 'registries = ["http://127.0.0.1:7380", "http://127.0.0.1:7380/"]', "registries"),
    ('listen = "127.0.0.1:7400"', 'listen = "bad host:7400"', "listen"),
    ('listen = "127.0.0.1:7400"', 'listen = "127.0.0.1:7400"\nadmin_listen = "[127.0.0.1:7401"', "admin_listen"),
    ("[profiles.stdout]", '[profiles."std\\nout"]', "profiles.std\\nout"),  # a newline in a key: escaped, one line
    ("sweep_interval = 300", 'sweep_interval = 300\n"x\\ry\\u2028z" = 1', "x\\ry\\u2028z"),
])
def test_each_mistake_is_named_by_its_key(old: str, new: str, key: str) -> None:
    assert old in EXAMPLE
    with pytest.raises(ConfigError) as e:
        parse_config(EXAMPLE.replace(old, new, 1), BASE)
    assert e.value.key == key, str(e.value)
    assert str(e.value).startswith(f"{key}: ") and str(e.value).isprintable()


@pytest.mark.parametrize("key", ["modules", "profiles"])
def test_modules_and_profiles_are_tables(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f'trust_policy = "p"\nregistries = ["http://r"]\ndata = "d"\n{key} = 3\n', BASE)
    assert e.value.key == key


def test_two_modules_for_one_name_is_a_mistake() -> None:
    text = EXAMPLE + '\n[[modules]]\nref = "acme:hello"\nprofile = "stdout"\n'
    with pytest.raises(ConfigError) as e:
        parse_config(text, BASE)
    assert e.value.key == "modules[1].ref" and "modules[0]" in str(e.value)


@given(st.text(max_size=40))
def test_a_pattern_is_accepted_only_as_module_dot_field(pattern: str) -> None:
    module, dot, name = pattern.partition(".")
    ok = bool(dot) and all(module and name and all("!" <= c <= "~" and c not in "[]?" for c in side) for side in (module, name))
    try:
        check_pattern(pattern, "k")
    except ConfigError:
        assert not ok
    else:
        assert ok


def test_serve_exits_2_with_one_line_naming_the_key(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(EXAMPLE.replace("memory_mb = 16", "memory_mb = 0"))
    p = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(cfg)], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "profiles.stdout.memory_mb" in p.stderr, p.stderr
    cfg.write_text(EXAMPLE)  # a valid config, but the trust policy file does not exist
    p = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(cfg)], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "trust policy" in p.stderr and "Traceback" not in p.stderr, p.stderr
    (tmp_path / "trust-policy.toml").write_text(f'tlog_policy = """\nlog {Ed25519Signer.generate("localhost/x").vkey}\nquorum none\n"""\n')
    (tmp_path / "agent-data").mkdir()  # (a damaged state.json is no reason to exit: the start-up sweep decides anew, test_agent.py)
    (tmp_path / "agent-data" / "artifact.key").write_bytes(bytes(32))
    (tmp_path / "agent-data" / "artifact.key").chmod(0o644)  # a key others can read attests nothing
    p = subprocess.run([sys.executable, "-m", "wasmlog", "agent", "serve", "--config", str(cfg)], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "artifact.key" in p.stderr and "Traceback" not in p.stderr, p.stderr


# --- WAGI: CGI in and out -------------------------------------------------------------------

def test_cgi_output_with_a_header_block() -> None:
    status, headers, body = parse_cgi(b"Content-Type: application/json\r\nStatus: 404 Not Found\r\nX-A: 1\r\n\r\n{\"x\": 1}\n\nmore")
    assert status == 404 and headers == [("Content-Type", "application/json"), ("X-A", "1")] and body == b'{"x": 1}\n\nmore'
    assert parse_cgi(b"Location: /elsewhere\n\n") == (302, [("Location", "/elsewhere"), ("Content-Type", "text/plain; charset=utf-8")], b"")
    assert parse_cgi(b"Content-Length: 99\nConnection: close\n\nhi")[1] == [("Content-Type", "text/plain; charset=utf-8")]


def test_cgi_output_without_a_header_block_is_all_body() -> None:
    for out in (b"hello world\n", b"hello: world\nnot a header line\n\nbody", b"", b"\n\nbody", b"a b: c\n\nx"):
        assert parse_cgi(out) == (200, [("Content-Type", "text/plain; charset=utf-8")], out)


@pytest.mark.parametrize("status", [b"Status: 99 Low", b"Status: 600 High", b"Status: OK", b"Status: 2000", b"Status: 100", b"Status: 101 Switching Protocols"])
def test_a_bad_cgi_status_is_an_error(status: bytes) -> None:
    with pytest.raises(CgiError):
        parse_cgi(status + b"\n\nbody")


@given(st.binary(max_size=300))
def test_cgi_parsing_never_fails_but_on_a_status(out: bytes) -> None:
    try:
        status, headers, body = parse_cgi(out)
    except CgiError:
        assert b"status:" in out.lower()
        return
    assert 200 <= status <= 599 and out.endswith(body)
    assert all("\n" not in v and "\r" not in v for _, v in headers)


def test_cgi_environment() -> None:
    env = cgi_environment(method="POST", script_name="/run/acme/hello", path_info="/a/b", query_string="x=1&y=%20",
                          protocol="HTTP/1.1", headers=[("Content-Type", "text/plain"), ("Content-Length", "3"), ("X-Thing", "a"),
                                                        ("x-thing", "b"), ("Bad Name", "z")],
                          content_length=3, server_name="127.0.0.1", server_port="7400")
    assert env["REQUEST_METHOD"] == "POST" and env["PATH_INFO"] == "/a/b" and env["QUERY_STRING"] == "x=1&y=%20"
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "3" and env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["HTTP_X_THING"] == "a, b" and "HTTP_CONTENT_LENGTH" not in env and not any("BAD" in k for k in env)
    assert env["SCRIPT_NAME"] == "/run/acme/hello" and env["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_credentials_and_hop_by_hop_headers_never_reach_a_module() -> None:
    sent = [("Cookie", "a=1"), ("AUTHORIZATION", "Bearer t"), ("Proxy-Authorization", "Basic x"), ("Proxy", "http://evil"),
            ("Connection", "close, X-Private"), ("X-Private", "p"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
            ("Upgrade", "h2c"), ("Trailer", "X"), ("Transfer-Encoding", "chunked"), ("X-Kept", "k")]
    env = cgi_environment(method="GET", script_name="/run/a/b", path_info="", query_string="", protocol="HTTP/1.1",
                          headers=sent, content_length=0, server_name="h", server_port="1")
    http = {k: v for k, v in env.items() if k.startswith("HTTP_")}
    assert http == {"HTTP_X_KEPT": "k"}
