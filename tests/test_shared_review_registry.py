"""Adversarial review of the registry on shared storage (issue 17): conflicting records through two nodes,
and a node whose view is behind the log. Real PostgreSQL and SeaweedFS (tests/services.py).
"""

from __future__ import annotations

import asyncio

import test_shared_registry
from helpers import wait_until

from registry.client import RegistryError, release_statement
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, PackageRef, decode_entry, is_index_root
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof

nodes = test_shared_registry.nodes  # the fixture: a factory of registry nodes on one database and bucket
EMPTY_MODULE = test_shared_registry.EMPTY_MODULE


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
