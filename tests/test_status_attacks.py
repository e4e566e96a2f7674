"""Status proofs under attack (spec/status-proof.md): a registry that holds its own key but not the witnesses,
or a mirror, tries to have an edge node accept "not yanked, not revoked" when the log says otherwise, or
refuse wrongly; each test is one such attempt, against a real registry over loopback HTTP or a log built here."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import REGISTRY_KEY, build_registry, release_envelope, start_registry, wat_module
from test_status import (
    ALICE,
    BOB,
    CAROL,
    NOW,
    POLICY,
    REF,
    WITNESSES,
    check,
    cosigned,
    cosigned_proof,
    cosigned_status,
    fetch,
    published,
    reason,
)

from edge.verify import MAX_FUTURE_SKEW, VerifyError
from registry.audit import make_auditor
from registry.audit_state import AuditState
from registry.dsse import ACTION_PAYLOAD_TYPE, parse_envelope, sign_envelope
from registry.index import IndexState
from registry.record import Action, IndexRoot, PackageRef, decode_entry, decode_index_root, is_index_root, record_for
from registry.status_proof import Included, StatusProof, build_status_proof, parse_status_proof
from tlog.cosignature import cosign
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.note import Ed25519Signer, parse_note, verifier_from_vkey
from tlog.proof_file import TlogProof
from tlog.storage.memory import MemoryLogStore


async def test_a_status_proof_is_as_fresh_as_its_quorum_not_its_newest_witness(aiohttp_client, tmp_path) -> None:
    """A registry shows the checkpoint with its yank to W0 and W1 only (a quorum of two), and keeps asking W2,
    which never saw past the yank, to cosign the checkpoint before it: W2 honestly cosigns that one afresh.
    One fresh cosignature beside stale ones is not a fresh quorum: the status proof's time is the newest
    time by which a quorum had cosigned."""
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof, _ = await fetch(api)
    before = parse_status_proof(await api.get(api.package_path(REF) + "/status-proof"))
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    _, yanked = await fetch(api)
    assert reason(module, proof, yanked) == "yanked"
    text = parse_note(before.checkpoint).text
    old = NOW - POLICY.max_status_age - 1  # when W0 and W1 last cosigned the checkpoint before the yank

    def signed(*times: int) -> StatusProof:
        return dataclasses.replace(before, checkpoint=before.checkpoint + b"".join(
            cosign(w, text, t).line().encode() for w, t in zip(WITNESSES, times, strict=True)))

    assert reason(module, proof, signed(old, old, NOW - 60)) == "status-stale"
    # the quorum (any two) met by NOW - 100 at the latest: as fresh as that
    verified = check(module, proof, signed(old, NOW - 100, NOW - 60))
    assert verified.status is not None and verified.status.time == NOW - 100
    assert reason(module, proof, signed(old, NOW - 100, NOW - 60), now=NOW - 100 + POLICY.max_status_age + 1) == "status-stale"
    # a cosignature from further ahead than MAX_FUTURE_SKEW does not count at all; within it, it counts as is
    assert reason(module, proof, signed(old, NOW + MAX_FUTURE_SKEW + 1, NOW + MAX_FUTURE_SKEW + 1)) == "status-quorum"
    assert check(module, proof, signed(old, NOW + MAX_FUTURE_SKEW, NOW + MAX_FUTURE_SKEW)).status.time == NOW + MAX_FUTURE_SKEW


@pytest.mark.parametrize("first", ["index-root", "undecodable"])
async def test_a_log_that_opens_with_an_index_root_or_garbage_is_still_audited(aiohttp_client, tmp_path, first) -> None:
    """A compromised registry makes its first entry something that is not a namespace record (a true index root
    of the empty index, or bytes that decode as nothing), then withholds a yank from its index: the audit still
    treats the log as a registry's and names the lying root (and the undecodable entry)."""
    api, _, registry, _ = await start_registry(aiohttp_client, tmp_path)
    await registry.sequencer.add(IndexRoot(REGISTRY_KEY.name, 0, bytes(32)).encode() if first == "index-root" else b"not a record")
    module = wat_module("no_imports", tmp_path)
    await api.act(ALICE, Action("key-grant", "acme", key=ALICE.vkey, issued=1))
    await api.publish(ALICE, REF, module)
    honest = registry.log.trailer
    assert honest is not None

    def withholding(plan):  # type: ignore[no-untyped-def]
        hidden = [b"withheld" if decode_entry(e).type == "yank" else e for e in plan.new_entries]
        return honest(dataclasses.replace(plan, new_entries=tuple(hidden), new_leaf_hashes=tuple(map(leaf_hash, hidden))))

    registry.log.trailer = withholding
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    root_index = registry.log.published.checkpoint.size - 1
    auditor = make_auditor(log_url=api.url + "/log", session=api.session, verifiers=[verifier_from_vkey(REGISTRY_KEY.vkey)], state=AuditState())
    await auditor.run()
    found = [(f.kind, f.where) for f in auditor.findings]
    assert ("index-root-mismatch", f"index {root_index} (index-root record)") in found
    assert [f for f in found if f[0] == "index-root-mismatch"] == [("index-root-mismatch", f"index {root_index} (index-root record)")]
    assert auditor.report(api.url)["registry_log"] is True
    if first == "undecodable":
        assert ("void-record", "index 0") in found


