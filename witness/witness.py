"""The witness: open the note, check the rules, cosign the re-encoding, persist, then reply.

It also takes checkpoints seen elsewhere (gossip): a newer one is adopted only
with a consistency proof computed from the log's tiles, and two checkpoints the
log signed that cannot both be true are kept as evidence, freezing that log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.client import TileClient
from tlog.cosignature import cosign, cosignature_timestamp
from tlog.errors import (
    MalformedError,
    ProofError,
    SignatureError,
    SplitViewError,
    TlogError,
    UnverifiedNoteError,
)
from tlog.merkle import check_extends
from tlog.note import Ed25519Signer, Note, b64encode, open_note, parse_note
from tlog.witness_protocol import AddCheckpoint, parse_add_checkpoint

from .errors import (
    ClientOverBudget,
    Forbidden,
    Frozen,
    LogOverBudget,
    SplitViewProof,
    TooManyRequests,
    UnknownOrigin,
)
from .loglist import KnownLog
from .ratelimit import DAY, RefusalLimiter, WindowCounter
from .rules import Tree, check_update
from .state import WitnessState

MIN_REFRESH_AGE = 30.0  # seconds; the log asks again for an unchanged tree every 60 s by default
logger = logging.getLogger("wasmlog.witness")


class Witness:
    def __init__(
        self, *, signer: Ed25519Signer, logs: Mapping[str, KnownLog], state: WitnessState,
        clock: Callable[[], float] = time.time, refusals: RefusalLimiter | None = None,
    ) -> None:
        self.signer = signer
        self.logs = dict(logs)
        self.state = state
        self.clock = clock
        self.refusals = refusals if refusals is not None else RefusalLimiter()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._budgets = {origin: WindowCounter(log.qpd) for origin, log in self.logs.items()}
        self.by_origin_hash = {hashlib.sha256(o.encode()).hexdigest(): o for o in self.logs}

    def charged(self, origin: str) -> int:
        """Cosignatures of new trees charged to origin's qpd in the last day."""
        return self._budgets[origin].count(self.clock())

    def refresh_age(self, log: KnownLog) -> float:
        """A request for the tree already cosigned gets the stored cosignature until it is this old."""
        return max(MIN_REFRESH_AGE, DAY / log.qpd)

    def _open(self, note_bytes: bytes) -> tuple[KnownLog, Note, Checkpoint]:
        """Verify the log's signature on a checkpoint note. Raises UnknownOrigin, Forbidden, MalformedError."""
        origin = note_bytes.split(b"\n", 1)[0].decode("utf-8", "replace")
        log = self.logs.get(origin)
        if log is None:
            raise UnknownOrigin(f"unknown log {origin!r}")
        try:
            opened, verified = open_note(note_bytes, [log.verifier])
        except (SignatureError, UnverifiedNoteError) as e:
            raise Forbidden(str(e)) from e
        cp = parse_checkpoint(opened.text)
        # Keep only the log's signature: we never pass on lines we did not verify.
        return log, Note(opened.text, tuple(verified)), cp

    async def _cosign_and_store(self, cp: Checkpoint, log_note: Note, old_size: int) -> bytes:
        # Sign a re-encoding of what we parsed, not the bytes we were sent.
        text = cp.text()
        if text != log_note.text:
            raise MalformedError("checkpoint does not re-encode")
        cosig = cosign(self.signer, text, int(self.clock())).line().encode()
        new = Tree(cp.size, cp.root_hash)
        await asyncio.to_thread(self.state.compare_and_swap, cp.origin, old_size, new, log_note.encode() + cosig)
        return cosig  # leaves only after the compare-and-swap is durable

    async def add_checkpoint(self, body: bytes, client: str = "") -> bytes:
        """Handle one add-checkpoint request from client; return the cosignature line.

        Only a request that gets a new tree cosigned is charged to the log's qpd. A refused
        request (400/403/404/409/422) is charged to client instead; a client with none left
        gets 429 for anything but a request whose old size is the one this witness holds.
        Raises WitnessError/MalformedError.
        """
        try:
            return await self._add_checkpoint(body, client)
        except TooManyRequests:
            raise
        except TlogError:
            self.refusals.charge(client)
            raise

    async def _in_step(self, req: AddCheckpoint) -> bool:
        """Whether req's old size is the size this witness holds for its origin (as a log in step sends)."""
        origin = req.checkpoint.split(b"\n", 1)[0].decode("utf-8", "replace")
        if origin not in self.logs:
            return False
        return req.old_size == (await asyncio.to_thread(self.state.latest, origin)).size

    async def _add_checkpoint(self, body: bytes, client: str) -> bytes:
        over = self.refusals.exhausted(client)
        try:
            req, _ = parse_add_checkpoint(body)
        except MalformedError:
            if over:
                raise ClientOverBudget("too many refused requests from this client") from None
            raise
        if over and not await self._in_step(req):
            raise ClientOverBudget("too many refused requests from this client")
        log, log_note, cp = self._open(req.checkpoint)
        async with self._locks[cp.origin]:
            if await asyncio.to_thread(self.state.is_frozen, cp.origin):
                raise Frozen(f"split-view evidence is held for {cp.origin}")
            known = await asyncio.to_thread(self.state.latest, cp.origin)
            try:
                check_update(known, req.old_size, req.proof, Tree(cp.size, cp.root_hash))
            except SplitViewProof as e:  # only a proof of two histories is evidence; any other bad proof is not
                await self._record_split_view(cp.origin, log_note.encode(), req.proof, str(e))
                raise SplitViewProof(f"{e}: kept as evidence") from None
            if cp.size == known.size:
                # The tree already cosigned (check_update compared the roots): anyone can replay
                # it, so it is never charged; it is re-signed at most once per refresh_age.
                stored = await self._stored_cosignature(cp.origin, self.refresh_age(log))
                return stored or await self._cosign_and_store(cp, log_note, known.size)
            budget = self._budgets[cp.origin]
            if budget.full(self.clock()):
                raise LogOverBudget(f"over {log.qpd} cosignatures per day for {log.origin}")
            cosig = await self._cosign_and_store(cp, log_note, known.size)
            budget.add(self.clock())
            return cosig

    async def _stored_cosignature(self, origin: str, max_age: float) -> bytes | None:
        """Our stored cosignature line for origin if it is younger than max_age seconds."""
        stored = await asyncio.to_thread(self.state.cosigned_checkpoint, origin)
        if stored is None:
            return None
        ours = [s for s in parse_note(stored).signatures if (s.name, s.key_id) == (self.signer.name, self.signer.key_id)]
        if ours and self.clock() - cosignature_timestamp(ours[0].signature) < max_age:
            return ours[0].line().encode()
        return None

    async def _record_split_view(self, origin: str, other: bytes, proof: Sequence[bytes], reason: str) -> None:
        ours = await asyncio.to_thread(self.state.cosigned_checkpoint, origin)
        record = {
            "origin": origin,
            "kind": "split-view",
            "reason": reason,
            "cosigned": (ours or b"").decode(),
            "other": other.decode(),
            "proof": [b64encode(h) for h in proof],
            "time": int(self.clock()),
        }
        await asyncio.to_thread(self.state.add_evidence, origin, json.dumps(record, sort_keys=True).encode())
        logger.critical("SPLIT VIEW for %s (%s): evidence kept, no more cosignatures for this log", origin, reason)

    @staticmethod
    async def _split_view(tiles: TileClient, small: Tree, big: Tree, proof: Sequence[bytes]) -> str | None:
        """Check the tiles' proof between two log-signed trees: None if consistent, why if it proves two histories.

        Raises ProofError if the proof merely fails (the tiles may be wrong: that proves
        nothing about the log). A proof from an exact power of two cannot by itself show
        another old root, so the big tree's node over the old range is read from the tiles
        too: if the proof yields the big root from that node, the big tree's prefix is that node.
        """
        try:
            check_extends(small.size, small.root_hash, big.size, big.root_hash, proof)
            return None
        except SplitViewError as e:
            return f"inconsistent: {e}"
        except ProofError:
            if small.size & (small.size - 1):
                raise
            prefix = await tiles.tree_hash(small.size, at=big.size)
            if prefix == small.root_hash:
                raise
            check_extends(small.size, prefix, big.size, big.root_hash, proof)  # raises if the tiles are wrong too
            return f"inconsistent: the tree of size {big.size} has the root {b64encode(prefix)} at size {small.size}"

    async def observe(self, note_bytes: bytes, tiles: TileClient | None) -> str:
        """Take a log checkpoint seen elsewhere (from a peer). Returns what happened, for logs and tests."""
        try:
            _, log_note, cp = self._open(note_bytes)
        except TlogError as e:
            return f"rejected: {e}"
        async with self._locks[cp.origin]:
            if await asyncio.to_thread(self.state.is_frozen, cp.origin):
                return "frozen"
            known = await asyncio.to_thread(self.state.latest, cp.origin)
            small, big = (known, Tree(cp.size, cp.root_hash)) if known.size <= cp.size else (Tree(cp.size, cp.root_hash), known)
            proof: list[bytes] = []
            if small.size in (0, big.size):  # decided without a proof
                try:
                    check_extends(small.size, small.root_hash, big.size, big.root_hash, proof)
                except SplitViewError:
                    await self._record_split_view(cp.origin, log_note.encode(), [], "same size, different root")
                    return "split view"
                except ProofError:
                    return "rejected: a size-0 checkpoint with a non-empty root"
                if cp.size == known.size:
                    return "same"
            else:
                if tiles is None:
                    return "unverifiable: no URL for this log"
                try:
                    proof = await tiles.consistency_proof(small.size, big.size)
                    split = await self._split_view(tiles, small, big, proof)
                except ProofError as e:  # the tiles' proof fails: that proves nothing about the log
                    return f"unverifiable: the tiles' consistency proof fails: {e}"
                except TlogError as e:
                    return f"unverifiable: {e}"
                if split is not None:
                    await self._record_split_view(cp.origin, log_note.encode(), proof, split)
                    return "split view"
            if cp.size < known.size:
                return "older, consistent"
            await self._cosign_and_store(cp, log_note, known.size)
            return "advanced"
