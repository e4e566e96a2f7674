"""Witness gossip: read peers' latest cosigned checkpoints and check them against our own.

Every fetch is counted per peer and outcome; a peer that cannot be reached or answers
garbage is logged, and after ``unhealthy_after`` failed rounds in a row it is named by
the witness's GET /healthz.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from tlog.client import TileClient, failure_kind, fetch
from tlog.errors import NotFoundError
from tlog.note import MAX_NOTE_BYTES

from .witness import Witness

logger = logging.getLogger("wasmlog.gossip")
DEFAULT_GOSSIP_INTERVAL = 60.0
DEFAULT_UNHEALTHY_AFTER = 3  # failed rounds in a row before /healthz names the peer
MAX_OUTCOME_CHARS = 300  # what is logged and kept of an outcome


@dataclass
class PeerHealth:
    failed_rounds: int = 0  # rounds in a row in which the peer failed (unreachable or garbage)
    last_error: str | None = None


class Gossip:
    """Polls each peer's ``GET <prefix>/<sha256(origin)>/checkpoint`` for every known log."""

    def __init__(
        self, witness: Witness, peers: list[str], session: aiohttp.ClientSession, *, interval: float = DEFAULT_GOSSIP_INTERVAL,
        unhealthy_after: int = DEFAULT_UNHEALTHY_AFTER, registry: CollectorRegistry | None = None,
    ) -> None:
        self.witness = witness
        self.peers = [p.rstrip("/") for p in peers]
        self.session = session
        self.interval = interval
        self.unhealthy_after = unhealthy_after
        self.rounds = 0
        self.health = {p: PeerHealth() for p in self.peers}
        registry = registry or CollectorRegistry()
        self.fetches = Counter("wasmlog_witness_gossip_fetches", "Gossip fetches by peer and outcome "
                               "(ok, not-found, unreachable, bad-response, internal)", ["peer", "outcome"], registry=registry)
        failed = Gauge("wasmlog_witness_gossip_peer_failed_rounds", "Gossip rounds in a row in which the peer failed", ["peer"], registry=registry)
        for peer in self.peers:
            failed.labels(peer).set_function(lambda peer=peer: self.health[peer].failed_rounds)  # type: ignore[misc]

    async def _peer_checkpoint(self, peer: str, origin: str) -> bytes | None:
        """The peer's cosigned checkpoint for origin; None if it has none (404). Raises FetchError, TooLargeError."""
        path = f"{hashlib.sha256(origin.encode()).hexdigest()}/checkpoint"
        try:
            return await fetch(self.session, f"{peer}/{path}", MAX_NOTE_BYTES, what=path)
        except NotFoundError:
            return None

    async def round(self) -> dict[tuple[str, str], str]:
        """One pass over every peer and log; returns the outcome per (peer, origin)."""
        outcomes: dict[tuple[str, str], str] = {}
        for peer in self.peers:
            failure = None
            for origin, log in self.witness.logs.items():
                try:
                    note = await self._peer_checkpoint(peer, origin)
                except Exception as e:  # noqa: BLE001 - a failed peer is counted, logged and reported, never fatal
                    kind = failure_kind(e)
                    failure = f"{origin}: {kind}: {e}"
                    outcomes[(peer, origin)] = f"failed: {kind}: {e}"
                    self.fetches.labels(peer, kind).inc()
                    # A peer that is down is news once it stays down (a network starting up is not).
                    level = logging.WARNING if self.health[peer].failed_rounds + 1 >= self.unhealthy_after else logging.INFO
                    logger.log(level, "gossip: peer %s, log %s: %s: %s", peer, origin, kind, e)
                    continue
                if note is None:
                    self.fetches.labels(peer, "not-found").inc()
                    continue
                tiles = TileClient(log.url, self.session) if log.url else None
                try:
                    outcome = await self.witness.observe(note, tiles)
                except Exception as e:
                    outcome = f"unverifiable: {e!r}"
                    logger.exception("gossip: checking %s's checkpoint of %s failed", peer, origin)
                outcome = outcome if len(outcome) <= MAX_OUTCOME_CHARS else outcome[:MAX_OUTCOME_CHARS] + "..."  # it may quote the peer
                if outcome.startswith("rejected"):  # not a checkpoint the log signed: the peer answers garbage
                    failure = f"{origin}: bad-response: {outcome}"
                    self.fetches.labels(peer, "bad-response").inc()
                    logger.warning("gossip: peer %s, log %s: %s", peer, origin, outcome)
                else:
                    self.fetches.labels(peer, "ok").inc()
                    logger.info("gossip: %s from %s: %s", origin, peer, outcome)
                outcomes[(peer, origin)] = outcome
            health = self.health[peer]
            health.failed_rounds = health.failed_rounds + 1 if failure else 0
            health.last_error = failure or health.last_error
        self.rounds += 1
        return outcomes

    def unhealthy_peers(self) -> dict[str, PeerHealth]:
        """The peers that failed unhealthy_after rounds in a row, or more."""
        return {p: h for p, h in self.health.items() if h.failed_rounds >= self.unhealthy_after}

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception:
                logger.exception("gossip round failed")
            await asyncio.sleep(self.interval)
