"""The log's side of c2sp.org/tlog-witness: collect cosignatures until the policy quorum holds.

Each witness gets the checkpoint with a consistency proof from the size it last
cosigned; a 409 tells us that size and we re-prove from it. Only cosignatures
that verify are counted, and the quorum is the policy's (c2sp.org/tlog-policy).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from .checkpoint import Checkpoint, parse_decimal
from .cosignature import cosignature_timestamp
from .errors import MalformedError, TlogError
from .note import NoteSignature, parse_note
from .policy import Policy, PolicyWitness
from .witness_protocol import AddCheckpoint

log = logging.getLogger("wasmlog.witnessing")

Prover = Callable[[int, int], Awaitable[list[bytes]]]  # (old size, new size) -> consistency proof
DEFAULT_WITNESS_TIMEOUT = 5.0
MAX_RESPONSE_BYTES = 64 << 10
MAX_409_RETRIES = 3
REUSE_SECONDS = 60.0  # a witness's cosignature of an unchanged checkpoint is reused this long
DAY = 86400.0
DEFAULT_BUDGET_BURST = 10


class RequestBudget:
    """The log's own pace: cosigning rounds (one request to each witness) from a token bucket
    holding `burst`, refilled at `per_day` a day. In any day and 15 minutes (the window a wasmlog
    witness counts) that is at most per_day * 97/96 + burst: the witnesses' qpd must allow it.
    """

    def __init__(self, per_day: int, *, burst: int = DEFAULT_BUDGET_BURST, clock: Callable[[], float] = time.monotonic) -> None:
        if per_day < 1 or burst < 1:
            raise ValueError("need per_day >= 1 and burst >= 1")
        self.per_second = per_day / DAY
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._when = clock()
        self.waits = 0  # rounds that had to wait for the budget

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._when) * self.per_second)
        self._when = now

    async def take(self) -> None:
        """Wait until a round is within the budget, then spend it."""
        self._refill()
        if self._tokens < 1:
            self.waits += 1
        while self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) / self.per_second)
            self._refill()
        self._tokens -= 1


class WitnessFailure(TlogError):
    """One witness did not cosign."""


class QuorumError(TlogError):
    """Not enough witnesses cosigned within the timeout: the checkpoint must not be published."""


class WitnessClient:
    """Talks to one witness; remembers the size it last cosigned for our log."""

    def __init__(self, witness: PolicyWitness, session: aiohttp.ClientSession) -> None:
        if not witness.url:
            raise TlogError(f"witness {witness.name} has no URL in the policy")
        self.witness = witness
        self.url = witness.url.rstrip("/") + "/add-checkpoint"
        self.session = session
        self.known_size = 0
        self.latency: float | None = None
        self.failures = 0
        self.cosigned: tuple[Checkpoint, NoteSignature] | None = None  # its latest cosignature for us

    def _reusable(self, cp: Checkpoint, max_age: float) -> NoteSignature | None:
        if self.cosigned is None or self.cosigned[0] != cp:
            return None
        sig = self.cosigned[1]
        return sig if 0 <= time.time() - cosignature_timestamp(sig.signature) < max_age else None

    async def cosign(self, note: bytes, cp: Checkpoint, prove: Prover, *, reuse_for: float = 0.0) -> NoteSignature:
        """Return this witness's verified cosignature of cp. Raises WitnessFailure.

        Without asking, if it cosigned this very checkpoint less than reuse_for seconds ago.
        """
        start = time.monotonic()
        reused = self._reusable(cp, reuse_for)
        if reused is not None:
            self.latency = 0.0
            return reused
        old = self.known_size
        for _ in range(MAX_409_RETRIES):
            if old > cp.size:
                raise WitnessFailure(f"{self.witness.name} has cosigned size {old} > {cp.size}: a fork or a rollback")
            proof = await prove(old, cp.size) if 0 < old < cp.size else []
            try:
                async with self.session.post(self.url, data=AddCheckpoint(old, tuple(proof), note).encode()) as r:
                    body = await r.content.read(MAX_RESPONSE_BYTES)
                    status = r.status
            except (TimeoutError, aiohttp.ClientError) as e:
                raise WitnessFailure(f"{self.witness.name}: {e!r}") from e
            if status == 409:
                try:
                    old = parse_decimal(body.decode("ascii").removesuffix("\n"), "witness size")
                except (UnicodeDecodeError, MalformedError) as e:
                    raise WitnessFailure(f"{self.witness.name}: malformed 409 body") from e
                continue
            if status != 200:
                raise WitnessFailure(f"{self.witness.name}: HTTP {status}: {body[:200]!r}")
            sig = self._verified(body, cp)
            self.known_size = cp.size
            self.cosigned = (cp, sig)
            self.latency = time.monotonic() - start
            return sig
        raise WitnessFailure(f"{self.witness.name}: too many 409 answers")

    def _verified(self, body: bytes, cp: Checkpoint) -> NoteSignature:
        """Find and check this witness's cosignature among the returned signature lines."""
        try:
            lines = parse_note(cp.text().encode() + b"\n" + body).signatures
        except TlogError as e:
            raise WitnessFailure(f"{self.witness.name}: malformed cosignature lines") from e
        v = self.witness.verifier
        for sig in lines:
            if sig.name == v.name and sig.key_id == v.key_id:
                if v.verify(cp.text().encode(), sig.signature):
                    return sig
                raise WitnessFailure(f"{self.witness.name}: cosignature does not verify")
        raise WitnessFailure(f"{self.witness.name}: no cosignature by its key")


