"""A witnessed registry on PostgreSQL and S3: two `wasmlog registry serve --store ... --witness-policy` processes
whose log three real witness servers on loopback cosign (a quorum of two), the leading one SIGKILLed.

Only the integrating process has checkpoints cosigned; the other takes the lead when it dies and resumes
the witnesses from the last cosigned checkpoint, so the witnesses go on cosigning (consistency from there).
"""

from __future__ import annotations

import hashlib
import time

import aiohttp
from helpers import free_port, wait_until
from registry_helpers import REGISTRY_KEY, with_custom_section
from test_shared_registry_crash import RegistryNode
from witnessed_helpers import WITNESS_KEYS, tlog_policy, trust_policy

from edge.verify import verify_module
from registry.client import RegistryClient, RegistryError
from registry.record import PackageRef
from registry.trust_policy import parse_trust_policy
from tlog.checkpoint import Checkpoint
from tlog.note import Ed25519Signer, Ed25519Verifier
from tlog.policy import open_checkpoint, parse_policy
from tlog.proof_file import parse_tlog_proof, verify_tlog_proof
from tlog.storage.objects import ObjectStore
from witness.loglist import KnownLog
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

EMPTY_MODULE = b"\x00asm\x01\x00\x00\x00"
VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
POLICY = parse_policy(tlog_policy().encode())
TRUST = parse_trust_policy(trust_policy("require_status = true"))


def cosigned(note: bytes) -> Checkpoint:
    """The checkpoint of a note the log signed and a quorum of the witnesses cosigned (tlog.policy.open_checkpoint)."""
    opened = open_checkpoint(note, POLICY, int(time.time()))
    assert len(opened.witnesses) >= 2
    return opened.checkpoint


async def role(session: aiohttp.ClientSession, node: RegistryNode) -> str | None:
    """'integrating' or 'following', once the process publishes cosigned checkpoints (None before)."""
    text = await node.health(session)
    if text is None:
        return None
    return "integrating" if "integrating" in text else "following"


async def test_a_witnessed_shared_registry_keeps_its_cosignatures_when_the_leading_process_is_killed(  # type: ignore[no-untyped-def]
        tmp_path, pg_dsn, seaweed, s3_path, aiohttp_server, monkeypatch) -> None:
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    urls, states = [], []
    for i, key in enumerate(WITNESS_KEYS):  # real witnesses on loopback, on the real clock
        states.append(WitnessState(str(tmp_path / f"witness{i}")))
        witness = Witness(signer=key, logs={REGISTRY_KEY.name: KnownLog(REGISTRY_KEY.name, VERIFIER, 86400)}, state=states[-1])
        server = await aiohttp_server(make_witness_app(witness), port=free_port())
        urls.append(str(server.make_url("")).rstrip("/"))
    (tmp_path / "policy").write_text(tlog_policy(urls))
    (tmp_path / "registry.key").write_text(REGISTRY_KEY.private_key + "\n")
    nodes = [RegistryNode(str(tmp_path / "registry.key"), pg_dsn, f"s3://{s3_path}/reg", seaweed.env, str(tmp_path / f"node{i}.log"))
             for i in range(2)]
    for node in nodes:
        node.args += ["--witness-policy", str(tmp_path / "policy")]
    alice = Ed25519Signer.generate("alice")
    bucket = ObjectStore(f"s3://{s3_path}/reg/log")
    published: dict[PackageRef, tuple[bytes, bytes]] = {}  # ref -> (module, tlog-proof)

    async def publish(api: RegistryClient, ref: PackageRef) -> None:
        module = with_custom_section(EMPTY_MODULE, len(published))
        proof = await api.publish(alice, ref, module)
        tp = parse_tlog_proof(proof)
        assert tp.extra is not None
        verify_tlog_proof(tp, hashlib.sha256(b"\x00" + tp.extra).digest(), VERIFIER)
        assert cosigned(tp.checkpoint).size > tp.index  # answered against a checkpoint the quorum cosigned
        published[ref] = (module, proof)

    async def status_verifies(api: RegistryClient, ref: PackageRef) -> bool:
        """The status proof this process serves verifies under a trust policy requiring the witnesses (503: not yet)."""
        module, proof = published[ref]
        try:
            status = await api.get(api.package_path(ref) + "/status-proof")
        except RegistryError as e:
            assert e.status == 503, e
            return False
        verified = verify_module(module=module, proof=proof, policy=TRUST, now=int(time.time()), status_proof=status)
        assert verified.status is not None
        return verified.status.as_of >= parse_tlog_proof(proof).index

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        try:
            for node in nodes:
                node.start()
            await wait_until(lambda: _roles(session, nodes, {"integrating", "following"}), "one process integrating, one following", 60)
            apis = [RegistryClient(node.url, session) for node in nodes]
            for i in range(4):  # through both processes
                await publish(apis[i % 2], PackageRef("acme", "lib", f"1.0.{i}"))
            for ref in published:
                for api in apis:  # every process serves status proofs that verify
                    await wait_until(lambda api=api, ref=ref: status_verifies(api, ref), f"{ref}'s status proof from {api.url}", 30)  # type: ignore[misc]
            before = cosigned(bucket.get("checkpoint")).size  # the bucket's checkpoint is the cosigned one

            roles = [await role(session, node) for node in nodes]
            assert sorted(roles) == ["following", "integrating"]  # type: ignore[type-var]
            leader, survivor = (nodes[0], nodes[1]) if roles[0] == "integrating" else (nodes[1], nodes[0])
            leader.kill()
            api = RegistryClient(survivor.url, session)
            for i in range(4, 6):  # answered only once the new integrator's checkpoint is cosigned
                await publish(api, PackageRef("acme", "lib", f"1.0.{i}"))
            assert await role(session, survivor) == "integrating"
            after = cosigned(bucket.get("checkpoint")).size
            assert after > before
            assert sum(state.latest(REGISTRY_KEY.name).size >= after for state in states) >= 2  # the witnesses moved on with it
            for ref in published:
                await wait_until(lambda ref=ref: status_verifies(api, ref), f"{ref}'s status proof from the survivor", 30)  # type: ignore[misc]
        finally:
            for node in nodes:
                node.kill()


async def _roles(session: aiohttp.ClientSession, nodes: list[RegistryNode], want: set[str]) -> bool:
    return {await role(session, node) for node in nodes} == want