async def test_a_key_revoked_then_granted_again_stays_revoked(aiohttp_client, tmp_path) -> None:
    """Grants are not carried in status proofs. Bob's key is revoked at i; a compromised registry logs a grant of
    it again at j (under another name too: a key is its public key) and Bob's releases at k > j: the rules make
    that grant and those releases void, and the verifier refuses them from the revocation alone; Bob's release
    from before i stays accepted."""
    api, registry, module = await published(aiohttp_client, tmp_path)
    early_proof, _ = await fetch(api)
    await api.act(ALICE, Action("key-revocation", "acme", key=BOB.vkey, issued=2))
    revoked_at = registry.state.namespaces["acme"].revoked[BOB.vkey]
    bob_again = Ed25519Signer("bob-again", BOB.seed)  # the same public key under another name

    async def logged_straight(entry: bytes) -> int:
        await registry.sequencer.add(entry)
        return registry.log.store.lookup([leaf_hash(entry)])[leaf_hash(entry)]

    def grant(key: Ed25519Signer) -> bytes:
        action = Action("key-grant", "acme", key=key.vkey, issued=5)
        return record_for("key-grant", ALICE.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), ALICE)).encode()

    regranted = [await logged_straight(grant(BOB)), await logged_straight(grant(bob_again))]
    assert revoked_at < min(regranted) and {i for i, _ in registry.rejected} >= set(regranted)  # void by the rules
    for signer, version in ((BOB, "2.0.0"), (bob_again, "3.0.0")):
        ref = PackageRef("acme", "hello", version)
        entry = record_for("release", signer.vkey, parse_envelope(release_envelope(signer, ref, module, None))).encode()
        index = await logged_straight(entry)
        size = registry.log.published.checkpoint.size
        proof = TlogProof(index, tuple(registry.log.inclusion_proof(index, size)), cosigned(registry.log.published.note), entry).encode()
        status = cosigned_status(registry.indexer.status_proof("acme", "hello", index))
        assert index > max(regranted) and reason(module, proof, status) == "key-revoked"
    _, latest = await fetch(api)
    check(module, early_proof, latest)  # bob's release from before his revocation


