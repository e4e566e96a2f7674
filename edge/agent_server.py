"""The agent's two listeners, loopback by default. The module listener (`listen`) serves only the WAGI
runs, /run/...: a module's answer never shares an origin with the agent's own API. The admin
listener (`admin_listen`, a port of its own) serves /status, /metrics, /healthz and POST /sweep.

Every error maps to one status in STATUS: a module not admitted (refused, quarantined, yanked) 403,
unknown 404, a deadline 504, a trap or a memory cap 502, a module with max_in_flight requests already in
flight or no worker free within the request's deadline 503 (Retry-After); none of them disturbs another module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

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
from .agent_cgi import CgiError, cgi_environment, merged_environment, parse_cgi, server_name_and_port
from .agent_config import AgentConfig
from .agent_state import ADMITTED, STATES
from .sandbox import (
    DeadlineExceeded,
    IntegrityError,
    MemoryExceeded,
    NoLongerAllowed,
    NotGranted,
    NoWorkerInTime,
    Profile,
    Sandbox,
    SandboxBusy,
    SandboxError,
    Trapped,
    WorkerCrashed,
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
    (NoWorkerInTime, 503),  # with Retry-After: the module did not run
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


def public_error(ref: str, e: Exception) -> Exception:
    """The error a module's caller sees: a crashed worker's pid and stderr, or a sandbox fault's internals, stay
    in the agent's log and telemetry (the module listener is public)."""
    if type(e) in (WorkerCrashed, SandboxError):
        logger.warning("%s: %s", ref, e)
        return type(e)(f"{ref}: the worker running it died; it was replaced" if isinstance(e, WorkerCrashed) else f"{ref}: the sandbox failed")
    return e


class AgentMetrics:
    """The agent's metrics, in the admin app's registry. Sweeps and their findings are the agent's own counts
    (Agent.sweeps, Agent.findings_total), read at each scrape: the start-up sweep, run before the metrics
    exist, counts, and /metrics never lags behind /status."""

    def __init__(self, app: web.Application, agent: Agent) -> None:
        registry = app[METRICS]
        self.runs = Counter("wasmlog_agent_runs", "Module runs by module and HTTP status", ["module", "status"], registry=registry)
        self.run_seconds = Histogram("wasmlog_agent_run_seconds", "Time to run a module for a request", buckets=LATENCY_BUCKETS, registry=registry)
        registry.register(_SweepCounts(agent))
        modules = Gauge("wasmlog_agent_modules", "Configured modules by state", ["state"], registry=registry)
        for state in STATES:
            modules.labels(state).set_function(_counter(agent, state))


