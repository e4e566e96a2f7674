"""The witness's two budgets, both in bounded memory.

A log's ``qpd`` counts only the cosignatures a request won (WindowCounter), so a
replay of the log's public checkpoint spends nothing of it. Refused requests are
counted per client instead (RefusalLimiter): token buckets keyed by address.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

DAY = 86400.0
WINDOW_SLOTS = 96  # a day in 15-minute slots
REFUSAL_BURST = 120  # refused requests a client may make at once ...
REFUSAL_PER_SECOND = 1.0  # ... and then one a second: a log needs a few 409s per restart
MAX_CLIENTS = 8192


class WindowCounter:
    """At most `limit` events in any `window` seconds, counted in `slots` buckets.

    The window counted is between `window` and one slot longer: never more than `limit` get through.
    """

    def __init__(self, limit: int, window: float = DAY, slots: int = WINDOW_SLOTS) -> None:
        self.limit = limit
        self.slots = slots
        self._slot_seconds = window / slots
        self._counts: deque[list[int]] = deque()  # [slot, events], oldest first
        self._total = 0

    def count(self, now: float) -> int:
        """Events in the window ending at now."""
        oldest = int(now // self._slot_seconds) - self.slots
        while self._counts and self._counts[0][0] < oldest:
            self._total -= self._counts.popleft()[1]
        return self._total

    def full(self, now: float) -> bool:
        return self.count(now) >= self.limit

    def add(self, now: float) -> None:
        self.count(now)
        slot = int(now // self._slot_seconds)
        if self._counts and self._counts[-1][0] >= slot:  # same slot (or the clock went back)
            self._counts[-1][1] += 1
        else:
            self._counts.append([slot, 1])
        self._total += 1


class RefusalLimiter:
    """Per-client token buckets for refused requests: `burst` at once, refilled at `per_second`.

    At most `max_clients` are tracked; the least recently refused is forgotten first (it starts
    again with a full bucket, which only ever favours the client).
    """

    def __init__(
        self, *, burst: int = REFUSAL_BURST, per_second: float = REFUSAL_PER_SECOND, max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or per_second < 0 or max_clients < 1:
            raise ValueError("need burst >= 1, per_second >= 0 and max_clients >= 1")
        self.burst = burst
        self.per_second = per_second
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def _tokens(self, client: str, now: float) -> float:
        bucket = self._buckets.get(client)
        if bucket is None:
            return float(self.burst)
        tokens, when = bucket
        return min(float(self.burst), tokens + max(0.0, now - when) * self.per_second)

    def exhausted(self, client: str) -> bool:
        """True when client has no refused request left to spend."""
        return self._tokens(client, self.clock()) < 1

    def charge(self, client: str) -> None:
        """Spend one of client's refused requests."""
        now = self.clock()
        self._buckets[client] = (max(0.0, self._tokens(client, now) - 1), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(remote: str | None) -> str:
    """The key a client's refusals are counted under: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
