"""The witness: open the note, check the rules, cosign the re-encoding, persist, then reply."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

from tlog.checkpoint import Checkpoint, parse_checkpoint
from tlog.cosignature import cosign
from tlog.errors import MalformedError, SignatureError, UnverifiedNoteError
from tlog.note import Ed25519Signer, open_note

from .errors import Forbidden, TooManyRequests, UnknownOrigin
from .loglist import KnownLog
from tlog.witness_protocol import parse_add_checkpoint
from .rules import Tree, check_update
from .state import WitnessState

DAY = 86400


class Witness:
    def __init__(
        self, *, signer: Ed25519Signer, logs: Mapping[str, KnownLog], state: WitnessState,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = signer
        self.logs = dict(logs)
        self.state = state
        self.clock = clock
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._recent: defaultdict[str, deque[float]] = defaultdict(deque)
        self.by_origin_hash = {hashlib.sha256(o.encode()).hexdigest(): o for o in self.logs}

    def _rate_limit(self, log: KnownLog) -> None:
        """Allow at most qpd requests per log in any 24-hour window."""
        now = self.clock()
        recent = self._recent[log.origin]
        while recent and recent[0] <= now - DAY:
            recent.popleft()
        if len(recent) >= log.qpd:
            raise TooManyRequests(f"over {log.qpd} requests per day for {log.origin}")
        recent.append(now)

    async def add_checkpoint(self, body: bytes) -> bytes:
        """Handle one add-checkpoint request; return the cosignature line(s). Raises WitnessError/MalformedError."""
        req, note = parse_add_checkpoint(body)
        origin = note.text.split("\n", 1)[0]
        log = self.logs.get(origin)
        if log is None:
            raise UnknownOrigin(f"unknown log {origin!r}")
        self._rate_limit(log)
        try:
            opened, _ = open_note(req.checkpoint, [log.verifier])
        except (SignatureError, UnverifiedNoteError) as e:
            raise Forbidden(str(e)) from e
        cp = parse_checkpoint(opened.text)
        new = Tree(cp.size, cp.root_hash)
        async with self._locks[origin]:
            known = await asyncio.to_thread(self.state.latest, origin)
            check_update(known, req.old_size, req.proof, new)
            # Sign a re-encoding of what we parsed, not the bytes we were sent.
            text = Checkpoint(cp.origin, cp.size, cp.root_hash, cp.extensions).text()
            if text != opened.text:
                raise MalformedError("checkpoint does not re-encode")
            cosig = cosign(self.signer, text, int(self.clock()))
            stored = req.checkpoint + cosig.line().encode()
            await asyncio.to_thread(self.state.compare_and_swap, origin, known.size, new, stored)
        return cosig.line().encode()  # leaves only after the compare-and-swap is durable
