"""Witness gossip: read peers' latest cosigned checkpoints and check them against our own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import aiohttp

from tlog.client import TileClient
from tlog.note import MAX_NOTE_BYTES

from .witness import Witness

logger = logging.getLogger("wasmlog.gossip")
DEFAULT_GOSSIP_INTERVAL = 60.0


class Gossip:
    """Polls each peer's ``GET <prefix>/<sha256(origin)>/checkpoint`` for every known log."""

    def __init__(self, witness: Witness, peers: list[str], session: aiohttp.ClientSession, *, interval: float = DEFAULT_GOSSIP_INTERVAL) -> None:
        self.witness = witness
        self.peers = [p.rstrip("/") for p in peers]
        self.session = session
        self.interval = interval
        self.rounds = 0

    async def _peer_checkpoint(self, peer: str, origin: str) -> bytes | None:
        url = f"{peer}/{hashlib.sha256(origin.encode()).hexdigest()}/checkpoint"
        try:
            async with self.session.get(url) as r:
                if r.status != 200:
                    return None
                body = await r.content.read(MAX_NOTE_BYTES + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.info("gossip: %s: %r", url, e)
            return None
        return body if len(body) <= MAX_NOTE_BYTES else None

    async def round(self) -> dict[tuple[str, str], str]:
        """One pass over every peer and log; returns the outcome per (peer, origin)."""
        outcomes: dict[tuple[str, str], str] = {}
        for peer in self.peers:
            for origin, log in self.witness.logs.items():
                note = await self._peer_checkpoint(peer, origin)
                if note is None:
                    continue
                tiles = TileClient(log.url, self.session) if log.url else None
                outcome = await self.witness.observe(note, tiles)
                outcomes[(peer, origin)] = outcome
                logger.info("gossip: %s from %s: %s", origin, peer, outcome)
        self.rounds += 1
        return outcomes

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.round()
            await asyncio.sleep(self.interval)
