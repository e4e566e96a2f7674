"""Delivery of the spool to one OTLP/HTTP JSON logs sink: in order, at-least-once, resumed after a restart.

Each sink has its own cursor in the spool (the newest seq it acknowledged). A batch is the events
after the cursor, sent as one ExportLogsServiceRequest (`Content-Type: application/json`). Per the
OTLP/HTTP specification: 200 is success (a `partialSuccess` with rejected records is not retried:
the rejection is reported as a drop event); 429, 502, 503, 504 and connection failures are
retried with capped exponential backoff and jitter, honouring `Retry-After`; 413 halves the batch;
every other status is not retried (reported as a drop event, then the cursor moves on). An
event keeps its id and seq on every retry, so a collector can drop duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from .telemetry_events import DROPPED, Draft, Event
from .telemetry_otlp import encode_request
from .telemetry_spool import Spool

logger = logging.getLogger("wasmlog.agent.telemetry")
RETRYABLE = frozenset({429, 502, 503, 504})
BATCH_EVENTS = 512
BACKOFF_BASE = 0.2  # seconds before the first retry; doubled on each failure in a row
BACKOFF_CAP = 30.0
MAX_RETRY_AFTER = 300.0
MAX_RESPONSE_BYTES = 64 << 10
POST_TIMEOUT = aiohttp.ClientTimeout(total=30)


def backoff(failures: int, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failures in a row: Retry-After when the sink gave one (at most
    MAX_RETRY_AFTER), else BACKOFF_BASE doubled per failure up to BACKOFF_CAP, jittered to 50-100%."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER)
    return min(BACKOFF_CAP, BACKOFF_BASE * float(2 ** min(failures - 1, 30))) * (0.5 + rng() / 2)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit() and len(value) <= 9:
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return float(email.utils.parsedate_to_datetime(value).timestamp()) - now
    return None


@dataclass
class SinkStatus:
    url: str
    delivered_through: int = 0
    failures: int = 0  # in a row
    last_error: str | None = None
    next_attempt: float | None = None  # POSIX seconds, while backing off

    def as_json(self) -> dict[str, object]:
        return dict(self.__dict__)


class Shipper:
    """Ships spool to url until cancelled; report is how a rejection becomes an event."""

    def __init__(self, spool: Spool, url: str, report: Callable[[Draft], Awaitable[object]]) -> None:
        self.spool = spool
        self.url = url
        self.report = report
        self.wake = asyncio.Event()
        self.status = SinkStatus(url, spool.cursor(url))

    async def run(self, session: aiohttp.ClientSession) -> None:
        limit = BATCH_EVENTS
        while True:
            self.wake.clear()
            events = await asyncio.to_thread(self.spool.read, self.status.delivered_through, limit)
            if not events:
                await self.wake.wait()
                continue
            outcome, retry_after, message = await self._post(session, events)
            if outcome == "retry":
                self.status.failures += 1
                self.status.last_error = message
                delay = backoff(self.status.failures, retry_after)
                self.status.next_attempt = time.time() + delay
                logger.info("telemetry sink %s: %s; retrying in %.1fs", self.url, message, delay)
                await asyncio.sleep(delay)  # the backoff itself, not ordering
                continue
            if outcome == "too-large" and len(events) > 1:
                limit = max(1, len(events) // 2)
                continue
            if outcome != "ok":
                logger.warning("telemetry sink %s refused (some of) seq %d..%d: %s", self.url, events[0].seq, events[-1].seq, message)
                await self.report(self._refusal(events, outcome, message))
            await asyncio.to_thread(self.spool.ack, self.url, events[-1].seq)
            self.status.delivered_through = events[-1].seq
            self.status.failures, self.status.next_attempt = 0, None
            limit = BATCH_EVENTS

    def _refusal(self, events: list[Event], outcome: str, message: str) -> Draft:
        """The drop event for a refused batch: its whole range, or (a partial success) only how many were rejected."""
        whole = not outcome.startswith("partial:")
        rejected = len(events) if whole else int(outcome.removeprefix("partial:"))
        return Draft.of(DROPPED, f"{self.url} refused {rejected} of seq {events[0].seq}..{events[-1].seq}: {message}", {
            "wasmlog.count": rejected, "wasmlog.dropped.first_seq": events[0].seq if whole else None,
            "wasmlog.dropped.last_seq": events[-1].seq if whole else None, "wasmlog.dropped.undelivered": rejected,
            "wasmlog.dropped.sink": self.url})

    async def _post(self, session: aiohttp.ClientSession, events: list[Event]) -> tuple[str, float | None, str]:
        """(ok | retry | too-large | refused | partial:<records rejected>, Retry-After seconds, what happened)."""
        body = json.dumps(encode_request(events), separators=(",", ":")).encode()
        try:
            async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}, timeout=POST_TIMEOUT) as r:
                text = (await r.content.read(MAX_RESPONSE_BYTES)).decode("utf-8", "replace")
                if r.status == 200:
                    return _success(text)
                retry_after = parse_retry_after(r.headers.get("Retry-After"), time.time())
                what = f"HTTP {r.status}: {_status_message(text)}"
                if r.status in RETRYABLE:
                    return "retry", retry_after, what
                return ("too-large" if r.status == 413 else "refused"), None, what
        except (TimeoutError, aiohttp.ClientError, OSError) as e:  # unreachable, reset, no answer: retry
            return "retry", None, f"{type(e).__name__}: {e}"[:300]


def _success(text: str) -> tuple[str, None, str]:
    """A 200: full success, or a partial success whose rejected records are not retried."""
    try:
        obj = json.loads(text) if text.strip() else {}
        partial = obj.get("partialSuccess") if type(obj) is dict else None
        rejected = int(partial.get("rejectedLogRecords") or 0) if type(partial) is dict else 0
    except (ValueError, TypeError, AttributeError):
        return "ok", None, "a 200 whose body is not an ExportLogsServiceResponse"
    if rejected > 0:
        return f"partial:{rejected}", None, f"partial success: {rejected} records rejected: {str(partial.get('errorMessage', ''))[:200]}"  # type: ignore[union-attr]
    return "ok", None, "delivered"


def _status_message(text: str) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(text).get("message", ""))[:200] or text[:200]
    return text[:200]