async def test_batches_flushed_concurrently_are_all_indexed(tmp_path) -> None:
    """Sequencer.flush called again while a batch is still integrating (as the tests here and the batching loop
    can): each batch's index root must build on every batch before it. The index the registry keeps, and every
    root it logged, match the index recomputed from its log."""
    registry, seq, _ = build_registry(tmp_path)

    def grant(ns: str, key: Ed25519Signer) -> bytes:
        action = Action("key-grant", ns, key=key.vkey, issued=1)
        return record_for("key-grant", key.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), key)).encode()

    for n in range(10):
        waiters = [seq.submit(grant(f"ns{n}-a", ALICE))]
        first = asyncio.create_task(seq.flush())
        await asyncio.sleep(0)  # the first batch is in integrate's thread
        waiters.append(seq.submit(grant(f"ns{n}-b", BOB)))
        await asyncio.gather(first, seq.flush(), *waiters)
    size = registry.log.integrated.checkpoint.size
    entries = registry.log.store.read_entries(0, size)
    recomputed, roots = IndexState(), []
    for i, entry in enumerate(entries):
        if is_index_root(entry):
            roots.append((decode_index_root(entry).root, recomputed.root))
        recomputed = recomputed.with_records([(i, None if is_index_root(entry) else decode_entry(entry))], i + 1)
    assert len(roots) == 20 and all(logged == ours for logged, ours in roots)
    assert dict(registry.indexer.index.histories) == dict(recomputed.histories) and len(recomputed.histories) == 20
    assert not registry.indexer.mismatches


def offline_status() -> tuple[bytes, bytes, bytes]:
    """(module, its tlog-proof, its status proof) from a log built here: alice claims acme and grants bob and
    carol, bob releases hello@1.0.0, carol is revoked, hello@0.9.0 is yanked; an index root closes the log."""
    module = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")

    def act(a: Action) -> Any:
        return record_for(a.action, ALICE.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, a.payload(), ALICE))

    records = [act(Action("key-grant", "acme", key=k.vkey, issued=1)) for k in (ALICE, BOB, CAROL)]
    records.append(record_for("release", BOB.vkey, parse_envelope(release_envelope(BOB, REF, module, None))))
    records += [act(Action("key-revocation", "acme", key=CAROL.vkey, issued=2)),
                act(Action("yank", "acme", name="hello", version="0.9.0", issued=3, reason="old"))]
    index = IndexState().with_records(list(enumerate(records)), len(records))
    log = Log(MemoryLogStore(), REGISTRY_KEY)
    log.integrate([r.entry for r in records])
    (at,), published_cp = log.integrate([IndexRoot(REGISTRY_KEY.name, len(records), index.root).encode()])
    note, size = cosigned(published_cp.note), published_cp.checkpoint.size

    def included(indexes: Sequence[int]) -> list[Included]:
        return [Included(i, log.store.read_entries(i, i + 1)[0], tuple(log.inclusion_proof(i, size))) for i in indexes]

    sp = build_status_proof(index=index, checkpoint=note, root=included([at])[0], namespace="acme", name="hello", included=included)
    assert len(sp.records) == 2
    return module, TlogProof(3, tuple(log.inclusion_proof(3, size)), note, records[3].entry).encode(), sp.encode()


OFFLINE = offline_status()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_status_proof_is_refused_with_a_reason_never_a_crash(data: st.DataObject) -> None:
    """Any byte changed, inserted or cut: the verifier decides with a reason code (or accepts bytes that say the same)."""
    module, proof, status = OFFLINE
    assert check(module, proof, status).status is not None
    pos = data.draw(st.integers(0, len(status) - 1))
    how = data.draw(st.sampled_from(["flip", "insert", "cut"]))
    byte = data.draw(st.integers(0, 255))
    mutated = {"flip": status[:pos] + bytes([status[pos] ^ (byte or 1)]) + status[pos + 1:],
               "insert": status[:pos] + bytes([byte]) + status[pos:], "cut": status[:pos]}[how]
    try:
        verified = check(module, proof, mutated)
    except VerifyError as e:
        assert e.reason.startswith("status-")
        return
    assert verified.status is not None and parse_status_proof(mutated).encode() == mutated  # only a canonical file is read


