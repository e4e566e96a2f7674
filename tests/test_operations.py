"""Operations: /metrics in Prometheus text format, /healthz, structured logs."""

from __future__ import annotations

import json
import logging

from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families
from registry_helpers import start_registry, wat_module

from registry.record import parse_package_ref
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.policy import parse_policy
from tlog.sequencer import Sequencer
from tlog.server import make_app
from tlog.storage.memory import MemoryLogStore
from wasmlog.cli import configure_logging


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_log_metrics_and_health(aiohttp_client) -> None:
    log = Log(MemoryLogStore(), Ed25519Signer.generate("example.com/ops"))
    client = await aiohttp_client(make_app(Sequencer(log, interval=0.005)))
    for i in range(5):
        assert (await client.post("/add", data=b"e%d" % i)).status == 200
    await client.post("/add", data=b"")  # a 400
    m = samples(await (await client.get("/metrics")).text())
    assert m[("wasmlog_log_entries", ())] == 5
    assert m[("wasmlog_log_published_size", ())] == 5
    assert m[("wasmlog_log_batch_entries_count", ())] == 5
    assert m[("wasmlog_log_http_responses_total", (("method", "POST"), ("status", "200")))] == 5
    assert m[("wasmlog_log_http_responses_total", (("method", "POST"), ("status", "400")))] == 1
    assert (await client.get("/healthz")).status == 200


async def test_witnessed_log_without_quorum_is_unhealthy(aiohttp_client) -> None:
    key = Ed25519Signer.generate("example.com/ops2")
    w = Ed25519Signer.generate("w.example", ALG_COSIGNATURE_V1)
    policy = parse_policy(f"log {key.vkey}\nwitness W {w.vkey} http://127.0.0.1:{free_port()}\nquorum W\n".encode())
    log = Log(MemoryLogStore(), key, witnessed=True)
    client = await aiohttp_client(make_app(Sequencer(log, interval=0.005), witness_policy=policy, witness_timeout=0.5, max_checkpoint_age=1))
    assert (await client.post("/add", data=b"x")).status == 503
    r = await client.get("/healthz")
    assert r.status == 503
    m = samples(await (await client.get("/metrics")).text())
    assert m[("wasmlog_log_witness_failures_total", (("witness", "W"),))] >= 1


async def test_registry_and_witness_metrics(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(Ed25519Signer.generate("alice"), parse_package_ref("acme:a@1.0.0"), wat_module("no_imports", tmp_path))
    m = samples(await (await client.get("/metrics")).text())
    assert m[("wasmlog_registry_http_responses_total", (("method", "POST"), ("status", "200")))] == 2  # claim + publish
    log_m = samples(await (await client.get("/log/metrics")).text())
    assert log_m[("wasmlog_log_entries", ())] == 4  # the claim and the release, each closed by an index root


def test_json_logs(capsys) -> None:  # type: ignore[no-untyped-def]
    configure_logging(1, "json")
    logging.getLogger("wasmlog.test").info("hello %s", "world")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    obj = json.loads(line)
    assert obj["message"] == "hello world" and obj["level"] == "info" and obj["logger"] == "wasmlog.test"
    configure_logging(0, "text")
