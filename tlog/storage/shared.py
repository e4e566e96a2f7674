"""The log on shared storage: PostgreSQL coordinates, an S3-compatible bucket serves.

Any number of processes on one database and bucket are one log. PostgreSQL holds (one log per database):

    tlog_next     next              the next index to assign (its row lock orders sequencing)
    tlog_entries  idx -> entry      sequenced entries not yet in a full bundle in the bucket, and the
                                    last ENTRIES_KEPT that are (other processes take up trees from them)
    tlog_dedup    leaf hash -> idx  every sequenced entry (the dedup index)
    tlog_tree     size, checkpoint, published   the integrated tree (its row lock orders commits)

and the bucket the tlog-tiles objects (storage/objects.py). Submitting is sequencing: sequence()
assigns indexes in one transaction, durable before it returns, so the tree's content is fixed before
it is integrated. One process at a time integrates (try_lead: a session advisory lock, released by
PostgreSQL when the holder's connection dies): it plans a batch from sequenced() entries, and commit()
writes every tile and bundle it changes to the bucket, then moves tlog_tree from the plan's old size
(conditional: a second writer gets TlogError), then writes the checkpoint object. A crash anywhere
is redone by the next integrator with the same entries, so the same bytes: the bucket converges.
Every other process takes up a new tree (load) by appending the entries it can read from tlog_entries
to the tree it has, checking the root against the committed checkpoint (from the bucket's tiles when
it is too far behind); a commit notifies CHANNEL_TREE and a sequencing CHANNEL_SEQUENCED (listen()).
Blocking (psycopg 3, storage/s3_sync.py): called from worker threads; one connection per thread.
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..checkpoint import Checkpoint, parse_checkpoint
from ..dsn import redact
from ..errors import MalformedError, MissingDependencyError, NotFoundError, StorageUnavailableError, TlogError
from ..hashes import HASH_SIZE, leaf_hash
from ..integrate import BatchPlan, TreeState, plan_batch, state_from_tiles
from ..note import parse_note
from ..tiles import ENTRIES, TILE_WIDTH, TileID, encode_entry_bundle, parse_entry_bundle, tile_for_size
from .admission import Admission
from .notify import Listener
from .objects import ObjectStore
from .pg import connect

try:
    import psycopg
    import psycopg.conninfo
except ImportError as e:  # the shared extra
    _missing: ImportError | None = e
else:
    _missing = None

LEADER_LOCK = 0x776C6F67  # pg_try_advisory_lock key of the integrator ("wlog")
SCHEMA_LOCK = 0x776C6F68
ENTRIES_KEPT = 64 * TILE_WIDTH  # integrated entries kept in tlog_entries below the last full bundle (~4 MB)
CHANNEL_TREE = "wasmlog_tree"  # notified (payload: the new size) when a commit moves tlog_tree
CHANNEL_SEQUENCED = "wasmlog_sequenced"  # notified when entries are sequenced
LEAD_KEEPALIVES = [("tcp_keepalives_idle", 5), ("tcp_keepalives_interval", 2), ("tcp_keepalives_count", 3), ("tcp_user_timeout", 11000)]
LEAD_IDLE_MS = 10000  # idle_session_timeout of the lock session: a frozen integrator (its kernel still answers keepalives) is deposed
# Every other session: a statement waits at most STATEMENT_MS (a 503 then, not a request hung behind a
# lock), and a process frozen inside a transaction (SIGSTOP, a hung thread) loses it after
# IDLE_IN_TRANSACTION_MS, so the row locks it held (tlog_next, tlog_tree) pass to the others.
STATEMENT_MS = 30000
IDLE_IN_TRANSACTION_MS = 10000
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS tlog_next (id smallint PRIMARY KEY CHECK (id = 1), next bigint NOT NULL)",
    "INSERT INTO tlog_next VALUES (1, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS tlog_entries (idx bigint PRIMARY KEY, entry bytea NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tlog_dedup (hash bytea PRIMARY KEY, idx bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS tlog_tree (id smallint PRIMARY KEY CHECK (id = 1), size bigint NOT NULL, checkpoint bytea, published bytea)",
    "INSERT INTO tlog_tree VALUES (1, 0, NULL, NULL) ON CONFLICT DO NOTHING",
]


def _checkpoint(note: bytes) -> Checkpoint | None:
    """The checkpoint a note signs, or None if it is not one."""
    try:
        return parse_checkpoint(parse_note(note).text)
    except TlogError:
        return None


class SharedLogStore:
    """A LogStore (storage/base.py) over PostgreSQL at dsn and a bucket at objects_url, with sequencing.

    publish_integrated: every committed checkpoint is written to the bucket at once (an unwitnessed
    log); otherwise only those passed to publish().
    """

    def __init__(self, dsn: str, objects_url: str, *, publish_integrated: bool = True, objects: ObjectStore | None = None,
                 before_commit: Callable[[BatchPlan], None] | None = None, entries_kept: int = ENTRIES_KEPT,
                 statement_ms: int = STATEMENT_MS, idle_in_transaction_ms: int = IDLE_IN_TRANSACTION_MS) -> None:
        """entries_kept: integrated entries this store's commits leave in tlog_entries below the last full
        bundle; statement_ms, idle_in_transaction_ms: the sessions' limits (see STATEMENT_MS)."""
        if _missing is not None:
            raise MissingDependencyError("PostgreSQL storage", "shared", _missing)
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error as e:
            raise MalformedError(redact(" ".join(f"the log's database: not a PostgreSQL DSN: {e}".split()), dsn)) from None
        self.dsn = dsn
        self.objects = objects if objects is not None else ObjectStore(objects_url)
        self.publish_integrated = publish_integrated
        self.before_commit = before_commit  # fault injection for tests: raise after the objects, before the database
        self.entries_kept = entries_kept
        self._session_limits = [("statement_timeout", statement_ms), ("idle_in_transaction_session_timeout", idle_in_transaction_ms)]
        self._local = threading.local()
        self._conns: list[Any] = []  # every thread's connection, closed by close()
        self._conns_lock = threading.Lock()
        self._size = 0  # the committed size last seen: the width of partial tiles and bundles read
        self.bucket_checkpoint: bytes | None = None  # the checkpoint object this store last wrote
        self._known: TreeState | None = None  # the committed tree this store last loaded or committed
        self._listener: Listener | None = None
        self._lead_lock = threading.Lock()
        self._lead_conn: Any = None
        self._leading = False
        with self._txn() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))  # concurrent CREATE IF NOT EXISTS can collide
            for statement in SCHEMA:
                cur.execute(statement)
        with contextlib.suppress(NotFoundError):  # a new log; a missing bucket or refused credentials fail here, at start-up
            self.objects.get("checkpoint")

    @contextlib.contextmanager
    def _txn(self, atomic: bool = True) -> Iterator[Any]:
        """A cursor in a transaction on this thread's connection (atomic=False: each statement commits
        by itself, saving the round trips of BEGIN and COMMIT); database failures become StorageUnavailableError.

        A pooled connection is replaced before use when its session has ended (_ended: no round trip),
        and an atomic transaction whose BEGIN fails on a pooled connection that turns out broken is
        begun once more on a new one: BEGIN is its first round trip, so nothing of it was committed.
        (A non-atomic one's first round trip is its caller's first statement: it is not retried.)"""
        conn: Any = getattr(self._local, "conn", None)
        try:
            pooled = conn is not None and not conn.closed and not _ended(conn)
            if not pooled:
                conn = self._connect(conn)
            with contextlib.ExitStack() as txn:
                if atomic:
                    try:
                        txn.enter_context(conn.transaction())
                    except psycopg.OperationalError:
                        if not (pooled and conn.broken):
                            raise
                        conn = self._connect(conn)
                        txn.enter_context(conn.transaction())
                yield txn.enter_context(conn.cursor())
        except psycopg.Error as e:
            if conn is not None and conn.broken:
                conn.close()
            raise StorageUnavailableError(redact(" ".join(f"the log's database: {e}".split()), self.dsn)) from None

    def _connect(self, old: Any) -> Any:
        """A new connection for this thread in place of old (closed, if any)."""
        if old is not None:
            old.close()
        conn = self._local.conn = connect(self.dsn, self._session_limits)
        with self._conns_lock:
            self._conns = [c for c in self._conns if not c.closed] + [conn]
        return conn

    def _tile_at(self, size: int, level: int, index: int) -> bytes:
        tile = tile_for_size(size, level, index)
        return self.objects.get(tile.path(), immutable=tile.is_full)

    # The LogStore interface.

    def load(self) -> tuple[TreeState, bytes | None]:
        """The committed tree: the one known here, extended by the entries committed since when the
        database still has them all, else rebuilt from the bucket's tiles. A tree that does not give
        the committed checkpoint's root is not used (the tiles are read instead)."""
        known = self._known
        with self._txn(atomic=False) as cur:
            size, checkpoint = cur.execute("SELECT size, checkpoint FROM tlog_tree").fetchone()
            rows = []
            if known is not None and known.size < size:
                query = "SELECT entry FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx"
                rows = cur.execute(query, (known.size, size), binary=True).fetchall()
        self._size = max(self._size, size)
        state = None
        if known is not None and known.size <= size and len(rows) == size - known.size:  # idx is unique: all of them
            plan = plan_batch(known, [row[0] for row in rows], lambda _: None, dedup=False)
            if _root_of(checkpoint) == plan.state.root_hash:
                state = plan.state
                for (level, index), data in plan.tiles.items():
                    self.objects.remember(TileID(level, index, len(data) // HASH_SIZE).path(), data)
        if state is None:
            state = state_from_tiles(size, lambda level, index: self._tile_at(size, level, index))
        self._known = state
        return state, checkpoint

    def commit(self, plan: BatchPlan, checkpoint: bytes) -> None:
        """LogStore.commit, for plans of sequenced entries only (TlogError otherwise): objects, then the tree row."""
        old, new = plan.old_size, plan.state.size
        start = old - old % TILE_WIDTH
        with self._txn() as cur:
            if self.committed_size(cur) != old:
                raise TlogError(f"stored size is not the batch's base size {old}: another process integrated")
            rows = cur.execute("SELECT idx, entry FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx", (start, new), binary=True).fetchall()
        rows = rows[: next((i for i, (idx, _) in enumerate(rows) if idx != start + i), len(rows))]  # up to the first gap
        if len(rows) < old - start:
            raise TlogError(f"entries [{start}, {old}) of the partial bundle are missing from the database")
        entries = [entry for _, entry in rows]
        for i, entry in enumerate(plan.new_entries):  # the plan's entries must be the ones sequenced at their indexes
            if old - start + i >= len(entries) or entries[old - start + i] != entry:
                raise TlogError(f"entry {old + i} of the batch is not the one sequenced at that index")
        objects = [(TileID(level, index, len(data) // 32), data) for (level, index), data in plan.tiles.items()]
        for first in range(start, new, TILE_WIDTH):
            bundle = entries[first - start : first - start + TILE_WIDTH]
            objects.append((TileID(ENTRIES, first // TILE_WIDTH, len(bundle)), encode_entry_bundle(bundle)))
        self.objects.put_tiles(objects)
        if self.before_commit is not None:
            self.before_commit(plan)
        with self._txn() as cur:
            size = cur.execute("SELECT size FROM tlog_tree FOR UPDATE").fetchone()[0]
            if size != old:
                raise TlogError(f"stored size {size} is not the batch's base size {old}: another process integrated")
            cur.execute("UPDATE tlog_tree SET size = %s, checkpoint = %s", (new, checkpoint))
            cur.execute("DELETE FROM tlog_entries WHERE idx < %s", (new - new % TILE_WIDTH - self.entries_kept,))
            cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL_TREE, str(new)))
        self._size = max(self._size, new)
        self._known = plan.state
        if self.publish_integrated:
            self.put_checkpoint(checkpoint)

    def put_checkpoint(self, note: bytes) -> None:
        """Write the checkpoint object (after every tile it covers is in the bucket), unless the bucket has
        this log's checkpoint of a larger tree already (a stale integrator's write never moves it back)."""
        ours = _checkpoint(note)

        def keep(current: bytes) -> bool:
            there = _checkpoint(current)
            return current == note or (ours is not None and there is not None and there.origin == ours.origin and there.size > ours.size)

        self.objects.put_unless("checkpoint", note, keep)
        self.bucket_checkpoint = note

    def publish(self, note: bytes) -> None:
        """LogStore.publish; TlogError if another process published a larger tree already."""
        with self._txn() as cur:
            current = cur.execute("SELECT published FROM tlog_tree FOR UPDATE").fetchone()[0]
            there, ours = _checkpoint(current or b""), _checkpoint(note)
            if there is not None and (ours is None or there.size > ours.size):
                raise TlogError(f"refusing to publish a smaller tree than the published one of size {there.size}")
            cur.execute("UPDATE tlog_tree SET published = %s", (note,))
            cur.execute("SELECT pg_notify(%s, '')", (CHANNEL_TREE,))
        self.put_checkpoint(note)

    def published(self) -> bytes | None:
        with self._txn(atomic=False) as cur:
            note: bytes | None = cur.execute("SELECT published FROM tlog_tree").fetchone()[0]
        return note

    def lookup(self, leaf_hashes: Sequence[bytes]) -> dict[bytes, int]:
        """The index of each leaf hash that is logged (integrated); sequenced ones are not reported."""
        with self._txn(atomic=False) as cur:
            rows = cur.execute(
                "SELECT d.hash, d.idx FROM tlog_dedup d, tlog_tree t WHERE d.hash = ANY(%b) AND d.idx < t.size", (list(leaf_hashes),)
            ).fetchall()
        return dict(rows)

    def read_tile(self, level: int, index: int) -> bytes:
        """A hash tile, full or as wide as the committed tree makes it. Raises NotFoundError."""
        try:
            return self._tile_at(self._size, level, index)
        except NotFoundError:
            return self._tile_at(self.committed_size(), level, index)  # committed by another process since

    def read_summary(self, level: int, index: int) -> bytes | None:
        return None  # no summaries in the bucket: the reader expands full tiles (cached) instead

    def read_entries(self, start: int, end: int) -> list[bytes]:
        size = self._size
        if end > size:
            size = self.committed_size()
        if not 0 <= start <= end <= size:
            raise NotFoundError(f"entries [{start}, {end}) not found")
        out: list[bytes] = []
        for first in range(start - start % TILE_WIDTH, end, TILE_WIDTH):
            bundle = tile_for_size(size, ENTRIES, first // TILE_WIDTH)
            data = self.objects.get(bundle.path(), immutable=bundle.is_full)
            entries = parse_entry_bundle(data, bundle.width)
            out.extend(entries[max(start - first, 0) : end - first])
        return out

    def checkpoint(self) -> bytes | None:
        with self._txn(atomic=False) as cur:
            note: bytes | None = cur.execute("SELECT checkpoint FROM tlog_tree").fetchone()[0]
        return note

    def close(self) -> None:
        self.stop_listening()
        self.resign()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self.objects.close()

    # Sequencing and integration across processes.

    def committed_size(self, cur: Any = None) -> int:
        """The integrated tree size in the database."""
        if cur is None:
            with self._txn(atomic=False) as own:
                return self.committed_size(own)
        size: int = cur.execute("SELECT size FROM tlog_tree").fetchone()[0]
        self._size = max(self._size, size)
        return size

    def sequence(self, entries: Sequence[bytes], leaf_hashes: Sequence[bytes], admission: Admission | None = None) -> list[int | TlogError]:
        """Assign each entry its index (a logged or sequenced one keeps its earlier index), durably.

        When this returns the entries are committed in the database; they will be integrated in order.
        With an admission, a new entry it refuses gets its error instead of an index (nothing is stored
        for it), and its trailer (if any) is sequenced right after the admitted entries. leaf_hashes must be distinct. Raises StorageUnavailableError.
        """
        with self._txn() as cur:  # arrays go in binary (%b): dumping them as text costs ~5x the CPU
            nxt = cur.execute("SELECT next FROM tlog_next FOR UPDATE").fetchone()[0]
            known = dict(cur.execute("SELECT hash, idx FROM tlog_dedup WHERE hash = ANY(%b)", (list(leaf_hashes),)).fetchall())
            fresh = [(entry, h) for entry, h in zip(entries, leaf_hashes, strict=True) if h not in known]
            verdicts: list[TlogError | None] = [None] * len(fresh)
            if admission is not None and fresh:
                verdicts = admission.admit(nxt, lambda start: self._sequenced_since(cur, start, nxt), [entry for entry, _ in fresh])
            refused: dict[bytes, TlogError] = {}
            new_idx: list[int] = []
            new_entries: list[bytes] = []
            new_hashes: list[bytes] = []
            for (entry, h), verdict in zip(fresh, verdicts, strict=True):
                if verdict is not None:
                    refused[h] = verdict
                    continue
                known[h] = nxt + len(new_idx)
                new_idx.append(known[h])
                new_entries.append(entry)
                new_hashes.append(h)
            trailer = admission.trailer(nxt + len(new_idx)) if admission is not None and new_idx else None
            if trailer is not None:
                new_idx.append(nxt + len(new_idx))
                new_entries.append(trailer)
                new_hashes.append(leaf_hash(trailer))
            if new_idx:
                cur.execute("INSERT INTO tlog_entries SELECT * FROM unnest(%b::bigint[], %b::bytea[])", (new_idx, new_entries))
                cur.execute("INSERT INTO tlog_dedup SELECT * FROM unnest(%b::bytea[], %b::bigint[])", (new_hashes, new_idx))
                cur.execute("UPDATE tlog_next SET next = %s", (nxt + len(new_idx),))
                cur.execute("SELECT pg_notify(%s, '')", (CHANNEL_SEQUENCED,))
        if admission is not None and fresh:
            admission.committed(nxt + len(new_idx))
        return [refused[h] if h in refused else known[h] for h in leaf_hashes]

    def _sequenced_since(self, cur: Any, start: int, end: int) -> list[bytes]:
        """Entries [start, end) inside a sequencing transaction: from tlog_entries, or the bucket for integrated full bundles."""
        rows = cur.execute("SELECT idx, entry FROM tlog_entries WHERE idx >= %s AND idx < %s ORDER BY idx", (start, end), binary=True).fetchall()
        first = rows[0][0] if rows else end
        if [idx for idx, _ in rows] != list(range(first, end)):
            raise TlogError(f"sequenced entries [{first}, {end}) are not all in the database")
        older = self.read_entries(start, first) if start < first else []  # deleted rows: integrated, so in the bucket
        return older + [entry for _, entry in rows]

    def sequenced(self, start: int, limit: int) -> list[bytes]:
        """Up to limit sequenced entries from index start on, in order (stops at the first gap)."""
        with self._txn(atomic=False) as cur:
            rows = cur.execute("SELECT idx, entry FROM tlog_entries WHERE idx >= %s ORDER BY idx LIMIT %s", (start, limit), binary=True).fetchall()
        out: list[bytes] = []
        for idx, entry in rows:
            if idx != start + len(out):
                break
            out.append(entry)
        return out

    def try_lead(self) -> bool:
        """Hold (or try to take) the integrator's lock; False if another process holds it or the database is gone."""
        with self._lead_lock:
            try:
                if self._lead_conn is None or self._lead_conn.closed:
                    self._leading = False
                    # A killed process's session ends at once; a vanished machine's once these keepalives
                    # go unanswered (~11 s), and PostgreSQL then frees the lock for another process.
                    self._lead_conn = connect(self.dsn, LEAD_KEEPALIVES)
                    # A frozen process's (SIGSTOP, a hung thread) when it has not looked for LEAD_IDLE_MS (PostgreSQL 14 on).
                    if self._lead_conn.info.server_version >= 140000:
                        self._lead_conn.execute(f"SET idle_session_timeout = {LEAD_IDLE_MS}")
                if self._leading:
                    self._lead_conn.execute("SELECT 1")  # the lock lives as long as this session
                else:
                    self._leading = bool(self._lead_conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0])
            except psycopg.Error:
                if self._lead_conn is not None:
                    self._lead_conn.close()
                self._lead_conn, self._leading = None, False
            return self._leading

    def resign(self) -> None:
        """Give up the integrator's lock (closing its session)."""
        with self._lead_lock:
            if self._lead_conn is not None:
                self._lead_conn.close()
            self._lead_conn, self._leading = None, False

    def listen(self, notified: Callable[[str], None]) -> None:
        """Until stop_listening() or close(), from a thread of its own (storage/notify.py): notified(channel)
        for each notification of CHANNEL_TREE or CHANNEL_SEQUENCED, and notified("") whenever listening
        (re)starts. Best effort: callers keep polling; this only makes them look sooner."""
        if self._listener is not None:
            raise TlogError("this store is listening already")
        self._listener = Listener(self.dsn, [CHANNEL_TREE, CHANNEL_SEQUENCED], notified, LEAD_KEEPALIVES)
        self._listener.start()

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    @property
    def listening(self) -> bool:
        """Notifications arrive (the listener is connected and listening)."""
        return self._listener is not None and self._listener.listening

def _ended(conn: Any) -> bool:
    """Whether an idle connection has anything to read, without a round trip: the server speaks to an idle
    session unasked to end it (a restart, pg_terminate_backend: a FATAL error, then the socket's end),
    or (rarely) with a notice; either way a new connection is the safe one to use."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _root_of(note: bytes | None) -> bytes | None:
    """The root hash a checkpoint note states (not verified: the Log checks the signature), or None."""
    try:
        return parse_checkpoint(parse_note(note).text).root_hash if note is not None else None
    except TlogError:
        return None
