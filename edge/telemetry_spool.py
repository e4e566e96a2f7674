"""The agent's write-ahead telemetry spool: LMDB under DATA/telemetry, synced on every commit.

Sub-databases: `events` (seq as 8 bytes big-endian -> the event's JSON) and `meta` (the node id,
the next seq, the chain head, the bytes held, each sink's delivered-through seq, drop counters,
and small facts the agent remembers with an event, such as the last checkpoint size seen).
An event is on disk (fsynced) when append returns, so a SIGKILL loses nothing appended.

The spool holds at most max_bytes of events. Delivery is in order, so the events delivered to
every sink are always the oldest: making room drops the oldest events (delivered ones first by
construction, then undelivered ones), and every drop is itself an event (wasmlog.telemetry.dropped,
with the range of seqs and how many were never delivered), written in the same transaction.
"""

from __future__ import annotations

import json
import pathlib
import secrets
import struct
import threading
from collections.abc import Iterator, Sequence

import lmdb

from .telemetry_events import DROPPED, GENESIS, Draft, Event, EventError, chain, event_from_json

DROP_RESERVE = 1024  # room kept for the drop event itself
RECORD_OVERHEAD = 320  # more than a record's fields besides its name, body and attributes take
_SEQ = struct.Struct(">Q")


class SpoolError(Exception):
    """The spool cannot be used: damaged (a record that is not an event), or not a telemetry spool."""


