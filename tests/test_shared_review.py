"""Adversarial review of the shared engine (issue 17): stale integrators, storage errors, credentials, races.

Real PostgreSQL and SeaweedFS (tests/services.py). Faults are injected only at the S3 call of our own
ObjectStore (a subclass pausing before a write), never by replacing a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import test_shared_log
import test_shared_registry
from helpers import wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_shared_log import KEY, leaf

from registry.bucket_blobs import BucketBlobStore
from registry.client import RegistryError, release_statement
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, PackageRef, decode_entry, is_index_root
from tlog.checkpoint import parse_checkpoint
from tlog.dsn import MASK, redact
from tlog.errors import MalformedError, NotFoundError, StorageUnavailableError, TlogError
from tlog.log import Log
from tlog.note import Ed25519Signer, parse_note
from tlog.proof_file import parse_tlog_proof
from tlog.storage.objects import ObjectStore, parse_objects_url
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TileID

shared = test_shared_log.shared  # fixtures: a factory of SharedLogStores on one database and bucket,
nodes = test_shared_registry.nodes  # and of registry nodes on one database and bucket
EMPTY_MODULE = test_shared_registry.EMPTY_MODULE
SECRET = "pw0SECRET"


def bucket_size(url: str) -> int:
    """The size of the checkpoint object in the bucket at url, read by a fresh client."""
    return parse_checkpoint(parse_note(ObjectStore(url).get("checkpoint")).text).size


class PausedCheckpointWrite(ObjectStore):
    """Pauses the first write of the checkpoint object just before it reaches the bucket (a process
    frozen, or its lead lost, between the database commit and the bucket), once armed, until released."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.armed, self.paused, self.release = threading.Event(), threading.Event(), threading.Event()

    def _call(self, what: str, method: str, expect: int, **kwargs: Any) -> Any:
        if method == "put_object" and kwargs["Key"].endswith("checkpoint") and self.armed.is_set() and not self.paused.is_set():
            self.paused.set()
            assert self.release.wait(30)
        return super()._call(what, method, expect, **kwargs)


