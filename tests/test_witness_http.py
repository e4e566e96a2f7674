"""c2sp.org/tlog-witness add-checkpoint through the real HTTP server: one test per status."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from tlog.checkpoint import Checkpoint
from tlog.cosignature import CosignatureV1Verifier, cosignature_timestamp
from tlog.errors import MalformedError
from tlog.hashes import EMPTY_ROOT
from tlog.log import Log
from tlog.merkle import tree_hash
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Ed25519Verifier, open_note, sign_note
from tlog.storage.memory import MemoryLogStore
from tlog.witness_protocol import AddCheckpoint
from witness.loglist import parse_log_list
from witness.ratelimit import RefusalLimiter, WindowCounter, client_key
from witness.server import WITNESS, make_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/wlog")
W_KEY = Ed25519Signer.generate("witness.example", ALG_COSIGNATURE_V1)
NOW = 1_800_000_000


def log_list(qpd: int = 86400) -> str:
    return f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd {qpd}\ncontact ops@example.com\n"


@pytest.fixture
def log() -> Log:
    return Log(MemoryLogStore(), LOG_KEY)


async def client_for(aiohttp_client, tmp_path, qpd: int = 86400):  # type: ignore[no-untyped-def]
    w = Witness(signer=W_KEY, logs=parse_log_list(log_list(qpd)), state=WitnessState(str(tmp_path)), clock=lambda: NOW)
    return await aiohttp_client(make_app(w))


def body(old: int, proof: list[bytes], note: bytes) -> bytes:
    return AddCheckpoint(old, tuple(proof), note).encode()


async def test_cosigns_first_checkpoint_and_serves_it(aiohttp_client, tmp_path, log: Log) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    log.integrate([b"a", b"b", b"c"])
    r = await c.post("/add-checkpoint", data=body(0, [], log.published.note))
    assert r.status == 200, await r.text()
    cosig = await r.read()
    note = log.published.note + cosig
    opened, verified = open_note(note, [Ed25519Verifier(LOG_KEY.name, LOG_KEY.public_key), CosignatureV1Verifier(W_KEY.name, W_KEY.public_key)])
    assert [s.name for s in verified] == [LOG_KEY.name, W_KEY.name]
    assert cosignature_timestamp(verified[1].signature) == NOW
    h = hashlib.sha256(LOG_KEY.name.encode()).hexdigest()
    got = await c.get(f"/{h}/checkpoint")
    assert got.status == 200 and await got.read() == note
    assert (await c.get(f"/{'0' * 64}/checkpoint")).status == 404


async def test_consistent_update_then_409_for_stale_old(aiohttp_client, tmp_path, log: Log) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    log.integrate([b"a", b"b", b"c"])
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200
    log.integrate([b"d", b"e"])
    proof = log.consistency_proof(3, 5)
    assert (await c.post("/add-checkpoint", data=body(3, proof, log.published.note))).status == 200
    r = await c.post("/add-checkpoint", data=body(3, proof, log.published.note))
    assert r.status == 409
    assert r.headers["Content-Type"] == "text/x.tlog.size" and await r.read() == b"5\n"


async def test_unknown_origin_is_404(aiohttp_client, tmp_path) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    other = Log(MemoryLogStore(), Ed25519Signer.generate("example.com/other"))
    assert (await c.post("/add-checkpoint", data=body(0, [], other.published.note))).status == 404


async def test_bad_or_missing_log_signature_is_403(aiohttp_client, tmp_path) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    impostor = Ed25519Signer.generate(LOG_KEY.name)  # same name, other key: an unknown key ID
    note = sign_note(Checkpoint(LOG_KEY.name, 0, EMPTY_ROOT).text(), [impostor])
    assert (await c.post("/add-checkpoint", data=body(0, [], note))).status == 403
    good = sign_note(Checkpoint(LOG_KEY.name, 1, b"\x01" * 32).text(), [LOG_KEY])
    forged = good.replace(b"\n1\n", b"\n2\n")  # text changed under a known key's signature
    assert (await c.post("/add-checkpoint", data=body(0, [], forged))).status == 403


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"old 0\n",
        b"old 01\n\n",
        b"old -1\n\nx",
        b"new 0\n\n",
        b"old 0\nnot base64\n\n",
    ],
)
async def test_malformed_is_400(aiohttp_client, tmp_path, log: Log, raw: bytes) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    r = await c.post("/add-checkpoint", data=raw + (log.published.note if raw.endswith(b"\n\n") else b""))
    assert r.status == 400


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "x-unknown"])
async def test_content_encoded_bodies_are_400_not_500(aiohttp_client, tmp_path, log: Log, encoding: str) -> None:
    """Issue 12 finding 6: an invalid gzip/deflate body was a 500 and a traceback; now 400 (415 for an unknown encoding)."""
    c = await client_for(aiohttp_client, tmp_path)
    r = await c.post("/add-checkpoint", data=b"\x1f\x8b not really compressed", headers={"Content-Encoding": encoding})
    assert r.status == (415 if encoding == "x-unknown" else 400) and "content-encoding" in (await r.text()).lower()
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200  # the server is fine


async def test_old_beyond_size_is_400(aiohttp_client, tmp_path, log: Log) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    log.integrate([b"a"])
    assert (await c.post("/add-checkpoint", data=body(2, [], log.published.note))).status == 400


async def test_more_than_63_proof_lines_is_400(aiohttp_client, tmp_path, log: Log) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    log.integrate([b"a"])
    assert (await c.post("/add-checkpoint", data=body(0, [b"\x00" * 32] * 64, log.published.note))).status == 400


async def test_422_cases(aiohttp_client, tmp_path, log: Log) -> None:
    c = await client_for(aiohttp_client, tmp_path)
    log.integrate([b"a", b"b"])
    # old 0 with a non-empty proof
    assert (await c.post("/add-checkpoint", data=body(0, [b"\x00" * 32], log.published.note))).status == 422
    # a size-0 checkpoint whose root is not the empty root
    bad_empty = sign_note(Checkpoint(LOG_KEY.name, 0, b"\x01" * 32).text(), [LOG_KEY])
    assert (await c.post("/add-checkpoint", data=body(0, [], bad_empty))).status == 422
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200
    log.integrate([b"c"])
    proof = log.consistency_proof(2, 3)
    wrong = [bytes([proof[0][0] ^ 1]) + proof[0][1:]] + proof[1:]
    assert (await c.post("/add-checkpoint", data=body(2, wrong, log.published.note))).status == 422
    # same size, different root: a fork (422 as on C2SP main)
    fork = sign_note(Checkpoint(LOG_KEY.name, 2, b"\x02" * 32).text(), [LOG_KEY])
    assert (await c.post("/add-checkpoint", data=body(2, [], fork))).status == 422


async def test_rate_limit_is_429(aiohttp_client, tmp_path, log: Log) -> None:
    """qpd counts the new trees cosigned; the tree already cosigned is answered from storage, never charged."""
    c = await client_for(aiohttp_client, tmp_path, qpd=2)
    witness = c.server.app[WITNESS]
    log.integrate([b"a"])
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200
    log.integrate([b"b"])
    r = await c.post("/add-checkpoint", data=body(1, log.consistency_proof(1, 2), log.published.note))
    assert r.status == 200
    cosig = await r.read()
    for _ in range(5):  # anyone can replay the cosigned checkpoint: the stored cosignature, free
        again = await c.post("/add-checkpoint", data=body(2, [], log.published.note))
        assert again.status == 200 and await again.read() == cosig
    assert witness.charged(LOG_KEY.name) == 2
    log.integrate([b"c"])
    r = await c.post("/add-checkpoint", data=body(2, log.consistency_proof(2, 3), log.published.note))
    assert r.status == 429
    assert await metric(c, "wasmlog_witness_rate_limited_requests_total", scope="log") == 1


async def test_the_cosigned_tree_is_re_signed_once_its_cosignature_is_old_and_never_charged(aiohttp_client, tmp_path, log: Log) -> None:
    now = [float(NOW)]
    w = Witness(signer=W_KEY, logs=parse_log_list(log_list(qpd=1)), state=WitnessState(str(tmp_path)), clock=lambda: now[0])
    c = await aiohttp_client(make_app(w))
    log.integrate([b"a"])
    first = await (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).read()
    assert w.refresh_age(w.logs[LOG_KEY.name]) == 86400  # 86400/qpd, at least 30 s
    now[0] += 86399
    assert await (await c.post("/add-checkpoint", data=body(1, [], log.published.note))).read() == first
    now[0] += 1
    r = await c.post("/add-checkpoint", data=body(1, [], log.published.note))
    assert r.status == 200
    fresh = open_note(log.published.note + await r.read(), [CosignatureV1Verifier(W_KEY.name, W_KEY.public_key)])[1][0]
    assert cosignature_timestamp(fresh.signature) == NOW + 86400
    assert w.charged(LOG_KEY.name) == 1  # the first cosignature only: qpd 1 is not exceeded


async def metric(c, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    """A sample from the witness's GET /metrics (0 when absent)."""
    text = await (await c.get("/metrics")).text()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    return 0.0


