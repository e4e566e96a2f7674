"""A log publishing only quorum-cosigned checkpoints, with real witness servers on loopback."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from helpers import free_port, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.cosignature import cosignature_timestamp
from tlog.errors import MalformedError
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.metrics import HTTP_RESPONSES
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Ed25519Verifier, open_note
from tlog.policy import parse_policy
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.sequencer import Sequencer
from tlog.server import SEQUENCER, make_app
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.witness_protocol import AddCheckpoint
from tlog.witnessing import RequestBudget
from witness.loglist import KnownLog
from witness.ratelimit import RefusalLimiter
from witness.server import WITNESS
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

LOG_KEY = Ed25519Signer.generate("example.com/witnessed")
LOG_VERIFIER = Ed25519Verifier(LOG_KEY.name, LOG_KEY.public_key)
W_KEYS = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]



def policy_text(ports: list[int]) -> bytes:
    lines = [f"log {LOG_KEY.vkey}"]
    lines += [f"witness W{i} {k.vkey} http://127.0.0.1:{p}" for i, (k, p) in enumerate(zip(W_KEYS, ports, strict=True))]
    lines += ["group two-of-three 2 W0 W1 W2", "quorum two-of-three"]
    return ("\n".join(lines) + "\n").encode()


async def start_witness(aiohttp_server, tmp_path, i: int, port: int, qpd: int = 86400, refusals: RefusalLimiter | None = None):  # type: ignore[no-untyped-def]
    w = Witness(
        signer=W_KEYS[i], logs={LOG_KEY.name: KnownLog(LOG_KEY.name, LOG_VERIFIER, qpd)},
        state=WitnessState(str(tmp_path / f"w{i}")), refusals=refusals,
    )
    return await aiohttp_server(make_witness_app(w), port=port)


async def start_log(aiohttp_client, tmp_path, ports: list[int], store: LMDBLogStore | None = None, budget: RequestBudget | None = None):  # type: ignore[no-untyped-def]
    store = store or LMDBLogStore(str(tmp_path / "log"))
    log = Log(store, LOG_KEY, witnessed=True)
    seq = Sequencer(log, interval=0.01, republish_interval=3600, witness_budget=budget)
    policy = parse_policy(policy_text(ports))
    client = await aiohttp_client(make_app(seq, witness_policy=policy, witness_timeout=2.0))
    return client, policy, store


async def add_ok(client, policy, entry: bytes):  # type: ignore[no-untyped-def]
    r = await client.post("/add", data=entry)
    assert r.status == 200, await r.text()
    tp = parse_tlog_proof(await r.read())
    witnesses = [w.verifier for w in policy.witnesses.values()]
    cp, _, verified = verify_tlog_proof(tp, leaf_hash(entry), LOG_VERIFIER, extra_verifiers=witnesses)
    assert policy.satisfied(policy.witnessed_by(verified))
    return tp, cp, verified


async def test_published_checkpoints_carry_the_quorum(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    for i in range(3):
        await start_witness(aiohttp_server, tmp_path, i, ports[i])
    client, policy, _ = await start_log(aiohttp_client, tmp_path, ports)
    results = await asyncio.gather(*(add_ok(client, policy, b"e%d" % i) for i in range(50)))
    for _, _, verified in results:
        assert len(policy.witnessed_by(verified)) == 3
        assert all(cosignature_timestamp(s.signature) > 0 for s in verified if s.name != LOG_KEY.name)
    r = await client.get("/checkpoint")
    note, verified = open_note(await r.read(), [LOG_VERIFIER, *(w.verifier for w in policy.witnesses.values())])
    assert policy.satisfied(policy.witnessed_by(verified))


async def test_one_witness_down_still_publishes(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    for i in (0, 2):
        await start_witness(aiohttp_server, tmp_path, i, ports[i])
    client, policy, _ = await start_log(aiohttp_client, tmp_path, ports)
    _, _, verified = await add_ok(client, policy, b"x")
    assert policy.witnessed_by(verified) == {"W0", "W2"}


async def checkpoint_published(client) -> bool:  # type: ignore[no-untyped-def]
    return (await client.get("/checkpoint")).status == 200


async def test_unmet_quorum_publishes_nothing_until_witnesses_return(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    await start_witness(aiohttp_server, tmp_path, 0, ports[0])
    client, policy, _ = await start_log(aiohttp_client, tmp_path, ports)
    r = await client.post("/add", data=b"waits for witnesses")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    # Not even the empty tree is published without its quorum.
    assert (await client.get("/checkpoint")).status == 404
    await start_witness(aiohttp_server, tmp_path, 1, ports[1])
    # The republisher retries every second; once a second witness answers, the quorum holds.
    await wait_until(lambda: checkpoint_published(client), "a checkpoint published with the quorum back")
    tp, cp, _ = await add_ok(client, policy, b"waits for witnesses")
    assert tp.index == 0 and cp.size == 1  # the same entry, logged once


async def test_a_new_log_process_catches_up_after_409(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    servers = [await start_witness(aiohttp_server, tmp_path, i, ports[i]) for i in range(3)]
    client, policy, store = await start_log(aiohttp_client, tmp_path, ports)
    for i in range(5):
        await add_ok(client, policy, b"first %d" % i)
    await client.close()
    # A round the log never published (it stopped first): the witnesses are at 6, its checkpoint at 5.
    log = Log(store, LOG_KEY, witnessed=True)
    log.integrate([b"unpublished"])
    req = AddCheckpoint(5, tuple(log.consistency_proof(5, 6, unpublished=True)), log.integrated.note).encode()
    async with aiohttp.ClientSession() as s:
        for port in ports:
            async with s.post(f"http://127.0.0.1:{port}/add-checkpoint", data=req) as r:
                assert r.status == 200
    # A fresh sequencer starts each witness at its published size: they answer 409 with their
    # size, and it re-proves from there.
    client2, policy, _ = await start_log(aiohttp_client, tmp_path, ports, store=store)
    _, cp, verified = await add_ok(client2, policy, b"second")
    assert cp.size == 7 and len(policy.witnessed_by(verified)) == 3
    assert all(statuses_seen(s).get("409", 0) >= 1 for s in servers)


async def test_a_restarted_log_resumes_in_step_without_a_409(aiohttp_client, aiohttp_server, tmp_path) -> None:
    """Its published note says which witnesses hold its size: no refused request to find out."""
    ports = [free_port() for _ in range(3)]
    servers = [await start_witness(aiohttp_server, tmp_path, i, ports[i]) for i in range(3)]
    client, policy, store = await start_log(aiohttp_client, tmp_path, ports)
    await add_ok(client, policy, b"first")
    await client.close()
    client2, policy, _ = await start_log(aiohttp_client, tmp_path, ports, store=store)
    _, cp, verified = await add_ok(client2, policy, b"second")
    assert cp.size == 2 and len(policy.witnessed_by(verified)) == 3
    assert [statuses_seen(s).get("409", 0) for s in servers] == [0, 0, 0]


def statuses_seen(server) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """add-checkpoint requests a witness answered, by status (its HTTP response counter)."""
    samples = [x for m in server.app[HTTP_RESPONSES].collect() for x in m.samples]
    return {x.labels["status"]: int(x.value) for x in samples if x.name.endswith("_total") and x.labels["method"] == "POST"}


def requests_seen(server) -> int:  # type: ignore[no-untyped-def]
    """add-checkpoint requests a witness answered, whatever the status."""
    return sum(statuses_seen(server).values())


async def until(predicate, seconds: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll predicate until it holds; fail after seconds."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_the_log_does_not_ask_witnesses_when_nothing_changed(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    servers = [await start_witness(aiohttp_server, tmp_path, i, ports[i]) for i in range(3)]
    client, policy, _ = await start_log(aiohttp_client, tmp_path, ports)
    first, _, _ = await add_ok(client, policy, b"once")
    seen = [requests_seen(s) for s in servers]
    again, _, _ = await add_ok(client, policy, b"once")  # a duplicate: the tree does not change
    assert again.index == first.index
    seq = client.server.app[SEQUENCER]
    assert await seq.publish(seq.log.integrated) == seq.log.published
    assert [requests_seen(s) for s in servers] == seen


async def test_a_witness_that_cosigned_is_not_asked_again_while_the_quorum_is_missing(aiohttp_client, aiohttp_server, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    w0 = await start_witness(aiohttp_server, tmp_path, 0, ports[0])
    client, _, _ = await start_log(aiohttp_client, tmp_path, ports)
    seq = client.server.app[SEQUENCER]
    assert seq.cosigner is not None
    await until(lambda: seq.cosigner.clients[1].failures >= 2)  # two rounds without a quorum
    assert requests_seen(w0) == 1
    await start_witness(aiohttp_server, tmp_path, 1, ports[1])
    await until(lambda: bool(seq.log.published.note))  # the republisher's next round meets the quorum
    assert requests_seen(w0) == 1  # its cosignature of the empty tree was reused


async def test_the_log_keeps_to_the_budget_it_was_given(aiohttp_client, aiohttp_server, tmp_path) -> None:
    """With K rounds to spend (and no refill worth a request during the test), each witness sees at
    most K requests however many entries come; the next round waits for the budget."""
    k = 3
    ports = [free_port() for _ in range(3)]
    servers = [await start_witness(aiohttp_server, tmp_path, i, ports[i]) for i in range(3)]
    budget = RequestBudget(1, burst=k)  # one more round a day
    client, _, _ = await start_log(aiohttp_client, tmp_path, ports, budget=budget)
    answered = 0
    for i in range(2 * k):
        task = asyncio.ensure_future(client.post("/add", data=b"entry %d" % i))
        await until(lambda: task.done() or budget.waits > 0)  # noqa: B023 (task is read at once)
        if not task.done():
            break
        assert task.result().status == 200
        answered += 1
    assert budget.waits == 1 and not task.done()
    assert [requests_seen(s) for s in servers] == [k, k, k]
    assert k - 1 <= answered <= k  # the empty tree's round may have come first
    task.cancel()


async def test_replays_of_the_public_checkpoint_do_not_lock_the_log_out(aiohttp_client, aiohttp_server, tmp_path) -> None:
    """Issue 12: from the log's own address, more replays with a wrong old than the log's qpd."""
    qpd = 3
    ports = [free_port() for _ in range(3)]
    servers = [
        await start_witness(aiohttp_server, tmp_path, i, ports[i], qpd=qpd, refusals=RefusalLimiter(burst=2, per_second=0))
        for i in range(3)
    ]
    client, policy, _ = await start_log(aiohttp_client, tmp_path, ports)
    await add_ok(client, policy, b"a")
    public = await (await client.get("/checkpoint")).read()
    async with aiohttp.ClientSession() as attacker:
        for port in ports:
            statuses = []
            for _ in range(3 * qpd):
                async with attacker.post(f"http://127.0.0.1:{port}/add-checkpoint", data=AddCheckpoint(0, (), public).encode()) as r:
                    statuses.append(r.status)
            assert statuses == [409, 409] + [429] * (3 * qpd - 2)
    for entry in (b"b", b"c"):
        _, _, verified = await add_ok(client, policy, entry)
        assert len(policy.witnessed_by(verified)) == 3
    assert [s.app[WITNESS].charged(LOG_KEY.name) for s in servers] == [qpd] * 3


@pytest.mark.parametrize(
    "text",
    [
        b"quorum Q\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\nwitness A " + W_KEYS[1].vkey.encode() + b"\nquorum A\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\nwitness B " + W_KEYS[0].vkey.encode() + b"\nquorum A\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\ngroup G 2 A\nquorum G\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\ngroup G 1 A A\nquorum G\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\ngroup G any B\nquorum G\n",
        b"witness A " + W_KEYS[0].vkey.encode() + b"\nquorum A\nquorum A\n",
        b"witness none " + W_KEYS[0].vkey.encode() + b"\nquorum none\n",
        b"witness A " + LOG_KEY.vkey.encode() + b"\nquorum A\n",  # a note key is not a cosigner key
        b"log " + LOG_KEY.vkey.encode() + b"\n",  # no quorum
        b"quorum none\x01\n",
    ],
)
def test_bad_policies_rejected(text: bytes) -> None:
    with pytest.raises(MalformedError):
        parse_policy(text)


def test_policy_quorum_evaluation() -> None:
    ks = [Ed25519Signer.generate(f"x{i}", ALG_COSIGNATURE_V1).vkey for i in range(6)]
    text = "\n".join(
        [f"  log {LOG_KEY.vkey}  ", "# comment", ""]
        + [f"witness X{i}\t{ks[i]}" for i in range(3)]
        + ["group X 2 X1 X2 X0"]
        + [f"witness Y{i} {ks[3 + i]}" for i in range(3)]
        + ["group Y any Y0 Y1 Y2", "group XY all X Y", "quorum XY"]
    ).encode()
    p = parse_policy(text)
    assert p.satisfied({"X0", "X1", "Y2"})
    assert not p.satisfied({"X0", "Y0", "Y1", "Y2"})
    assert not p.satisfied({"X0", "X1"})
    assert parse_policy(p.encode().encode()).satisfied({"X0", "X2", "Y1"})
    assert parse_policy(b"quorum none\n").satisfied(set())


_QUORUM_KEYS = [Ed25519Signer.generate(f"q{i}", ALG_COSIGNATURE_V1).vkey for i in range(5)]


@st.composite
def _policies(draw: st.DrawFn) -> tuple[str, dict[str, tuple[int, list[str]]], str]:
    """A random policy text with nested groups, its groups, and its quorum name."""
    names = [f"W{i}" for i in range(draw(st.integers(1, 5)))]
    lines = [f"witness {n} {_QUORUM_KEYS[i]}" for i, n in enumerate(names)]
    groups: dict[str, tuple[int, list[str]]] = {}
    for g in range(draw(st.integers(0, 4))):
        members = draw(st.lists(st.sampled_from(names + list(groups)), min_size=1, max_size=4, unique=True))
        k = draw(st.integers(1, len(members)))
        groups[f"G{g}"] = (k, members)
        lines.append(f"group G{g} {k} {' '.join(members)}")
    quorum = draw(st.sampled_from(names + list(groups)))
    return "\n".join([*lines, f"quorum {quorum}"]) + "\n", groups, quorum


@settings(max_examples=200, deadline=None)
@given(policy=_policies(), witnessed=st.sets(st.sampled_from([f"W{i}" for i in range(5)])))
def test_policy_quorum_matches_recursive_definition(policy: tuple[str, dict[str, tuple[int, list[str]]], str], witnessed: set[str]) -> None:
    text, groups, quorum = policy

    def holds(name: str) -> bool:  # tlog-policy's definition, literally
        if name not in groups:
            return name in witnessed
        k, members = groups[name]
        return sum(holds(m) for m in members) >= k

    assert parse_policy(text.encode()).satisfied(witnessed) == holds(quorum)


async def test_a_witnessed_log_on_shared_storage_publishes_only_cosigned_checkpoints(aiohttp_client, aiohttp_server, tmp_path, pg_dsn, s3_path, seaweed, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Two processes on PostgreSQL and S3: only the integrator has checkpoints cosigned; both answer
    with quorum-cosigned proofs, and the bucket's checkpoint is the cosigned one."""
    from tlog.shared_sequencer import SharedSequencer
    from tlog.storage.objects import ObjectStore
    from tlog.storage.shared import SharedLogStore

    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    ports = [free_port() for _ in range(3)]
    for i in range(3):
        await start_witness(aiohttp_server, tmp_path, i, ports[i])
    policy = parse_policy(policy_text(ports))
    clients, stores = [], []
    for _ in range(2):
        store = SharedLogStore(pg_dsn, f"s3://{s3_path}/log", publish_integrated=False)
        stores.append(store)
        seq = SharedSequencer(Log(store, LOG_KEY, witnessed=True), interval=0.01, republish_interval=3600)
        clients.append(await aiohttp_client(make_app(seq, witness_policy=policy, witness_timeout=2.0)))
    try:
        results = await asyncio.gather(*(add_ok(clients[i % 2], policy, b"shared %d" % i) for i in range(40)))
        assert sorted(tp.index for tp, _, _ in results) == list(range(40))
        assert sum(c.app[SEQUENCER].leading for c in clients) == 1
        note = ObjectStore(f"s3://{s3_path}/log").get("checkpoint")
        _, verified = open_note(note, [LOG_VERIFIER, *(w.verifier for w in policy.witnesses.values())])
        assert policy.satisfied(policy.witnessed_by(verified))
    finally:
        for c in clients:
            await c.close()
        for store in stores:
            store.close()
