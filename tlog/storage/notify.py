"""PostgreSQL notifications (LISTEN) heard in a thread of their own: a way to look sooner, never the only one.

A Listener holds one connection (with the integrator's lock session's TCP keepalives) that LISTENs
on some channels and calls notified(channel) for each notification, and notified("") whenever it
(re)connects, since notifications sent while it was away are lost. A lost connection is retried
every RETRY_SECONDS; callers keep polling whatever they watch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .pg import connect

log = logging.getLogger("wasmlog.storage.notify")

LISTEN_SECONDS = 0.5  # the longest wait between looks at whether to stop
RETRY_SECONDS = 1.0


class Listener:
    """Start with start(), end with stop() (waits up to LISTEN_SECONDS for the thread)."""

    def __init__(self, dsn: str, channels: Sequence[str], notified: Callable[[str], None], keepalives: Sequence[tuple[str, int]] = ()) -> None:
        self.dsn, self.channels, self.notified, self.keepalives = dsn, list(channels), notified, list(keepalives)
        self.listening = False  # connected and listening: notifications arrive
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlog-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        self._thread.join()

    def _run(self) -> None:
        import psycopg

        try:
            while not self._closing.is_set():
                try:
                    with connect(self.dsn, self.keepalives) as conn:
                        for channel in self.channels:
                            conn.execute(f"LISTEN {channel}")
                        self.listening = True
                        self._tell("")
                        while not self._closing.is_set():
                            for notification in conn.notifies(timeout=LISTEN_SECONDS):
                                self._tell(notification.channel)
                except psycopg.Error:
                    self.listening = False
                    self._closing.wait(RETRY_SECONDS)
        finally:  # whatever ended it: notifications no longer arrive
            self.listening = False

    def _tell(self, channel: str) -> None:
        """notified(channel); a failure of it is logged, not the end of listening."""
        try:
            self.notified(channel)
        except Exception:
            log.exception("a listener of %r failed", channel or "(re)connection")