def test_a_stale_integrators_checkpoint_never_replaces_a_newer_one_in_the_bucket(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """Integrator A commits size 1 in the database and stalls before its checkpoint object; B takes over and
    commits size 2 (and writes its checkpoint); then A's write lands. The bucket must not go back to 1."""
    url = f"s3://{s3_path}/log"
    objects = PausedCheckpointWrite(url)
    a, b = shared(objects=objects), shared()
    a.sequence([b"one", b"two"], [leaf(b"one"), leaf(b"two")])
    log_a = Log(a, KEY)
    objects.armed.set()
    stalled = threading.Thread(target=log_a.integrate, args=([b"one"],), kwargs={"dedup": False})
    stalled.start()
    try:
        assert objects.paused.wait(30)
        log_b = Log(b, KEY)  # takes up the committed tree of size 1
        log_b.integrate([b"two"], dedup=False)
        assert bucket_size(url) == 2
    finally:
        objects.release.set()
        stalled.join(30)
    assert bucket_size(url) == 2
    a.put_checkpoint(log_a.integrated.note)  # a stale process rewriting "its" checkpoint, as a new leader's first round does
    assert bucket_size(url) == 2


def test_a_stale_publish_never_moves_the_published_checkpoint_back(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """A witnessed log: an ex-integrator whose cosigning of size 1 finished late publishes it after
    the new integrator published size 2. The database and the bucket keep size 2."""
    a, b = shared(publish_integrated=False), shared(publish_integrated=False)
    a.sequence([b"one", b"two"], [leaf(b"one"), leaf(b"two")])
    log_a = Log(a, KEY, witnessed=True)
    log_a.integrate([b"one"], dedup=False)
    old = log_a.integrated.note
    log_a.integrate([b"two"], dedup=False)
    new = log_a.integrated.note
    b.publish(new)
    with pytest.raises(TlogError, match="smaller"):
        a.publish(old)
    assert b.published() == new and a.published() == new
    assert bucket_size(f"s3://{s3_path}/log") == 2


def test_a_missing_bucket_is_unavailable_storage_not_a_missing_object(seaweed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StorageUnavailableError, match="NoSuchBucket"):
        ObjectStore("s3://wasmlog-no-such-bucket/log").get("checkpoint")
    with pytest.raises(StorageUnavailableError):
        BucketBlobStore("s3://wasmlog-no-such-bucket/blobs").get("0" * 64)


@pytest.mark.parametrize("secret", ["wrong-secret", None])
def test_a_bucket_that_denies_access_is_unavailable_storage(seaweed, s3_path, monkeypatch, secret: str | None) -> None:  # type: ignore[no-untyped-def]
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    if secret is None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")  # an unknown key
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    import boto3

    store = ObjectStore(f"s3://{s3_path}/log", boto3.Session().client("s3"))  # (boto3's default session keeps the first credentials it read)
    with pytest.raises(StorageUnavailableError, match=r"403|AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId"):
        store.get("tile/0/000")
    with pytest.raises(StorageUnavailableError):
        store.put("tile/0/000", b"\x00" * 32 * 256, immutable=True)


BAD_DSNS = [
    f"postgresql://u:{SECRET}@[::1/x",  # a URI that does not parse: libpq quotes all of it
    f"postgresql://u:{SECRET}@pw1SECRET@127.0.0.1:1/x",  # an unescaped @ in the password: a host name made of the rest
    f"mysql://u:{SECRET}@host/x",  # not a DSN at all: quoted whole
    f"host=127.0.0.1 port=1 password={SECRET} junk",
    f"host=127.0.0.1 port=1 password='{SECRET} x' junk",
    f"postgresql://u@127.0.0.1:1/x?password={SECRET}&junk",
]


def password(exclude: str) -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs"), blacklist_characters=exclude), min_size=1, max_size=30)


@given(st.data(), st.text(max_size=20), st.text(max_size=20))
def test_redact_takes_every_password_out_of_a_message_quoting_the_dsn(data: st.DataObject, before: str, after: str) -> None:
    """Whatever the password, and however the DSN gives it, neither it nor the DSN quoted whole survives redact()."""
    form = data.draw(st.sampled_from(["uri", "query", "keyword", "quoted"]))
    if form == "uri":
        secret = data.draw(password("?#"))
        dsn = f"postgresql://user:{secret}@host:5432/db"
    elif form == "query":
        secret = data.draw(password("&#"))
        dsn = f"postgresql://user@host/db?sslmode=disable&password={secret}"
    elif form == "keyword":
        secret = data.draw(password("'"))
        dsn = f"host=h user=u password={secret} dbname=d"
    else:
        secret = data.draw(password("'\\"))
        dsn = f"host=h password='{secret}' dbname=d"
    for message in (f"{before}{secret}{after}", f'{before}"{dsn}"{after}'):
        assert secret not in redact(message, dsn).replace(MASK, "\x00")  # (a password of '*' is not in the mask's stead)
    for piece in secret.split("@")[1:]:  # libpq reports the rest of an unescaped '@' password as the host name
        if len(piece) >= 3:
            assert piece not in redact(f"failed to resolve host '{piece}@host'", dsn).replace(MASK, "\x00")


@pytest.mark.parametrize("dsn", BAD_DSNS)
def test_a_database_error_never_echoes_the_password(dsn: str) -> None:
    with pytest.raises(TlogError) as e:
        SharedLogStore(dsn, "s3://bucket/p")
    assert "SECRET" not in str(e.value), str(e.value)


@pytest.mark.parametrize("dsn", [BAD_DSNS[0], f"postgresql://nobody:{SECRET}@127.0.0.1:1/x"])
def test_log_serve_with_a_password_in_a_bad_dsn_says_so_on_one_line_without_it(tmp_path, dsn: str) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    done = subprocess.run([sys.executable, "-m", "wasmlog", "log", "serve", "--key", str(key), "--store", dsn, "--objects", "s3://bucket/p"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "the log's database" in done.stderr, done.stderr
    assert "SECRET" not in done.stderr and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_full_tile_written_again_with_other_bytes_is_refused_as_a_fork(seaweed, s3_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """If-None-Match on immutable objects: the second writer (a fresh client: nothing cached) reads back and refuses."""
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    url = f"s3://{s3_path}/log"
    tile = TileID(0, 0, 256)
    first, other = bytes(range(256)) * 32, bytes(32 * 256)
    ObjectStore(url).put_tiles([(tile, first)])
    ObjectStore(url).put_tiles([(tile, first)])  # the same bytes again: a redo, accepted
    with pytest.raises(TlogError, match="refusing to fork"):
        ObjectStore(url).put_tiles([(tile, other)])
    assert ObjectStore(url).get(tile.path()) == first


def test_one_entry_submitted_through_two_processes_at_once_gets_one_index(shared) -> None:  # type: ignore[no-untyped-def]
    """Eight threads on two stores sequence overlapping, shuffled batches of the same 300 entries."""
    stores = [shared(), shared()]
    entries = [b"dup %d" % i for i in range(300)]
    answers: list[dict[bytes, int]] = []
    failures: list[BaseException] = []

    def submit(store: SharedLogStore, seed: int) -> None:
        rng = random.Random(seed)
        got: dict[bytes, int] = {}
        try:
            for _ in range(10):
                batch = rng.sample(entries, 60)
                for e, i in zip(batch, store.sequence(batch, [leaf(e) for e in batch]), strict=True):
                    assert isinstance(i, int)
                    got[e] = i
        except BaseException as e:  # reported below
            failures.append(e)
        answers.append(got)

    threads = [threading.Thread(target=submit, args=(stores[n % 2], n)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    index: dict[bytes, int] = {}
    for got in answers:
        for e, i in got.items():
            assert index.setdefault(e, i) == i, e
    assert sorted(index.values()) == list(range(len(index)))  # no gaps, no index given twice
    stored = stores[0].sequenced(0, 1000)
    assert len(stored) == len(index) and all(stored[i] == e for e, i in index.items())


def test_a_database_restart_while_sequencing_never_answers_an_index_it_did_not_commit(shared, postgres) -> None:  # type: ignore[no-untyped-def]
    """Four threads on two stores sequence fresh entries without pause; PostgreSQL is stopped with
    `-m immediate` (a crash) under them and started again. Every index a submitter was given is that
    entry's in the database after the restart; every other submission failed as StorageUnavailable."""
    stores = [shared(), shared()]
    answered: dict[bytes, int] = {}
    failed: list[bytes] = []
    odd: list[BaseException] = []
    stop = threading.Event()

    def submit(store: SharedLogStore, n: int) -> None:
        for round_ in range(100_000):
            if stop.is_set():
                return
            batch = [b"restart %d %d %d" % (n, round_, i) for i in range(20)]
            try:
                indexes = store.sequence(batch, [leaf(e) for e in batch])
            except StorageUnavailableError:
                failed.extend(batch)
                continue
            except BaseException as e:  # reported below
                odd.append(e)
                return
            answered.update(zip(batch, indexes, strict=True))  # type: ignore[arg-type]

    threads = [threading.Thread(target=submit, args=(stores[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until_sync(lambda: len(answered) >= 200, "sequencing under way")
        postgres.stop("immediate")
        postgres.start()
        done = len(answered)
        wait_until_sync(lambda: len(answered) >= done + 200, "sequencing again after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not odd, odd
    assert failed  # the restart was felt
    for store in stores:  # this thread's connections died in the restart: the first use of each is a 503
        with contextlib.suppress(StorageUnavailableError):
            store.committed_size()
    stored = stores[0].sequenced(0, 10**6)
    assert all(stored[i] == e for e, i in answered.items())
    # a failed submission may have committed all the same (the answer to COMMIT was lost): it keeps one index
    again = stores[1].sequence(failed[:100], [leaf(e) for e in failed[:100]])
    assert len(set(again)) == len(again) and not set(again) & set(answered.values())


def wait_until_sync(ready: Any, what: str, seconds: float = 60) -> None:
    """Poll ready() until true, failing after seconds (for tests that run threads, not an event loop)."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not after {seconds}s"
        time.sleep(0.01)


async def test_a_revocation_racing_a_publish_with_the_revoked_key_through_two_nodes(nodes) -> None:  # type: ignore[no-untyped-def]
    """Through node A the owner revokes bob's key while bob publishes through node B, in 20 namespaces
    at once. In the log, a release by bob is only ever before his revocation; a refused one is a 403."""
    (first, reg_a), (second, reg_b) = await nodes(), await nodes()
    alice, bob = Ed25519Signer.generate("alice"), Ed25519Signer.generate("bob")
    namespaces = [f"race{i}" for i in range(20)]
    for ns in namespaces:
        await first.act(alice, Action("key-grant", ns, key=alice.vkey, issued=1))
        await first.act(alice, Action("key-grant", ns, key=bob.vkey, issued=2))

    async def b_knows_bob() -> bool:  # else node B's own check refuses bob before the race
        for ns in namespaces:
            if bob.vkey not in ((await second.namespace(ns)) or {"keys": []})["keys"]:
                return False
        return True

    await wait_until(b_knows_bob, "node B knows bob's grants")

    async def publish(ns: str) -> bytes | int:
        release = release_statement(PackageRef(ns, "m", "1.0.0"), EMPTY_MODULE, None, None)
        envelope = sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), bob).to_json()
        try:
            proof: bytes = await second.publish_signed(bob.vkey, envelope, EMPTY_MODULE)
        except RegistryError as e:
            return int(e.status)
        return proof

    revocations = [first.act(alice, Action("key-revocation", ns, key=bob.vkey, issued=3)) for ns in namespaces]
    answers = await asyncio.gather(*(x for pair in zip(revocations, map(publish, namespaces), strict=True) for x in pair))
    size = max(parse_tlog_proof(a).index for a in answers if isinstance(a, bytes)) + 1
    await wait_until(lambda: reg_a.log.integrated.checkpoint.size >= size, "node A at the last index")
    entries = reg_a.log.store.read_entries(0, reg_a.log.integrated.checkpoint.size)
    logged = {i: decode_entry(e) for i, e in enumerate(entries) if not is_index_root(e)}
    for n, ns in enumerate(namespaces):
        revoked, published = answers[2 * n], answers[2 * n + 1]
        assert isinstance(revoked, bytes)  # the revocation always holds
        revoked_at = parse_tlog_proof(revoked).index
        releases = [i for i, r in logged.items() if r.namespace == ns and r.signer == bob.vkey]
        if isinstance(published, bytes):
            assert releases == [parse_tlog_proof(published).index] and releases[0] < revoked_at
        else:
            assert published == 403 and releases == [], (ns, published, releases)
    assert reg_a.rejected == reg_b.rejected == []  # no void record was logged


@pytest.mark.parametrize("moved", [True, False])
def test_an_interrupted_migration_resumed_against_a_target_that_moved(shared, tmp_path, s3_path, moved: bool) -> None:  # type: ignore[no-untyped-def]
    """A copy into the shared engine dies after its second batch was sequenced in the target (not committed);
    before it resumes, something else sequences a foreign entry there (a half copy is never served, so only
    another copy or a hand on the database can). The resumed copy refuses the moved target; an unmoved one
    is finished, to the source's checkpoint, in the bucket too."""
    from reference import mth

    from tlog.storage.lmdb_store import LMDBLogStore
    from wasmlog.migrate import copy_log

    entries = [b"migrated %d" % i for i in range(600)]
    source = LMDBLogStore(str(tmp_path / "src"))
    try:
        Log(source, KEY).integrate(entries)

        def die_on_the_second_batch(plan: Any) -> None:
            if plan.old_size > 0:
                raise RuntimeError("killed between the bucket and the database")

        with pytest.raises(RuntimeError, match="killed"):
            copy_log(source, shared(publish_integrated=False, before_commit=die_on_the_second_batch), batch=256)
        target = shared(publish_integrated=False)
        assert target.committed_size() == 256 and target.sequenced(256, 1000) == entries[256:512]
        with pytest.raises(TlogError, match="does not match the stored tree"):
            Log(target, KEY)  # a half copy is never served
        if moved:
            target.sequence([b"foreign"], [leaf(b"foreign")])
            with pytest.raises(TlogError, match="sequenced other entries"):
                copy_log(source, target, batch=256)
            with pytest.raises(NotFoundError):  # nothing in the bucket claims a copy
                ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
            return
        report = copy_log(source, target, batch=256)
        assert (report.size, report.copied) == (600, 344)
        note = ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
        assert note == source.checkpoint()
        assert parse_checkpoint(parse_note(note).text).root_hash == mth(tuple(entries))
    finally:
        source.close()


async def test_a_release_published_through_one_node_right_after_its_claim_through_another_is_accepted(nodes) -> None:  # type: ignore[no-untyped-def]
    """A client behind a round-robin balancer: its claim went to node A (answered: logged), its first release
    goes to node B at once. B must not refuse it on a view of the namespaces that is behind the log."""
    (first, _), (second, _) = await nodes(), await nodes()
    refused = []
    for n in range(5):
        owner = Ed25519Signer.generate(f"owner{n}")
        await first.act(owner, Action("key-grant", f"rr{n}", key=owner.vkey, issued=1))
        release = release_statement(PackageRef(f"rr{n}", "m", "1.0.0"), EMPTY_MODULE, None, None)
        envelope = sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), owner).to_json()
        try:
            await second.publish_signed(owner.vkey, envelope, EMPTY_MODULE)
        except RegistryError as e:
            refused.append((n, e.status, str(e)))
    assert refused == []


class Recording:
    """An Admission that admits everything and records the order of its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prepare(self) -> None:
        self.calls.append("prepare")

    def admit(self, next_index: int, sequenced_since: Any, entries: Any) -> list[TlogError | None]:
        self.calls.append("admit")
        return [None] * len(entries)

    def trailer(self, index: int) -> bytes | None:
        return None

    def committed(self, next_index: int) -> None:
        self.calls.append("committed")


def test_an_admission_is_prepared_before_each_sequencing_transaction(shared) -> None:  # type: ignore[no-untyped-def]
    """Admission.prepare's contract (the registry verifies others' records there, outside the lock)."""
    store, admission = shared(), Recording()
    for n in range(2):
        store.sequence([b"p%d" % n], [leaf(b"p%d" % n)], admission)
    assert admission.calls == ["prepare", "admit", "committed"] * 2


class Counting(ObjectStore):
    """Counts the S3 requests made."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.requests: list[str] = []

    def _call(self, what: str, method: str, expect: int, **kwargs: Any) -> Any:
        self.requests.append(method)
        return super()._call(what, method, expect, **kwargs)


def test_an_integrator_replaces_its_own_checkpoint_with_one_request(shared, s3_path) -> None:  # type: ignore[no-untyped-def]
    """The compare-and-swap reads the bucket only when someone else wrote the checkpoint since our last write."""
    objects = Counting(f"s3://{s3_path}/log")
    log = Log(shared(objects=objects), KEY)
    entries = [b"c%d" % i for i in range(5)]
    log.store.sequence(entries, [leaf(e) for e in entries])  # type: ignore[attr-defined]
    for e in entries:
        objects.requests.clear()
        log.integrate([e], dedup=False)
        assert objects.requests.count("get_object") == 0 and objects.requests.count("put_object") == 3  # tile, bundle, checkpoint
    assert bucket_size(f"s3://{s3_path}/log") == 5


@pytest.mark.parametrize("url", [f"s3://AKIAEXAMPLE:{SECRET}@bucket/p", f"s3://{SECRET}@bucket", f"https://key:{SECRET}@host/bucket"])
def test_an_objects_url_with_credentials_in_it_is_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(MalformedError) as e:
        parse_objects_url(url)
    assert "SECRET" not in str(e.value) and "AWS_" in str(e.value)


class Relay:
    """A TCP relay on loopback to a real server, which the test can cut (the server's network going away):
    open connections are closed and new ones refused."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


async def test_an_add_while_the_bucket_is_unreachable_is_a_503_and_is_logged_after(shared, s3_path, seaweed, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """The only node's way to the bucket is cut once it runs: its integration rounds fail. Its submitter is
    answered 503 (not left hanging); the entry is sequenced, and once a node with the bucket integrates,
    the same submission gets its proof at the index it was given."""
    import boto3
    from botocore.config import Config

    from tlog.server import make_app
    from tlog.shared_sequencer import SharedSequencer

    relay = Relay(seaweed.s3_port)
    env = seaweed.env
    through_relay = boto3.Session().client("s3", endpoint_url=relay.url, region_name=env["AWS_REGION"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                           aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], config=Config(retries={"max_attempts": 1}))
    node = SharedSequencer(Log(shared(objects=ObjectStore(f"s3://{s3_path}/log", through_relay)), KEY), interval=0.01)
    node.answer_timeout = 0.5
    client = await aiohttp_client(make_app(node))
    relay.cut()
    r = await asyncio.wait_for(client.post("/add", data=b"while the bucket is away"), 60)
    assert r.status == 503 and r.headers["Retry-After"] == "1", (r.status, await r.text())
    assert "sequenced" in await r.text()
    await client.close()
    healthy = SharedSequencer(Log(shared(), KEY), interval=0.01)
    async with healthy.running():
        proof = await asyncio.wait_for(healthy.add(b"while the bucket is away"), 30)
    assert parse_tlog_proof(proof).index == 0


def test_log_serve_on_a_bucket_that_does_not_exist_says_so_at_start_up(tmp_path, pg_dsn, seaweed) -> None:  # type: ignore[no-untyped-def]
    from helpers import free_port

    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    done = subprocess.run([sys.executable, "-m", "wasmlog", "log", "serve", "--key", str(key), "--store", pg_dsn, "--objects",
                           "s3://wasmlog-no-such-bucket/log", "--listen", f"127.0.0.1:{free_port()}"],
                          env={**os.environ, **seaweed.env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "NoSuchBucket" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_bucket_that_accepts_connections_and_never_answers_is_unavailable_storage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A black hole (a real listener on loopback that reads nothing and answers nothing): a read fails as
    StorageUnavailableError after the store's timeout, rather than hanging on botocore's default of 60 s a try."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        with pytest.raises(StorageUnavailableError, match=r"timeout|timed out"):
            ObjectStore("s3://bucket/log", timeout=0.5).get("checkpoint")
    finally:
        silent.close()


async def test_a_yank_racing_the_publish_it_names_through_two_nodes(nodes) -> None:  # type: ignore[no-untyped-def]
    """In 20 namespaces at once, the owner publishes a release through node B and yanks it through node A.
    A yank is logged only after its release (else it is refused 404 UnknownRelease); the release always is."""
    (first, reg_a), (second, reg_b) = await nodes(), await nodes()
    owner = Ed25519Signer.generate("owner")
    namespaces = [f"yank{i}" for i in range(20)]
    for ns in namespaces:
        await first.act(owner, Action("key-grant", ns, key=owner.vkey, issued=1))

    async def b_knows() -> bool:
        for ns in namespaces:
            if await second.namespace(ns) is None:
                return False
        return True

    await wait_until(b_knows, "node B knows the namespaces")

    async def publish(ns: str) -> bytes:
        release = release_statement(PackageRef(ns, "m", "1.0.0"), EMPTY_MODULE, None, None)
        proof: bytes = await second.publish_signed(owner.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), owner).to_json(), EMPTY_MODULE)
        return proof

    async def yank(ns: str) -> bytes | int:
        try:
            proof: bytes = await first.act(owner, Action("yank", ns, name="m", version="1.0.0", issued=2, reason="race"))
        except RegistryError as e:
            return int(e.status)
        return proof

    answers = await asyncio.gather(*(x for ns in namespaces for x in (publish(ns), yank(ns))))
    for n in range(len(namespaces)):
        published, yanked = answers[2 * n], answers[2 * n + 1]
        assert isinstance(published, bytes)
        if isinstance(yanked, bytes):
            assert parse_tlog_proof(yanked).index > parse_tlog_proof(published).index
        else:
            assert yanked == 404
    size = max(parse_tlog_proof(a).index for a in answers if isinstance(a, bytes)) + 1
    await wait_until(lambda: min(reg_a.log.integrated.checkpoint.size, reg_b.log.integrated.checkpoint.size) >= size, "both nodes caught up")
    assert reg_a.rejected == reg_b.rejected == []  # nothing void was logged


async def test_the_bucket_is_a_consistent_tlog_tiles_log_at_every_moment_of_a_two_node_load(shared, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    """An auditor reads the bucket over plain HTTP again and again while two nodes append (each read of the
    checkpoint object must find every tile and bundle it covers, and be consistent with the last one read)."""
    import aiohttp

    from registry.audit import make_auditor
    from registry.audit_state import AuditState
    from tlog.note import Ed25519Verifier
    from tlog.shared_sequencer import SharedSequencer

    nodes = [SharedSequencer(Log(shared(), KEY), interval=0.005, batch_max=50) for _ in range(2)]
    entries = [b"moment %d" % i for i in range(900)]
    state, sizes, findings = AuditState(), [], []
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node.running())
        adding = asyncio.gather(*(nodes[i % 2].add(e) for i, e in enumerate(entries)))
        async with aiohttp.ClientSession() as session:
            while True:
                finished = adding.done()
                auditor = make_auditor(log_url=f"{seaweed.endpoint}/{s3_path}/log", session=session,
                                       verifiers=[Ed25519Verifier(KEY.name, KEY.public_key)], state=state)
                sizes.append(await auditor.run())
                findings += auditor.report("bucket")["findings"]
                if finished:
                    break
        await adding
    assert findings == [] and sizes[-1] == len(entries)
    assert sizes == sorted(sizes) and len(set(sizes)) > 2, sizes  # audited at several sizes on the way, never backwards


async def test_a_frozen_integrator_loses_the_lead_and_the_log_carries_on(tmp_path, pg_dsn, seaweed, s3_path) -> None:  # type: ignore[no-untyped-def]
    """SIGSTOP the integrating `log serve` process: its kernel still answers TCP keepalives, so only the
    database ending its idle lock session frees the lead. The other process must take over and log new
    entries; once the frozen one resumes (mid-round, deposed), it follows, and the bucket audits clean."""
    import aiohttp
    from test_shared_crash import Node
    from test_shared_log import audit_bucket

    key = tmp_path / "log.key"
    key.write_text(KEY.private_key + "\n")
    nodes = [Node(str(key), pg_dsn, f"s3://{s3_path}/log", seaweed.env, str(tmp_path / f"node{i}.log")) for i in range(2)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        def accepted(node: Node, entry: bytes) -> Any:
            async def post() -> bool:
                async with session.post(node.url + "/add", data=entry) as r:
                    return r.status == 200
            return post

        try:
            for node in nodes:
                node.start()
            for node in nodes:
                await wait_until(lambda node=node: node.ready(session), f"node on {node.port} to serve", 60)  # type: ignore[misc]
            await wait_until(accepted(nodes[0], b"before"), "an entry before the freeze", 30)
            healths = [await node.health(session) for node in nodes]
            frozen, other = (nodes[0], nodes[1]) if "integrating" in (healths[0] or "") else (nodes[1], nodes[0])
            assert frozen.proc is not None
            frozen.proc.send_signal(signal.SIGSTOP)
            try:
                await wait_until(accepted(other, b"while the integrator is frozen"), "the other process to take over", 90)
                assert "integrating" in (await other.health(session) or "")
            finally:
                frozen.proc.send_signal(signal.SIGCONT)
            await wait_until(accepted(frozen, b"through the thawed one"), "the thawed process to serve as a follower", 60)
            assert "following" in (await frozen.health(session) or "")
        finally:
            for node in nodes:
                node.kill()
    assert await audit_bucket(seaweed, s3_path) == (3, [])
