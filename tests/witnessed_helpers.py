"""A registry whose log publishes only checkpoints its witnesses cosigned: three real witness servers on
loopback (a quorum of two), whose clock is the test's, so the cosigned times are the ones the test sets."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from helpers import free_port
from registry_helpers import REGISTRY_KEY

from registry.blobs import BlobStore
from registry.client import RegistryClient
from registry.server import make_app
from registry.service import Registry
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Ed25519Verifier
from tlog.policy import parse_policy
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore
from witness.loglist import KnownLog
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

WITNESS_KEYS = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]


@dataclass
class Clock:
    """A clock the test moves (POSIX seconds); witnesses and agents read it."""

    now: float

    def __call__(self) -> float:
        return self.now


def tlog_policy(urls: list[str] | None = None) -> str:
    """The registry's log and the three witnesses, two of which must cosign (urls: where the log reaches them)."""
    lines = [f"log {REGISTRY_KEY.vkey}"]
    lines += [f"witness W{i} {k.vkey}" + (f" {urls[i]}" if urls else "") for i, k in enumerate(WITNESS_KEYS)]
    return "\n".join([*lines, "group g 2 W0 W1 W2", "quorum g"]) + "\n"


def trust_policy(extra: str = "") -> str:
    """A trust policy (TOML) for this network, with extra lines (require_status, max_status_age)."""
    return f'{extra}\ntlog_policy = """\n{tlog_policy()}"""\n'


async def start_witnessed_registry(aiohttp_client, aiohttp_server, tmp: pathlib.Path, clock: Clock) -> tuple[RegistryClient, Registry]:  # type: ignore[no-untyped-def]
    """The registry app on loopback, its log cosigned by three witness servers reading clock."""
    verifier = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
    urls = []
    for i, key in enumerate(WITNESS_KEYS):
        witness = Witness(signer=key, logs={REGISTRY_KEY.name: KnownLog(REGISTRY_KEY.name, verifier, 86400)},
                          state=WitnessState(str(tmp / f"witness{i}")), clock=clock)
        server = await aiohttp_server(make_witness_app(witness), port=free_port())
        urls.append(str(server.make_url("")).rstrip("/"))
    log = Log(LMDBLogStore(str(tmp / "log")), REGISTRY_KEY, witnessed=True)
    sequencer = Sequencer(log, interval=0.01, republish_interval=3600)
    registry = Registry(sequencer=sequencer, blobs=BlobStore(str(tmp / "blobs")))
    client = await aiohttp_client(make_app(registry, sequencer, witness_policy=parse_policy(tlog_policy(urls).encode())))
    return RegistryClient(str(client.make_url("")), client.session), registry