def _encode(e: Event) -> bytes:
    return json.dumps(e.as_json(), ensure_ascii=True, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Event:
    try:
        return event_from_json(json.loads(raw))
    except (ValueError, EventError) as err:
        raise SpoolError(f"a spool record is not an event: {err}") from None


class Spool:
    def __init__(self, path: pathlib.Path, max_bytes: int, sinks: Sequence[str] = (), *, readonly: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.sinks = tuple(sinks)
        self._lock = threading.Lock()  # one append at a time: the chain is built in the order of calls
        if not readonly:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not (path / "data.mdb").exists():
            raise SpoolError(f"{path} holds no telemetry spool")
        self._env = lmdb.open(str(path), map_size=4 * max_bytes + (64 << 20), max_dbs=2, sync=True, metasync=True,
                              readonly=readonly)
        self._events = self._env.open_db(b"events", create=not readonly)
        self._meta = self._env.open_db(b"meta", create=not readonly)
        node = self._get(b"node")
        if node is None:
            if readonly:
                raise SpoolError(f"{path} is not a telemetry spool (no node id)")
            with self._env.begin(write=True) as txn:
                txn.put(b"node", secrets.token_hex(16).encode(), db=self._meta)
            node = self._get(b"node")
        assert node is not None
        self.node = node.decode()

    def close(self) -> None:
        self._env.close()

    def _get(self, key: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        if txn is None:
            with self._env.begin() as t:
                return self._get(key, t)
        raw = txn.get(key, db=self._meta)
        return None if raw is None else bytes(raw)

    def _int(self, txn: lmdb.Transaction, key: bytes, default: int = 0) -> int:
        raw = txn.get(key, db=self._meta)
        return default if raw is None else int(raw)

    def meta(self, key: str) -> str | None:
        raw = self._get(b"fact:" + key.encode())
        return None if raw is None else raw.decode()

    def delivered_through(self, txn: lmdb.Transaction | None = None) -> int:
        """The newest seq every sink has acknowledged (0 without sinks: nothing counts as delivered)."""
        if not self.sinks:
            return 0
        if txn is None:
            with self._env.begin() as t:
                return self.delivered_through(t)
        return min(self._int(txn, b"cursor:" + s.encode()) for s in self.sinks)

    def cursor(self, sink: str) -> int:
        with self._env.begin() as txn:
            return self._int(txn, b"cursor:" + sink.encode())

    def ack(self, sink: str, seq: int) -> None:
        """Record that sink has every event up to seq (durably: a restart resumes after it)."""
        with self._lock, self._env.begin(write=True) as txn:
            if seq > self._int(txn, b"cursor:" + sink.encode()):
                txn.put(b"cursor:" + sink.encode(), str(seq).encode(), db=self._meta)

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest event; (0, GENESIS) when there is none yet."""
        with self._env.begin() as txn:
            return self._int(txn, b"next", 1) - 1, (self._get(b"head", txn) or GENESIS.encode()).decode()

    def append(self, drafts: Sequence[Draft], time_ns: int, facts: dict[str, str] | None = None) -> list[Event]:
        """Number, chain and store drafts (making room first if needed) and the facts given, in one synced
        transaction. Returns the events written, a drop event first if room was made."""
        with self._lock, self._env.begin(write=True, db=self._events) as txn:
            seq = self._int(txn, b"next", 1)
            prev = (txn.get(b"head", db=self._meta) or GENESIS.encode()).decode()
            used = self._int(txn, b"bytes")
            out: list[Event] = []

            def put(d: Draft) -> None:
                nonlocal seq, prev, used
                e = chain(d, node=self.node, seq=seq, event_id=secrets.token_hex(16), time_ns=time_ns, prev=prev)
                raw = _encode(e)
                txn.put(_SEQ.pack(seq), raw, db=self._events)
                out.append(e)
                seq, prev, used = seq + 1, e.hash, used + len(raw)

            need = sum(len(json.dumps([d.name, d.body, d.attrs])) + RECORD_OVERHEAD for d in drafts)  # at least the records' size
            if used + need > self.max_bytes:
                drop = self._make_room(txn, used + need + DROP_RESERVE - self.max_bytes)
                used = self._int(txn, b"bytes")
                put(drop)
            for d in drafts:
                put(d)
            txn.put(b"next", str(seq).encode(), db=self._meta)
            txn.put(b"head", prev.encode(), db=self._meta)
            txn.put(b"bytes", str(used).encode(), db=self._meta)
            for k, v in (facts or {}).items():
                txn.put(b"fact:" + k.encode(), v.encode(), db=self._meta)
            return out

    def _make_room(self, txn: lmdb.Transaction, at_least: int) -> Draft:
        """Delete the oldest events until at_least bytes are free; count it, and say it in a drop draft."""
        delivered = self.delivered_through(txn)
        freed = count = undelivered = 0
        first = last = 0
        cur = txn.cursor(db=self._events)
        while freed < at_least and cur.first():
            seq, raw = _SEQ.unpack(cur.key())[0], bytes(cur.value())
            freed += len(raw)
            first, last, count = first or seq, seq, count + 1
            if DROPPED.encode() in raw:  # a drop report dropped in turn: this one declares what it declared
                old = _decode(raw)
                earlier = old.attr("wasmlog.dropped.first_seq")
                if old.name == DROPPED and isinstance(earlier, int):
                    first = min(first, earlier)
            undelivered += seq > delivered
            cur.delete()
        txn.put(b"bytes", str(max(0, self._int(txn, b"bytes") - freed)).encode(), db=self._meta)
        txn.put(b"dropped", str(self._int(txn, b"dropped") + count).encode(), db=self._meta)
        txn.put(b"dropped_undelivered", str(self._int(txn, b"dropped_undelivered") + undelivered).encode(), db=self._meta)
        what = f"{count} events, {undelivered} never delivered (seq {first}..{last} are gone)" if count else "nothing"
        return Draft.of(DROPPED, f"the spool was full: dropped {what}", {
            "wasmlog.count": count, "wasmlog.dropped.first_seq": first or None, "wasmlog.dropped.last_seq": last or None,
            "wasmlog.dropped.undelivered": undelivered})

    def read(self, after: int, limit: int) -> list[Event]:
        """Up to limit events with seq > after, oldest first."""
        out: list[Event] = []
        with self._env.begin(db=self._events) as txn:
            cur = txn.cursor()
            if cur.set_range(_SEQ.pack(after + 1)):
                for _, raw in cur:
                    out.append(_decode(raw))
                    if len(out) >= limit:
                        break
        return out

    def scan(self) -> Iterator[Event]:
        """Every event held, oldest first (read in pages: the agent may append meanwhile)."""
        after = 0
        while page := self.read(after, 1024):
            yield from page
            after = page[-1].seq

    def stats(self) -> dict[str, int]:
        with self._env.begin() as txn:
            return {"node_events": self._int(txn, b"next", 1) - 1, "bytes": self._int(txn, b"bytes"), "max_bytes": self.max_bytes,
                    "held": txn.stat(self._events)["entries"], "dropped": self._int(txn, b"dropped"),
                    "dropped_undelivered": self._int(txn, b"dropped_undelivered"), "delivered_through": self.delivered_through(txn)}