async def test_two_index_roots_in_one_batch_only_the_last_proves_and_the_audit_names_the_lie(aiohttp_client, tmp_path) -> None:
    """A compromised registry slips a lying index root (one that leaves out the yank) into a batch, before the
    batch's own trailer: no status proof can use it (it is not its checkpoint's last entry), the trailer's root
    shows the yank, and the audit names the lie and nothing else."""
    api, registry, module = await published(aiohttp_client, tmp_path)
    proof, before = await fetch(api)
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=3, reason="CVE"))
    yanked_at = registry.log.published.checkpoint.size - 2
    entries = registry.log.store.read_entries(0, yanked_at + 2)
    without_yank = IndexState().with_records([(i, None if is_index_root(e) or i == yanked_at else decode_entry(e)) for i, e in enumerate(entries)],
                                             yanked_at + 2)
    lie = IndexRoot(REGISTRY_KEY.name, yanked_at + 2, without_yank.root)
    await registry.sequencer.add(lie.encode())
    lie_index = registry.log.published.checkpoint.size - 2
    assert lie_index == yanked_at + 2 and is_index_root(registry.log.store.read_entries(lie_index + 1, lie_index + 2)[0])
    _, latest = await fetch(api)
    assert latest.root.index == lie_index + 1 and reason(module, proof, latest) == "yanked"
    size = registry.log.published.checkpoint.size
    lying = dataclasses.replace(latest, root=Included(lie_index, lie.encode(), tuple(registry.log.inclusion_proof(lie_index, size))),
                                namespace=before.namespace, package=before.package, records=before.records)
    assert reason(module, proof, lying) == "status-root-invalid"
    auditor = make_auditor(log_url=api.url + "/log", session=api.session, verifiers=[verifier_from_vkey(REGISTRY_KEY.vkey)], state=AuditState())
    await auditor.run()
    assert [(f.kind, f.where) for f in auditor.findings] == [("index-root-mismatch", f"index {lie_index} (index-root record)")]


async def test_a_void_revocation_before_a_grant_refuses_and_the_audit_names_it(aiohttp_client, tmp_path) -> None:
    """The other order: a compromised registry logs a revocation of carol's key before carol was ever granted
    (void: only a granted key can be revoked), then carol is granted and releases, both valid by the rules. The
    status proof cannot show that the revocation was void without carrying grants: it counts, the release is
    refused (a registry can always refuse by serving nothing), and the audit names the void revocation."""
    api, registry, module = await published(aiohttp_client, tmp_path)
    revocation = Action("key-revocation", "acme", key=CAROL.vkey, issued=2)
    entry = record_for("key-revocation", ALICE.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, revocation.payload(), ALICE)).encode()
    await registry.sequencer.add(entry)
    void_at = registry.log.store.lookup([leaf_hash(entry)])[leaf_hash(entry)]
    assert [i for i, _ in registry.rejected] == [void_at]
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=3))
    ref = PackageRef("acme", "hello", "2.0.0")
    proof = cosigned_proof(await api.publish(CAROL, ref, module))
    _, status = await fetch(api, ref)
    assert reason(module, proof, status) == "key-revoked"
    auditor = make_auditor(log_url=api.url + "/log", session=api.session, verifiers=[verifier_from_vkey(REGISTRY_KEY.vkey)], state=AuditState())
    await auditor.run()
    assert [(f.kind, f.where) for f in auditor.findings] == [("void-record", f"index {void_at}")]


def test_a_history_relabelled_reordered_or_padded_proves_nothing() -> None:
    """The value hash commits to every (index, type) in order: a revocation relabelled as a grant (so it need
    not be carried), items swapped, or an item added, no longer lead to the index root, or do not parse."""
    module, proof, status = OFFLINE
    sp = parse_status_proof(status)
    ns = sp.namespace
    revocation = next(i for i, (_, code) in enumerate(ns.history) if code == 2)
    relabelled = tuple((i, 1) if k == revocation else (i, c) for k, (i, c) in enumerate(ns.history))
    assert reason(module, proof, dataclasses.replace(sp, namespace=dataclasses.replace(ns, history=relabelled),
                                                     records=tuple(r for r in sp.records if r.index != ns.history[revocation][0]))) == "status-map-proof"
    swapped = dataclasses.replace(ns, history=(ns.history[1], ns.history[0], *ns.history[2:]))
    assert reason(module, proof, dataclasses.replace(sp, namespace=swapped).encode()) == "status-malformed"
    padded = dataclasses.replace(ns, history=(*ns.history, (ns.history[-1][0] + 1, 1)))
    assert reason(module, proof, dataclasses.replace(sp, namespace=padded)) == "status-map-proof"