async def test_replays_with_a_wrong_old_do_not_spend_the_log_qpd(aiohttp_client, tmp_path, log: Log) -> None:
    """Issue 12: 47 replays answered 409 used to spend qpd 50; refusals now cost the client, not the log."""
    qpd = 5
    c = await client_for(aiohttp_client, tmp_path, qpd=qpd)
    log.integrate([b"a", b"b", b"c"])
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200
    public = log.published.note  # the log's checkpoint, as anyone can fetch it
    for _ in range(4 * qpd):
        r = await c.post("/add-checkpoint", data=body(1, [], public))
        assert r.status == 409 and await r.read() == b"3\n"
    assert c.server.app[WITNESS].charged(LOG_KEY.name) == 1
    for i in range(qpd - 1):  # the log still gets every cosignature its qpd allows
        old = log.published.checkpoint.size
        log.integrate([b"x%d" % i])
        r = await c.post("/add-checkpoint", data=body(old, log.consistency_proof(old, old + 1), log.published.note))
        assert r.status == 200, await r.text()
    assert c.server.app[WITNESS].charged(LOG_KEY.name) == qpd
    assert await metric(c, "wasmlog_witness_refused_requests_total", status="409") == 4 * qpd
    assert await metric(c, "wasmlog_witness_rate_limited_requests_total", scope="log") == 0


