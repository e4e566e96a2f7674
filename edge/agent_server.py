"""The agent's HTTP API: WAGI runs, /status, /metrics, /healthz, POST /sweep. Loopback by default.

Every error maps to one status in STATUS: a module not admitted (refused, quarantined, yanked) 403,
unknown 404, a deadline 504, a trap or a memory cap 502; none of them disturbs another module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from tlog.errors import (
    BodyTimeoutError,
    MalformedError,
    NotFoundError,
    TlogError,
    TooLargeError,
    UnsupportedEncodingError,
)
from tlog.httplimits import ServerLimits, body_limit, start_server
from tlog.metrics import LATENCY_BUCKETS, METRICS, install
from tlog.server import errors_middleware_for

from .agent import Agent, load_trust_policy
from .agent_cgi import CgiError, cgi_environment, merged_environment, parse_cgi
from .agent_config import AgentConfig
from .agent_state import ADMITTED, STATES
from .sandbox import (
    DeadlineExceeded,
    IntegrityError,
    MemoryExceeded,
    NoLongerAllowed,
    NotGranted,
    Profile,
    Sandbox,
    SandboxBusy,
    SandboxError,
    Trapped,
)

logger = logging.getLogger("wasmlog.agent")
AGENT = web.AppKey("agent", Agent)
RETRY_AFTER_SECONDS = 1
MAX_RUN_BODY = 1 << 20  # a request body is the module's stdin: at most this many bytes


class ModuleNotServed(TlogError):
    """The module is configured but not admitted (refused, quarantined): 403."""


# Every error maps to one status here; subclasses come before their bases.
STATUS: list[tuple[type[Exception], int]] = [
    (ModuleNotServed, 403),
    (NotGranted, 403),
    (NoLongerAllowed, 403),  # quarantined or yanked while the request waited for a worker
    (IntegrityError, 403),  # the stored module was tampered with: quarantined, never run
    (SandboxBusy, 503),  # with Retry-After
    (DeadlineExceeded, 504),
    (MemoryExceeded, 502),
    (Trapped, 502),
    (CgiError, 502),
    (SandboxError, 502),
    (TooLargeError, 413),
    (UnsupportedEncodingError, 415),
    (MalformedError, 400),
    (BodyTimeoutError, 408),
    (NotFoundError, 404),
    (TlogError, 500),
]


def error_response(e: Exception) -> web.Response:
    status = next(status for cls, status in STATUS if isinstance(e, cls))
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return web.json_response({"error": type(e).__name__, "message": str(e)}, status=status, headers=headers)


agent_errors_middleware = errors_middleware_for(error_response)


class AgentMetrics:
    def __init__(self, app: web.Application, agent: Agent) -> None:
        registry = app[METRICS]
        self.runs = Counter("wasmlog_agent_runs", "Module runs by module and HTTP status", ["module", "status"], registry=registry)
        self.run_seconds = Histogram("wasmlog_agent_run_seconds", "Time to run a module for a request", buckets=LATENCY_BUCKETS, registry=registry)
        self.sweeps = Counter("wasmlog_agent_sweeps", "Sweeps run", registry=registry)
        self.findings = Counter("wasmlog_agent_sweep_findings", "Sweep findings by kind", ["kind"], registry=registry)
        modules = Gauge("wasmlog_agent_modules", "Configured modules by state", ["state"], registry=registry)
        for state in STATES:
            modules.labels(state).set_function(_counter(agent, state))


def _counter(agent: Agent, state: str) -> Callable[[], int]:
    """How many configured modules are in state, asked anew each call (metrics and /healthz)."""
    return lambda: sum(s.state == state for s in agent.modules.values())


METRICS_KEY = web.AppKey("agent_metrics", AgentMetrics)


async def run_module(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    ns, name = request.match_info["namespace"], request.match_info["name"]
    found = agent.serving(ns, name)
    if found is None:
        raise NotFoundError(f"no module {ns[:64]}:{name[:64]} is configured")
    m, s = found
    if s is None or s.state != ADMITTED or s.digest is None:
        why = "not admitted yet" if s is None else f"{s.state} ({s.reason}: {s.message})"
        await agent.telemetry.request_failed(m.ref, s, None)
        raise ModuleNotServed(f"{m.ref} is {why}")
    module = agent.store.path(s.digest)
    if not module.exists():
        await agent.quarantine(m.ref, "integrity", f"the stored module sha256:{s.digest[:16]} is missing", {s.digest})
        raise ModuleNotServed(f"{m.ref} is quarantined (integrity: its stored module is missing)")
    body = await request.read()  # bounded by the route's body limit
    tail = request.match_info.get("tail")
    host, _, port = (request.host or "").partition(":")
    cgi = cgi_environment(
        method=request.method, script_name=f"/run/{ns}/{name}", path_info="" if tail is None else "/" + tail,
        query_string=request.rel_url.raw_query_string, protocol=f"HTTP/{request.version.major}.{request.version.minor}",
        headers=request.headers.items(), content_length=len(body), server_name=host, server_port=port,
    )
    p = agent.config.profiles[m.profile]
    profile = Profile(imports=p.imports, memory_mb=p.memory_mb, timeout_ms=p.timeout_ms, fuel=p.fuel, env=p.env)
    metrics = request.app[METRICS_KEY]
    started = time.monotonic()
    try:
        def still_admitted() -> bool:
            now = agent.serving(ns, name)
            return now is not None and now[1] is not None and now[1].state == ADMITTED and now[1].digest == s.digest

        result = await agent.sandbox.run(s.digest, module, profile, stdin=body, env=merged_environment(cgi, p.env),
                                         still_allowed=still_admitted)
        if not still_admitted():  # stopped while it ran: its answer is not served either
            raise NoLongerAllowed(f"{m.ref} was stopped while it ran")
        if result.exit_code != 0:
            raise Trapped(f"{m.ref} exited with status {result.exit_code}")
        status, headers, out = parse_cgi(result.stdout)
    except IntegrityError as e:
        await agent.quarantine(m.ref, "integrity", str(e), {s.digest})
        metrics.runs.labels(m.ref, "403").inc()
        return error_response(e)
    except (SandboxError, CgiError) as e:
        await agent.telemetry.request_failed(m.ref, s, e)
        response = error_response(e)
        metrics.runs.labels(m.ref, str(response.status)).inc()
        return response
    finally:
        metrics.run_seconds.observe(time.monotonic() - started)
    metrics.runs.labels(m.ref, str(status)).inc()
    response = web.Response(status=status, body=out)
    for k, v in headers:
        response.headers.add(k, v)
    return response


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].status(), dumps=lambda o: json.dumps(o, indent=1))


async def post_sweep(request: web.Request) -> web.Response:
    result = await request.app[AGENT].sweep()
    _count(request.app, result)
    return web.json_response(result, dumps=lambda o: json.dumps(o, indent=1))


def _count(app: web.Application, result: dict) -> None:  # type: ignore[type-arg]
    metrics = app[METRICS_KEY]
    metrics.sweeps.inc()
    for f in result["findings"]:
        metrics.findings.labels(f["kind"]).inc()


async def get_healthz(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    counts = {state: _counter(agent, state)() for state in STATES}
    return web.Response(text="ok: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + "\n")


async def _sweeps(app: web.Application) -> AsyncIterator[None]:
    """Sweep every sweep_interval seconds while the app runs."""
    agent = app[AGENT]

    async def loop() -> None:
        while True:
            await asyncio.sleep(agent.config.sweep_interval)
            try:
                _count(app, await agent.sweep())
            except Exception:  # logged; the next sweep runs on time
                logger.exception("sweep failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(agent: Agent, *, periodic_sweeps: bool = True) -> web.Application:
    app = web.Application(middlewares=[agent_errors_middleware])
    app[AGENT] = agent
    install(app, "wasmlog_agent")
    app[METRICS_KEY] = AgentMetrics(app, agent)
    app.cleanup_ctx.append(agent.telemetry.running)  # shipping and signing; cleaned up after the sweeps stop
    run = body_limit(MAX_RUN_BODY, run_module, compressed=False)
    for path in ("/run/{namespace}/{name}", "/run/{namespace}/{name}/{tail:.*}"):
        app.router.add_get(path, run)
        app.router.add_post(path, run)
    app.router.add_get("/status", get_status)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_post("/sweep", post_sweep)
    if periodic_sweeps:
        app.cleanup_ctx.append(_sweeps)
    return app


def new_sandbox(config: AgentConfig, workers: int = 2) -> Sandbox:
    """The sandbox of an agent: compiled artifacts in data/artifacts, their HMAC key in data/artifact.key (0600)."""
    config.data.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Sandbox(config.data / "artifacts", config.data / "artifact.key", workers=workers)


async def serve_agent(config: AgentConfig, limits: ServerLimits, stop: asyncio.Event) -> None:
    """Admit the configured modules, then serve until stop is set; sweeps every sweep_interval."""
    load_trust_policy(config.trust_policy)  # a policy that cannot be used stops us before anything is created
    sandbox = new_sandbox(config)
    try:
        agent = Agent(config, sandbox)
        await sandbox.start()  # the workers, now: /status says whether their syscall filter is active
        await agent.start()
        runner, sites = await start_server(make_app(agent), limits, config.host, config.port)
        try:
            logger.warning("agent serving on http://%s:%d/ (%d modules)", config.host, sites[0].port, len(config.modules))
            print(f"wasmlog agent: http://{config.host}:{sites[0].port}/", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        await sandbox.close()