class _SweepCounts(Collector):
    """wasmlog_agent_sweeps_total and wasmlog_agent_sweep_findings_total{kind}, from the agent's counts."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("wasmlog_agent_sweeps", "Sweeps run", value=self.agent.sweeps)
        findings = CounterMetricFamily("wasmlog_agent_sweep_findings", "Sweep findings by kind", labels=["kind"])
        for kind, n in sorted(self.agent.findings_total.items()):
            findings.add_metric([kind], n)
        yield findings


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
    if s is not None and s.digest is not None and (stale := agent.status_stale(s)) is not None:  # between sweeps too
        await agent.quarantine(m.ref, "status-stale", stale, {s.digest})
        s = agent.modules.get(m.ref)
    if s is None or s.state != ADMITTED or s.digest is None:
        why = "not admitted yet" if s is None else f"{s.state} ({s.reason})"  # the message, naming sources: /status only
        await agent.telemetry.request_failed(m.ref, s, None)
        raise ModuleNotServed(f"{m.ref} is {why}")
    module = agent.store.path(s.digest)
    if not module.exists():
        await agent.quarantine(m.ref, "integrity", f"the stored module sha256:{s.digest[:16]} is missing", {s.digest})
        raise ModuleNotServed(f"{m.ref} is quarantined (integrity: its stored module is missing)")
    body = await request.read()  # bounded by the route's body limit
    tail = request.match_info.get("tail")
    host, port = server_name_and_port(request.host or "")
    cgi = cgi_environment(
        method=request.method, script_name=f"/run/{ns}/{name}", path_info="" if tail is None else "/" + tail,
        query_string=request.rel_url.raw_query_string, protocol=f"HTTP/{request.version.major}.{request.version.minor}",
        headers=request.headers.items(), content_length=len(body), server_name=host, server_port=port,
    )
    p = agent.config.profiles[m.profile]
    profile = Profile(imports=p.imports, memory_mb=p.memory_mb, timeout_ms=p.timeout_ms, fuel=p.fuel, env=p.env,
                      max_in_flight=p.max_in_flight)
    metrics = request.app[METRICS_KEY]
    started = time.monotonic()
    try:
        def still_admitted() -> bool:
            now = agent.serving(ns, name)
            return now is not None and now[1] is not None and now[1].state == ADMITTED and now[1].digest == s.digest

        result = await agent.sandbox.run(s.digest, module, profile, stdin=body, env=merged_environment(cgi, p.env),
                                         still_allowed=still_admitted, key=m.ref)
        if not still_admitted():  # stopped while it ran: its answer is not served either
            raise NoLongerAllowed(f"{m.ref} was stopped while it ran")
        if result.exit_code != 0:
            raise Trapped(f"{m.ref} exited with status {result.exit_code}")
        status, headers, out = parse_cgi(result.stdout)
    except IntegrityError as e:
        await agent.quarantine(m.ref, "integrity", str(e), {s.digest})
        metrics.runs.labels(m.ref, "403").inc()
        return error_response(IntegrityError(f"{m.ref} is quarantined (integrity): its stored module changed on disk"))  # no path
    except (SandboxError, CgiError) as e:
        await agent.telemetry.request_failed(m.ref, s, e)
        response = error_response(public_error(m.ref, e))
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
    """The result of a sweep that started after the request (one already asked for is shared: Agent.sweep)."""
    result = await request.app[AGENT].sweep("request")
    return web.json_response(result, dumps=lambda o: json.dumps(o, indent=1))


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
                await agent.sweep("interval")
            except Exception:  # logged; the next sweep runs on time
                logger.exception("sweep failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _closing(app: web.Application) -> AsyncIterator[None]:
    """Close the agent (a sweep or prewarm in progress) when the admin app stops."""
    yield
    await app[AGENT].close()


def make_apps(agent: Agent, *, periodic_sweeps: bool = True) -> tuple[web.Application, web.Application]:
    """(the module listener's app: /run/... only; the admin listener's app: /status, /metrics, /healthz,
    POST /sweep, and the periodic sweeps)."""
    admin = web.Application(middlewares=[agent_errors_middleware])
    admin[AGENT] = agent
    install(admin, "wasmlog_agent")
    admin[METRICS_KEY] = metrics = AgentMetrics(admin, agent)
    admin.router.add_get("/status", get_status)
    admin.router.add_get("/healthz", get_healthz)
    admin.router.add_post("/sweep", post_sweep)
    admin.cleanup_ctx.append(agent.telemetry.running)  # shipping and signing; cleaned up after the sweeps stop
    admin.cleanup_ctx.append(_closing)  # a sweep or prewarm in progress stops before the telemetry closes
    if periodic_sweeps:
        admin.cleanup_ctx.append(_sweeps)
    modules = web.Application(middlewares=[agent_errors_middleware])
    modules[AGENT] = agent
    modules[METRICS_KEY] = metrics
    run = body_limit(MAX_RUN_BODY, run_module, compressed=False)
    for path in ("/run/{namespace}/{name}", "/run/{namespace}/{name}/{tail:.*}"):
        modules.router.add_get(path, run)
        modules.router.add_post(path, run)
    return modules, admin


def new_sandbox(config: AgentConfig, workers: int = 3) -> Sandbox:
    """The sandbox of an agent: compiled artifacts in data/artifacts, their HMAC key in data/artifact.key (0600).
    One module runs on at most workers - 1 of the run workers at once (edge.sandbox)."""
    config.data.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Sandbox(config.data / "artifacts", config.data / "artifact.key", workers=workers)


async def serve_agent(config: AgentConfig, limits: ServerLimits, stop: asyncio.Event) -> None:
    """Run the start-up sweep, then serve both listeners until stop is set; sweeps every sweep_interval.
    Nothing is served before the start-up sweep has re-checked every module (Agent.start); a stop during that
    sweep ends it, and no listener is opened."""
    load_trust_policy(config.trust_policy)  # a policy that cannot be used stops us before anything is created
    sandbox = new_sandbox(config)
    agent = None
    try:
        agent = Agent(config, sandbox)
        await sandbox.start()  # the workers, now: /status says whether their syscall filter is active
        if not await _unless_stopped(agent.start(), stop):
            return
        modules, admin = make_apps(agent)
        runners = []
        try:
            for app, host, port, what in ((modules, config.host, config.port, ""), (admin, config.admin_host, config.admin_port, " admin")):
                runner, sites = await start_server(app, limits, host, port)
                runners.append(runner)
                logger.warning("agent%s serving on http://%s:%d/", what, host, sites[0].port)
                print(f"wasmlog agent{what}: http://{host}:{sites[0].port}/", flush=True)
            await stop.wait()
        finally:
            for runner in runners[:1]:  # the modules' listener first: its requests end (and report) before the telemetry closes
                await runner.cleanup()
            await agent.close()  # then a sweep in progress, however long its sources hang, before the admin listener waits for it
            for runner in runners[1:]:
                await runner.cleanup()
    finally:
        if agent is not None:
            await agent.close()
        await sandbox.close()


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await work unless stop is set first (then work is cancelled): whether work completed."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()  # its error, if any
    return True