async def test_a_client_over_its_refusal_budget_gets_429_and_others_do_not(aiohttp_server, tmp_path, log: Log) -> None:
    """Token buckets per address: 127.0.0.1 spends its refusals; 127.0.0.2 is untouched; a request
    whose old size is the witness's (what the log sends) is never held back by the refusal budget."""
    w = Witness(
        signer=W_KEY, logs=parse_log_list(log_list()), state=WitnessState(str(tmp_path)), clock=lambda: NOW,
        refusals=RefusalLimiter(burst=3, per_second=0),  # no refill: the test counts, it does not time
    )
    server = await aiohttp_server(make_app(w))
    url = str(server.make_url("/add-checkpoint"))
    log.integrate([b"a", b"b"])
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as two:
        async def post(session: aiohttp.ClientSession, data: bytes) -> int:
            async with session.post(url, data=data) as r:
                return r.status

        assert await post(one, body(0, [], log.published.note)) == 200
        stale = body(1, [], log.published.note)
        assert [await post(one, stale) for _ in range(3)] == [409, 409, 409]
        assert await post(one, stale) == 429
        assert await post(one, b"old x\n") == 429  # malformed, over budget: 429 before any work
        assert await post(two, stale) == 409  # another client has its own budget
        log.integrate([b"c"])
        in_step = body(2, log.consistency_proof(2, 3), log.published.note)
        assert await post(one, in_step) == 200  # the log, even behind the same address
    assert w.charged(LOG_KEY.name) == 2
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert 'wasmlog_witness_rate_limited_requests_total{scope="client"} 2.0' in text
    assert 'wasmlog_witness_refused_requests_total{status="409"} 4.0' in text