class Cosigner:
    """Collects cosignatures for our checkpoints from the witnesses of a policy."""

    def __init__(self, policy: Policy, session: aiohttp.ClientSession, *, timeout: float = DEFAULT_WITNESS_TIMEOUT) -> None:
        self.policy = policy
        self.timeout = timeout
        self.clients = [WitnessClient(w, session) for w in policy.witnesses.values() if w.url]
        self.on_result: Callable[[str, float | None], None] | None = None  # (witness, latency or None if failed)

    def resume(self, published_note: bytes, size: int) -> None:
        """Start each witness whose valid cosignature is on our published note at that size, not 0.

        A restarted log then needs no 409 (a refused request) to find witnesses that are in step.
        """
        if not published_note:
            return
        note = parse_note(published_note)
        text = note.text.encode()
        for c in self.clients:
            v = c.witness.verifier
            if any(s.name == v.name and s.key_id == v.key_id and v.verify(text, s.signature) for s in note.signatures):
                c.known_size = max(c.known_size, size)

    def _report(self, witness: str, seconds: float | None) -> None:
        if self.on_result is not None:
            self.on_result(witness, seconds)

    async def cosign(self, note: bytes, cp: Checkpoint, prove: Prover, *, refresh: bool = False) -> bytes:
        """Return note with the cosignatures gathered within the timeout. Raises QuorumError.

        Unless refresh (new timestamps wanted), a witness that cosigned cp in the last
        REUSE_SECONDS is not asked again: the retries after a missed quorum cost it nothing.
        """
        reuse_for = 0.0 if refresh else REUSE_SECONDS
        tasks = {asyncio.create_task(c.cosign(note, cp, prove, reuse_for=reuse_for)): c for c in self.clients}
        got: dict[str, NoteSignature] = {}
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.timeout)
            for t in pending:
                t.cancel()
                tasks[t].failures += 1
                self._report(tasks[t].witness.name, None)
                log.warning("witness %s timed out after %.1fs", tasks[t].witness.name, self.timeout)
            for t in done:
                client = tasks[t]
                if t.exception() is None:
                    got[client.witness.name] = t.result()
                    self._report(client.witness.name, client.latency)
                else:
                    client.failures += 1
                    self._report(client.witness.name, None)
                    log.warning("witness %s: %s", client.witness.name, t.exception())
        if not self.policy.satisfied(got):
            raise QuorumError(f"witness quorum not met for size {cp.size}: cosigned by {sorted(got) or 'none'}")
        return note + b"".join(got[c.witness.name].line().encode() for c in self.clients if c.witness.name in got)
