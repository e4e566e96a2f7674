"""`wasmlog up`: the whole network in one process, on embedded defaults.

A registry with its embedded log (LMDB) whose checkpoints are published only
with a 2-of-3 witness quorum, three witnesses gossiping with each other, and an
OTLP/HTTP JSON logs collector for the edge agents' telemetry (port + 4).
Keys and data live under one folder, created on the first run and reused after.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
from dataclasses import dataclass

from aiohttp import web

from edge.telemetry_collector import make_collector_app
from registry.blobs import BlobStore
from registry.server import make_app
from registry.service import Registry
from tlog.httplimits import DEFAULT_LIMITS, ServerLimits, start_server
from tlog.keys import load_or_create_signer
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.policy import parse_policy
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.witnessing import RequestBudget
from witness.loglist import parse_log_list
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_NAME = "localhost/wasmlog"
WITNESS_NAMES = ("witness1.localhost", "witness2.localhost", "witness3.localhost")
QUORUM = 2
# The log asks its witnesses at most 10 times a second (864,000 rounds a day, a burst of 10): with
# 50 ms batches, entries that arrive while a round waits join the next round's checkpoint, so an
# entry waits at most ~100 ms more for its cosigned checkpoint. The witnesses' log list allows twice that
# (a day's rounds, the burst and the 15-minute slots of their window fit with room to spare).
ROUNDS_PER_DAY = 864_000
COLLECTOR_PORT_OFFSET = 4  # the telemetry collector listens on the registry's port + 4


@dataclass(frozen=True)
class NetworkConfig:
    data: pathlib.Path
    host: str = "127.0.0.1"
    port: int = 7380  # the registry (its log under /log/); witnesses take the next three ports
    interval: float = 0.05
    gossip_interval: float = 60.0
    rounds_per_day: int = ROUNDS_PER_DAY  # the log's pace; the witnesses' qpd for it is twice that
    limits: ServerLimits = DEFAULT_LIMITS  # every server's connection and request bounds (tlog/httplimits.py)
    announce: bool = True  # print the URLs once up (`wasmlog drill --json` keeps its stdout for its JSON)


def network_policy(log_key: Ed25519Signer, witness_keys: list[Ed25519Signer], urls: list[str]) -> str:
    """The c2sp.org/tlog-policy text for this network: our log and a 2-of-3 witness quorum."""
    lines = [f"log {log_key.vkey}"]
    lines += [f"witness W{i + 1} {k.vkey} {u}" for i, (k, u) in enumerate(zip(witness_keys, urls, strict=True))]
    lines += [f"group witnesses {QUORUM} " + " ".join(f"W{i + 1}" for i in range(len(witness_keys))), "quorum witnesses"]
    return "\n".join(lines) + "\n"


async def run_network(cfg: NetworkConfig, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Run until stop is set (or SIGINT/SIGTERM when stop is None)."""
    keys = cfg.data / "keys"
    log_key = load_or_create_signer(keys / "log", LOG_NAME)
    witness_keys = [load_or_create_signer(keys / f"witness{i + 1}", n, alg=ALG_COSIGNATURE_V1) for i, n in enumerate(WITNESS_NAMES)]
    registry_url = f"http://{cfg.host}:{cfg.port}"
    log_url = f"{registry_url}/log"
    witness_urls = [f"http://{cfg.host}:{cfg.port + 1 + i}" for i in range(len(witness_keys))]
    policy_text = network_policy(log_key, witness_keys, witness_urls)
    (cfg.data / "tlog-policy.txt").write_text(policy_text)
    log_list = parse_log_list(f"logs/v0\nvkey {log_key.vkey}\nqpd {2 * cfg.rounds_per_day}\nurl {log_url}\n")

    runners: list[web.AppRunner] = []
    closers = []
    try:
        for i, key in enumerate(witness_keys):
            state = WitnessState(str(cfg.data / f"witness{i + 1}"))
            closers.append(state.close)
            peers = [u for j, u in enumerate(witness_urls) if j != i]
            app = make_witness_app(Witness(signer=key, logs=log_list, state=state), peers=peers, gossip_interval=cfg.gossip_interval)
            runners.append(await _start(app, cfg, cfg.port + 1 + i))
        store = LMDBLogStore(str(cfg.data / "log"))
        closers.append(store.close)
        log = Log(store, log_key, witnessed=True)
        sequencer = Sequencer(log, interval=cfg.interval, witness_budget=RequestBudget(cfg.rounds_per_day))
        registry = Registry(sequencer=sequencer, blobs=BlobStore(str(cfg.data / "blobs")))
        app = make_app(registry, sequencer, witness_policy=parse_policy(policy_text.encode()), max_checkpoint_age=300.0)
        runners.append(await _start(app, cfg, cfg.port))
        write_trust_policy(cfg.data / "trust-policy.toml", policy_text)
        collector_url = f"http://{cfg.host}:{cfg.port + COLLECTOR_PORT_OFFSET}/v1/logs"
        runners.append(await _start(make_collector_app(cfg.data / "collector"), cfg, cfg.port + COLLECTOR_PORT_OFFSET))
        if cfg.announce:
            print(
                f"wasmlog network up (data in {cfg.data})\n"
                f"  registry  {registry_url}/api/v1/\n"
                f"  log       {log_url}/   origin {log.origin}\n"
                + "".join(f"  witness   {u}/\n" for u in witness_urls)
                + f"  collector {collector_url}   (agent.toml: telemetry = [\"{collector_url}\"])\n"
                f"  edge trust policy: {cfg.data / 'trust-policy.toml'}\n"
                f"  publish:  wasmlog publish --registry {registry_url} --key KEY NAMESPACE:NAME@VERSION MODULE.wasm",
                flush=True,
            )
        if ready is not None:
            ready.set()
        await _wait(stop)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for close in reversed(closers):
            close()


def write_trust_policy(path: pathlib.Path, tlog_policy: str, max_age: int = 86400) -> None:
    """The edge verifier's trust policy (spec/trust-policy.md) for this network."""
    body = tlog_policy.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    path.write_text(f'# wasmlog edge trust policy, written by `wasmlog up`\nmax_checkpoint_age = {max_age}\ntlog_policy = """\n{body}"""\n')


async def _start(app: web.Application, cfg: NetworkConfig, port: int) -> web.AppRunner:
    runner, _ = await start_server(app, cfg.limits, cfg.host, port)
    return runner


async def _wait(stop: asyncio.Event | None) -> None:
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
    await stop.wait()
