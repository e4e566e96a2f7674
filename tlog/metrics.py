"""Prometheus metrics and health for the servers (prometheus-client, one registry per app).

Each app gets its own CollectorRegistry so several servers in one process (`wasmlog up`) do
not collide; GET /metrics serves it in the Prometheus text format.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METRICS = web.AppKey("metrics_registry", CollectorRegistry)
HTTP_RESPONSES = web.AppKey("http_responses", Counter)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def install(app: web.Application, prefix: str) -> CollectorRegistry:
    """Give app a metrics registry, GET /metrics, and a count of HTTP responses by status."""
    registry = CollectorRegistry(auto_describe=True)
    app[METRICS] = registry
    app[HTTP_RESPONSES] = Counter(f"{prefix}_http_responses", "HTTP responses by method and status", ["method", "status"], registry=registry)

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as e:
            app[HTTP_RESPONSES].labels(request.method, str(e.status)).inc()
            raise
        app[HTTP_RESPONSES].labels(request.method, str(response.status)).inc()
        return response

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.middlewares.insert(0, count)
    app.router.add_get("/metrics", metrics)
    return registry


class LogMetrics:
    """What the sequencer and the cosigner report."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram("wasmlog_log_batch_entries", "Entries per integrated batch", buckets=BATCH_BUCKETS, registry=registry)
        self.integration_seconds = Histogram("wasmlog_log_integration_seconds", "Time to integrate a batch durably",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_failures = Counter("wasmlog_log_batch_failures", "Batches that failed", registry=registry)
        self.cosign_seconds = Histogram("wasmlog_log_witness_cosign_seconds", "Witness cosignature latency", ["witness"],
                                        buckets=LATENCY_BUCKETS, registry=registry)
        self.cosign_failures = Counter("wasmlog_log_witness_failures", "Witness requests that failed or timed out", ["witness"], registry=registry)
        self.entries = Gauge("wasmlog_log_entries", "Entries in the log (integrated tree size)", registry=registry)
        self.published_size = Gauge("wasmlog_log_published_size", "Tree size of the published checkpoint", registry=registry)
        self.checkpoint_age = Gauge("wasmlog_log_checkpoint_age_seconds", "Seconds since a checkpoint was last published", registry=registry)
        self.last_publish = time.monotonic()

    def published(self) -> None:
        self.last_publish = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self.last_publish

    # the sequencer's Observer
    def batch(self, entries: int, seconds: float) -> None:
        self.batch_size.observe(entries)
        self.integration_seconds.observe(seconds)

    def batch_failed(self) -> None:
        self.batch_failures.inc()

    # the cosigner's per-witness report
    def witness_result(self, witness: str, seconds: float | None) -> None:
        if seconds is None:
            self.cosign_failures.labels(witness).inc()
        else:
            self.cosign_seconds.labels(witness).observe(seconds)
