"""The agent's desired state, `agent.toml`: parsed strictly. Pure (text in, AgentConfig out).

Every mistake raises ConfigError naming the key it is about: an unknown key, a value of the
wrong type or out of range, an import pattern that is not "module.field" (``*`` allowed),
a module with no profile or an unknown one, two modules for one namespace:name.
Relative paths are resolved against base (the config file's directory).
"""

from __future__ import annotations

import pathlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from registry.record import RecordError, check_label, check_version

from .sandbox_protocol import MAX_PROFILE_MEMORY_MB

MAX_CONFIG_BYTES = 1 << 20
DEFAULT_LISTEN = "127.0.0.1:7400"
DEFAULT_SWEEP_INTERVAL = 300
MAX_MEMORY_MB = MAX_PROFILE_MEMORY_MB  # what a sandbox worker can hold (edge/sandbox_protocol.py)
MAX_TIMEOUT_MS = 600_000
MAX_SWEEP_INTERVAL = 7 * 86400
MAX_PATTERN = 256
# A pattern is module.field; each side printable ASCII without space, glob brackets or '?': only '*' is a wildcard.
_PATTERN_SIDE = re.compile(r"[!-~]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENV_VALUE = 4096
TELEMETRY_KEYS = {"telemetry", "telemetry_spool_bytes", "telemetry_interval"}
DEFAULT_SPOOL_BYTES = 64 << 20
MIN_SPOOL_BYTES, MAX_SPOOL_BYTES = 64 << 10, 1 << 40
MAX_SINKS = 16

TOP_KEYS = {"trust_policy", "registries", "data", "listen", "sweep_interval", "profiles", "modules", *TELEMETRY_KEYS}
PROFILE_KEYS = {"imports", "memory_mb", "timeout_ms", "fuel", "env"}
MODULE_KEYS = {"ref", "profile"}


class ConfigError(Exception):
    """A config mistake: key names where it is (e.g. "profiles.stdout.memory_mb")."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class ProfileConfig:
    """What a module may use: the host functions it is linked with, its memory, its time."""

    name: str
    imports: tuple[str, ...]
    memory_mb: int
    timeout_ms: int
    fuel: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModuleConfig:
    """One module to run: "ns:name@version", or "ns:name" (version None) for the newest good release."""

    ref: str
    namespace: str
    name: str
    version: str | None
    profile: str


@dataclass(frozen=True)
class TelemetryConfig:
    """Where events go (OTLP/HTTP JSON logs URLs), the spool's bound in bytes, the aggregation interval in seconds."""

    sinks: tuple[str, ...] = ()
    spool_bytes: int = DEFAULT_SPOOL_BYTES
    interval: int = 10


@dataclass(frozen=True)
class AgentConfig:
    trust_policy: pathlib.Path
    registries: tuple[str, ...]
    data: pathlib.Path
    host: str
    port: int
    sweep_interval: int
    profiles: Mapping[str, ProfileConfig]
    modules: tuple[ModuleConfig, ...]
    telemetry: TelemetryConfig = TelemetryConfig()

    def module(self, namespace: str, name: str) -> ModuleConfig | None:
        return next((m for m in self.modules if m.namespace == namespace and m.name == name), None)


def _int(obj: Any, key: str, low: int, high: int) -> int:
    if type(obj) is not int or not low <= obj <= high:
        raise ConfigError(key, f"want an integer from {low} to {high}, got {obj!r}")
    return obj


def _str(obj: Any, key: str) -> str:
    if type(obj) is not str or not obj:
        raise ConfigError(key, f"want a non-empty string, got {obj!r}")
    return obj


def _table(obj: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if type(obj) is not dict:
        raise ConfigError(key, f"want a table, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}" if key else unknown[0], f"unknown key (known: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(obj))
    if missing:
        raise ConfigError(f"{key}.{missing[0]}" if key else missing[0], "missing")
    return obj


def check_pattern(pattern: Any, key: str) -> str:
    """An import pattern "module.field", split on its first '.'; '*' the only wildcard."""
    if type(pattern) is not str or len(pattern) > MAX_PATTERN:
        raise ConfigError(key, f"want a \"module.field\" string of at most {MAX_PATTERN} characters, got {pattern!r}")
    module, dot, name = pattern.partition(".")
    if not dot or not _PATTERN_SIDE.fullmatch(module) or not _PATTERN_SIDE.fullmatch(name) or any(c in pattern for c in "[]?"):
        raise ConfigError(key, f"{pattern!r} is not a \"module.field\" pattern (printable, no spaces, '*' the only wildcard)")
    return pattern


def _profile(name: str, obj: Any) -> ProfileConfig:
    key = f"profiles.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ConfigError(key, "a profile name is 1-64 letters, digits, '-' or '_'")
    t = _table(obj, key, PROFILE_KEYS, {"imports", "memory_mb", "timeout_ms"})
    if type(t["imports"]) is not list:
        raise ConfigError(f"{key}.imports", "want a list of \"module.field\" patterns")
    imports = tuple(check_pattern(p, f"{key}.imports[{i}]") for i, p in enumerate(t["imports"]))
    fuel = None if "fuel" not in t else _int(t["fuel"], f"{key}.fuel", 1, 1 << 62)
    env = t.get("env", {})
    if type(env) is not dict:
        raise ConfigError(f"{key}.env", "want a table of NAME = \"value\"")
    for k, v in env.items():
        if not _ENV_NAME.fullmatch(k):
            raise ConfigError(f"{key}.env.{k}", "an environment name is a letter or '_' then letters, digits, '_'")
        if type(v) is not str or len(v) > MAX_ENV_VALUE or "\x00" in v:
            raise ConfigError(f"{key}.env.{k}", f"want a string of at most {MAX_ENV_VALUE} characters without NUL")
    return ProfileConfig(name, imports, _int(t["memory_mb"], f"{key}.memory_mb", 1, MAX_MEMORY_MB),
                         _int(t["timeout_ms"], f"{key}.timeout_ms", 1, MAX_TIMEOUT_MS), fuel, dict(env))


def _module(i: int, obj: Any, profiles: Mapping[str, ProfileConfig]) -> ModuleConfig:
    key = f"modules[{i}]"
    t = _table(obj, key, MODULE_KEYS, {"ref"})
    ref = _str(t["ref"], f"{key}.ref")
    ns, colon, rest = ref.partition(":")
    name, at, version = rest.partition("@")
    try:
        if not colon:
            raise RecordError("want NAMESPACE:NAME or NAMESPACE:NAME@VERSION")
        check_label(ns, "namespace")
        check_label(name, "name")
        if at:
            check_version(version)
    except RecordError as e:
        raise ConfigError(f"{key}.ref", f"{ref[:100]!r}: {e}") from None
    if "profile" not in t:
        raise ConfigError(f"{key}.profile", f"module {ref} has no profile")
    profile = _str(t["profile"], f"{key}.profile")
    if profile not in profiles:
        raise ConfigError(f"{key}.profile", f"unknown profile {profile!r} (defined: {', '.join(sorted(profiles)) or 'none'})")
    return ModuleConfig(ref, ns, name, version if at else None, profile)


def _url(obj: Any, key: str) -> str:
    url = _str(obj, key)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as e:
        raise ConfigError(key, f"{url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(key, f"{url!r} is not an http(s)://host[:port][/path] URL")
    return url.rstrip("/")


def _telemetry(t: dict[str, Any]) -> TelemetryConfig:
    sinks = t.get("telemetry", [])
    if type(sinks) is not list or len(sinks) > MAX_SINKS:
        raise ConfigError("telemetry", f"want a list of at most {MAX_SINKS} OTLP/HTTP logs URLs (http://host:4318/v1/logs)")
    urls = tuple(_url(u, f"telemetry[{i}]") for i, u in enumerate(sinks))
    if len(set(urls)) != len(urls):
        raise ConfigError("telemetry", "a URL is listed twice")
    return TelemetryConfig(urls, _int(t.get("telemetry_spool_bytes", DEFAULT_SPOOL_BYTES), "telemetry_spool_bytes", MIN_SPOOL_BYTES, MAX_SPOOL_BYTES),
                           _int(t.get("telemetry_interval", TelemetryConfig.interval), "telemetry_interval", 1, 3600))


def _listen(obj: Any) -> tuple[str, int]:
    listen = _str(obj, "listen")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError("listen", f"want HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def parse_config(text: str, base: pathlib.Path) -> AgentConfig:
    """Parse agent.toml; raise ConfigError naming the first mistake's key."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError("(file)", f"over {MAX_CONFIG_BYTES} bytes")
    try:
        obj = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", str(e)) from None
    t = _table(obj, "", TOP_KEYS, {"trust_policy", "registries", "data"})
    if type(t["registries"]) is not list or not t["registries"]:
        raise ConfigError("registries", "want a non-empty list of registry URLs, tried in order")
    registries = tuple(_url(u, f"registries[{i}]") for i, u in enumerate(t["registries"]))
    profiles_obj = t.get("profiles", {})
    if type(profiles_obj) is not dict:
        raise ConfigError("profiles", "want tables [profiles.NAME]")
    profiles = {name: _profile(name, p) for name, p in profiles_obj.items()}
    modules_obj = t.get("modules", [])
    if type(modules_obj) is not list:
        raise ConfigError("modules", "want [[modules]] tables")
    modules = tuple(_module(i, m, profiles) for i, m in enumerate(modules_obj))
    seen: dict[tuple[str, str], int] = {}
    for i, m in enumerate(modules):
        if (m.namespace, m.name) in seen:
            first = seen[m.namespace, m.name]
            raise ConfigError(f"modules[{i}].ref", f"{m.namespace}:{m.name} is already modules[{first}] (one release per name is served)")
        seen[m.namespace, m.name] = i
    host, port = _listen(t.get("listen", DEFAULT_LISTEN))
    return AgentConfig(
        trust_policy=base / _str(t["trust_policy"], "trust_policy"), registries=registries, data=base / _str(t["data"], "data"),
        host=host, port=port, sweep_interval=_int(t.get("sweep_interval", DEFAULT_SWEEP_INTERVAL), "sweep_interval", 1, MAX_SWEEP_INTERVAL),
        profiles=profiles, modules=modules, telemetry=_telemetry(t),
    )
