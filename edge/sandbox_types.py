"""What the sandbox (edge.sandbox) takes and answers: a module's profile, a run's result, the errors that say why
a run did not complete, and the checks both the agent and the workers apply to imports and environments. Pure."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from registry.trust_policy import TrustPolicy
from registry.wasm import Import
from tlog.policy import Policy

DEFAULT_MAX_IN_FLIGHT = 16  # requests of one module in the sandbox at once (running or waiting), unless its profile says


@dataclass(frozen=True)
class Profile:
    """What a module may use: import patterns ("module.field", '*' wildcards, as in the trust policy), a linear
    memory cap, a wall-clock deadline per request (the wait for a worker and the run), optional fuel,
    environment variables set by the operator, and how many of its requests may be in the sandbox at once."""

    imports: tuple[str, ...]
    memory_mb: int
    timeout_ms: int
    fuel: int | None = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if isinstance(self.imports, str) or not all(isinstance(p, str) and p for p in self.imports):
            raise ValueError("profile imports must be a tuple of non-empty 'module.field' patterns")
        object.__setattr__(self, "imports", tuple(self.imports))  # a list would make the profile unhashable
        for name, value in (("memory_mb", self.memory_mb), ("timeout_ms", self.timeout_ms), ("fuel", self.fuel),
                            ("max_in_flight", self.max_in_flight)):
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"profile {name} must be a positive integer, not {value!r}")
        check_env(self.env)


@dataclass(frozen=True)
class RunResult:
    stdout: bytes
    stderr: bytes
    exit_code: int


class SandboxError(Exception):
    """A run that did not complete; the subclasses say why."""


class DeadlineExceeded(SandboxError):
    """The run passed its deadline (or used up its fuel) and was stopped."""


class MemoryExceeded(SandboxError):
    """The module hit its linear memory cap (and then trapped), or its initial memory exceeds the cap."""


class Trapped(SandboxError):
    """The module trapped, failed, or wrote more output than allowed."""


class NotGranted(SandboxError):
    """The module imports something its profile does not grant: it was never instantiated."""


class IntegrityError(SandboxError):
    """The module file's SHA-256 is not the digest it was admitted under."""


class SandboxBusy(SandboxError):
    """Every worker is busy and max_waiting requests already wait for one, or the module already has its
    profile's max_in_flight requests in the sandbox: try again later (503)."""


class NoWorkerInTime(SandboxBusy):
    """No worker the module may use came free within the request's deadline; the module did not run (503)."""


class NoLongerAllowed(SandboxError):
    """The caller's still_allowed() said no once a worker was free: the module was stopped while it waited."""


class ModuleInvalid(SandboxError):
    """The module does not compile, or is not a WASI command (no _start)."""


class WorkerCrashed(SandboxError):
    """The worker process running the request died; it was replaced."""


def failure(kind: object, message: str) -> SandboxError:
    """The error for a worker's failure kind."""
    if kind == "deadline":
        return DeadlineExceeded(message)
    if kind == "memory":
        return MemoryExceeded(message)
    if kind in ("trap", "output"):
        return Trapped(message)
    if kind == "not-granted":
        return NotGranted(message)
    if kind == "module-invalid":
        return ModuleInvalid(message)
    return SandboxError(f"{kind}: {message}")


def imports_granted(imports: Iterable[tuple[str, str]], patterns: Iterable[str]) -> list[str]:
    """The imports ("module", "field") that no pattern grants, as "module.field" strings, in order.
    Matching is the trust policy's: a pattern is split on its first '.', module and field globbed separately."""
    matcher = _matcher(tuple(patterns))
    return [f"{module}.{name}" for module, name in imports if not matcher.import_allowed(Import(module, name, "func"), False)]


_NO_LOGS = Policy(logs=(), witnesses={}, groups={}, quorum="none")


@functools.lru_cache(maxsize=256)
def _matcher(patterns: tuple[str, ...]) -> TrustPolicy:
    """The trust policy's matcher for these patterns (compiled once: profiles are few, runs many)."""
    return TrustPolicy(tlog=_NO_LOGS, allowed_imports=patterns)


def check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
            raise ValueError(f"environment variable {str(key)[:40]!r}: names are non-empty without '=' or NUL, values without NUL")
