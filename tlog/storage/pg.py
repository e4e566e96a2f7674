"""A session of the log's PostgreSQL database with settings of its own (psycopg 3, the shared extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONNECT_TIMEOUT = 5  # seconds


def connect(dsn: str, settings: Sequence[tuple[str, int]] = ()) -> Any:
    """An autocommit connection with each (setting, integer value) SET for its session, in one round trip.
    Raises psycopg.Error."""
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
    if settings:
        try:
            conn.execute("; ".join(f"SET {name} = {int(value)}" for name, value in settings))
        except BaseException:
            conn.close()
            raise
    return conn