def test_refusal_limiter_counts_refills_and_forgets_the_oldest_client() -> None:
    now = [0.0]
    limiter = RefusalLimiter(burst=2, per_second=0.5, max_clients=2, clock=lambda: now[0])
    limiter.charge("a")
    limiter.charge("a")
    assert limiter.exhausted("a") and not limiter.exhausted("b")
    now[0] = 2.0  # one token back
    assert not limiter.exhausted("a")
    limiter.charge("a")
    assert limiter.exhausted("a")
    limiter.charge("b")
    limiter.charge("c")  # a third client: "a", refused least recently, is forgotten (a full bucket again)
    assert len(limiter) == 2 and not limiter.exhausted("a")
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff") == "2001:db8::/64"
    assert client_key("::ffff:10.0.0.1") == "10.0.0.1" and client_key("127.0.0.1") == "127.0.0.1"


def test_window_counter_never_lets_more_than_the_limit_through_a_day() -> None:
    """Against a naive reference: every event time kept, any 24 h window checked."""
    counter = WindowCounter(10)
    accepted: list[float] = []
    t = 0.0
    for step in [100.0, 3000.0, 1.0, 40000.0, 20000.0, 7.0, 90000.0] * 6:
        t += step
        if not counter.full(t):
            counter.add(t)
            accepted.append(t)
        assert sum(1 for a in accepted if a > t - 86400) <= 10
    assert counter.count(t) >= sum(1 for a in accepted if a > t - 86400)


async def test_competing_checkpoints_never_get_inconsistent_cosignatures(aiohttp_client, tmp_path) -> None:
    """Two forks of one log (same key) race; every cosignature returned is on one fork's chain."""
    c = await client_for(aiohttp_client, tmp_path)
    forks = {"a": Log(MemoryLogStore(), LOG_KEY), "b": Log(MemoryLogStore(), LOG_KEY)}
    requests: list[tuple[str, bytes]] = []
    for i in range(1, 9):
        for name, fork in forks.items():
            fork.integrate([b"%s%d" % (name.encode(), i)])
            proof = fork.consistency_proof(i - 1, i) if i > 1 else []
            requests.append((name, body(i - 1, proof, fork.published.note)))
    results = await asyncio.gather(*(c.post("/add-checkpoint", data=r) for _, r in requests))
    winners = {name for (name, _), res in zip(requests, results, strict=True) if res.status == 200}
    assert len(winners) == 1, "the witness cosigned checkpoints from both forks"
    statuses = sorted(res.status for res in results)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409, 422}
    # the stored checkpoint is the winner's, at the largest size it cosigned
    winner = forks[winners.pop()]
    stored = await c.get(f"/{hashlib.sha256(LOG_KEY.name.encode()).hexdigest()}/checkpoint")
    text = (await stored.read()).split(b"\n\n")[0].decode() + "\n"
    size = int(text.split("\n")[1])
    assert text == Checkpoint(LOG_KEY.name, size, tree_hash(size, winner.reader)).text()


def test_log_list_parsing() -> None:
    logs = parse_log_list(log_list() + f"vkey {Ed25519Signer.generate('b.example/x').vkey}\norigin b.example/other\nqpd 1\n")
    assert set(logs) == {LOG_KEY.name, "b.example/other"}
    for bad in ["", "logs/v1\n", "logs/v0\nqpd 1\n", f"logs/v0\nvkey {LOG_KEY.vkey}\n", f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 0\n",
                f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 1\nqpd 2\n", f"logs/v0\nvkey {LOG_KEY.vkey}\nqpd 01\n"]:
        with pytest.raises(MalformedError):
            parse_log_list(bad)


async def test_state_survives_restart(aiohttp_client, tmp_path, log: Log) -> None:
    """The witness persists before it replies: a new process on the same data knows the size."""
    state = WitnessState(str(tmp_path / "w"))
    w = Witness(signer=W_KEY, logs=parse_log_list(log_list()), state=state, clock=lambda: NOW)
    c = await aiohttp_client(make_app(w))
    log.integrate([b"a", b"b"])
    assert (await c.post("/add-checkpoint", data=body(0, [], log.published.note))).status == 200
    await c.close()
    state.close()
    c2 = await client_for(aiohttp_client, tmp_path / "w")
    r = await c2.post("/add-checkpoint", data=body(0, [], log.published.note))
    assert r.status == 409 and await r.read() == b"2\n"
