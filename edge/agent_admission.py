"""Admission: fetch a release from the first source that serves it, verify it with the same code as
`wasmlog verify` (edge/verify.py, online facts as edge/verify_cli.py fetches them), then check its
logged imports against the module's profile. Nothing here instantiates a module.

Sources are untrusted; proofs are what count. A source whose answer does not verify is skipped for
the next one, and its failure says nothing about the release. Only a FINAL refusal, backed by data
that verified (the release was yanked or its key revoked, as any source proves: edge/agent_status.py;
its imports exceed the profile; the trust policy refuses its imports or its signer), ends the search
and may stop a module that is serving. An "ns:name" ref takes the newest release of the versions all
sources list together, and never one older than the release it was admitted at unless that one is
proven yanked or revoked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from edge.state import load_known, save_evidence, save_known
from edge.verify import (
    EVIDENCE_REASONS,
    KnownCheckpoint,
    TrustPolicy,
    Verified,
    VerifyError,
    verify_module,
)
from edge.verify_cli import online_facts, parse_proof, status_online
from registry.client import RegistryClient
from registry.record import PackageRef, RecordError, Release, check_version, decode_entry
from registry.sbom import MAX_SBOM_BYTES
from registry.wasm import MAX_MODULE_BYTES
from tlog.checkpoint import Checkpoint
from tlog.errors import MalformedError, TlogError
from tlog.proof_file import TlogProof

from .agent_config import ModuleConfig, ProfileConfig
from .agent_state import ADMITTED, REFUSED, ModuleStore
from .agent_status import SourceFailure, StatusRefresh, refresh_namespace_status, source_failure
from .sandbox import imports_granted

# Refusals backed by verified data (what the log, the trust policy and the profile say), not by what one
# source sent: no other source can change them, and only they stop a module that is serving.
FINAL_REASONS = frozenset({"capability", "yanked", "key-revoked", "import-not-allowed", "publisher-not-allowed", "no-release"})
GONE_REASONS = frozenset({"yanked", "key-revoked"})  # the release is proven withdrawn: an older one may take its place
# verify_module checks these before the signature and the proofs: final only once the rest of the release verifies.
POLICY_REASONS = frozenset({"import-not-allowed", "publisher-not-allowed"})
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=60)
MAX_PROOF_BYTES = 1 << 20  # a tlog-proof: the entry (at most 65,535 bytes) in base64, a proof and a note
MAX_VERSIONS = 10_000  # versions one source may list for a name
MAX_UNVERIFIED_VERSIONS = 16  # listed versions no source could verify, tried per decision before giving up for this round


def is_final(reason: str | None) -> bool:
    """Whether a refusal with this reason changes the state of a module that was admitted (see FINAL_REASONS)."""
    return reason in FINAL_REASONS


@dataclass(frozen=True)
class Decision:
    """The outcome of admitting one release (or resolving a "ns:name" ref to one)."""

    state: str  # admitted | refused
    reason: str | None = None
    message: str | None = None
    version: str | None = None
    digest: str | None = None
    log_index: int | None = None
    source: str | None = None
    tampered: tuple[str, ...] = ()  # stored modules found not to hash to their name (replaced by fetched bytes)
    evidence: tuple[str, ...] = field(default=())  # files of fork/inconsistency evidence written
    status_time: int | None = None  # the cosigned time of the status proof it was admitted with, if any


@dataclass
class Admission:
    """One admission round (the start, a sweep): the policy, the sources, the module store, the anti-rollback
    state; and what each source did wrong in this round (failures: the last per source) or right (answered)."""

    policy: TrustPolicy
    registries: Sequence[str]
    store: ModuleStore
    checkpoints: pathlib.Path
    now: int
    failures: dict[str, SourceFailure] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    _status: dict[str, asyncio.Task[StatusRefresh]] = field(default_factory=dict)  # namespace -> its refresh, once per round
    _verifying: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by a verification that may move the trusted checkpoint

    def _failed(self, failure: SourceFailure) -> None:
        self.failures[failure.url] = failure

    async def decide(self, session: aiohttp.ClientSession, module: ModuleConfig, profile: ProfileConfig,
                     admitted: str | None = None) -> Decision:
        """Admit module (pinned or the newest good release of its name) under profile, or say why not.
        admitted: for an "ns:name" ref, the version the node admitted (serving, or quarantined since): the
        decision never goes below it unless it is proven yanked or revoked."""
        if module.version is not None:
            return await self.release(session, PackageRef(module.namespace, module.name, module.version), profile)
        versions, failure = await self._versions(session, module.namespace, module.name)
        if admitted is not None:
            versions.add(admitted)
        if not versions:
            return failure or Decision(REFUSED, "not-found", f"{module.ref}: no source lists a release")
        withdrawn: Decision | None = None  # the admitted release, proven yanked or revoked
        unverified: Decision | None = None
        tries = 0
        for version in sorted(versions, key=semver_key, reverse=True):
            decision = await self.release(session, PackageRef(module.namespace, module.name, version), profile)
            if decision.state == ADMITTED or (is_final(decision.reason) and decision.reason not in GONE_REASONS):
                return decision
            if decision.reason in GONE_REASONS:
                withdrawn = decision if version == admitted else withdrawn
                continue
            if version == admitted:  # it cannot be checked now: it stays as it is, never replaced by an older one
                return decision
            unverified, tries = unverified or decision, tries + 1  # listed, but no source proves it: maybe a lie
            if tries >= MAX_UNVERIFIED_VERSIONS:
                break
        return withdrawn or unverified or Decision(REFUSED, "no-release", f"{module.ref}: every release is yanked or signed by a revoked key")

    async def _versions(self, session: aiohttp.ClientSession, ns: str, name: str) -> tuple[set[str], Decision | None]:
        """The versions every source lists, together (one hiding a version does not hide it); and the first
        source's failure, if any."""

        async def listed(url: str) -> tuple[set[str], Decision | None]:
            try:
                obj = await RegistryClient(url, session).get_json(f"/api/v1/packages/{ns}/{name}")
                versions = obj.get("versions") if type(obj) is dict else None
                if type(versions) is not list or len(versions) > MAX_VERSIONS:
                    raise MalformedError(f"versions is not a list of at most {MAX_VERSIONS}")
                try:
                    listed = {check_version(v) for v in versions}
                except RecordError as e:
                    raise MalformedError(f"the versions of {ns}:{name}: {e}") from None
                self.answered.add(url)
                return listed, None
            except Exception as e:  # noqa: BLE001 -- every failure is this source's: named; the others still count
                failure = source_failure(url, e)
                self._failed(failure)
                return set(), Decision(REFUSED, failure.reason, failure.message, source=url)

        answers = await asyncio.gather(*(listed(url) for url in self.registries))
        return set().union(*(v for v, _ in answers)), next((d for _, d in answers if d is not None), None)

    async def release(self, session: aiohttp.ClientSession, ref: PackageRef, profile: ProfileConfig) -> Decision:
        """The first source's answer that admits ref or refuses it for a final reason; else the first failure."""
        first: Decision | None = None
        for url in self.registries:
            try:
                decision = await self._from(session, url, ref, profile)
            except VerifyError as e:
                evidence: tuple[str, ...] = ()
                if e.reason in EVIDENCE_REASONS:
                    evidence = (str(await asyncio.to_thread(save_evidence, self.checkpoints, e.reason, str(e), e.evidence, self.now)),)
                decision = Decision(REFUSED, e.reason, f"{ref} from {url}: {e}", ref.version, source=url, evidence=evidence)
            except Exception as e:  # noqa: BLE001 -- a source's failure: named, then the next source
                failure = source_failure(url, e)
                decision = Decision(REFUSED, failure.reason, f"{ref} from {failure.message}", ref.version, source=url)
            if decision.state == ADMITTED or is_final(decision.reason):
                self.answered.add(url)
                return decision
            self._failed(SourceFailure(url, decision.reason or "registry-error", decision.message or ""))
            first = first or decision
        assert first is not None
        return first

    async def _from(self, session: aiohttp.ClientSession, url: str, ref: PackageRef, profile: ProfileConfig) -> Decision:
        api = RegistryClient(url, session)
        path = api.package_path(ref)
        tp = parse_proof(await api.get(path + "/tlog-proof", MAX_PROOF_BYTES))
        assert tp.parsed is not None
        try:
            body = decode_entry(tp.extra or b"").body
        except TlogError as e:
            raise VerifyError("entry-invalid", f"log entry: {e}") from None
        if not isinstance(body, Release):
            raise VerifyError("not-a-release", "the log entry is not a release")
        if body.ref != ref:  # before anything is judged on it: another release's refusal is not this one's
            raise VerifyError("entry-invalid", f"{url} answered for {ref} with the proof of {body.ref}")
        digest = body.module_sha256
        module = await asyncio.to_thread(self.store.get, digest)
        tampered: tuple[str, ...] = ()
        if module is None:
            tampered = (digest,) if self.store.path(digest).exists() else ()
            module = await api.get(path + "/module.wasm", MAX_MODULE_BYTES)
        sbom = await api.get(path + "/sbom", MAX_SBOM_BYTES) if body.sbom_sha256 is not None else None
        return await self._verify(url, ref, profile, tp, body, module, sbom, tampered)

    async def namespace_status(self, namespace: str) -> StatusRefresh:
        """The namespace's yanks and revocations as all sources prove them: refreshed once per round."""
        if namespace not in self._status:
            self._status[namespace] = asyncio.ensure_future(
                refresh_namespace_status(self.registries, namespace, self.policy, self.checkpoints, self.now))
        refresh = await asyncio.shield(self._status[namespace])
        for failure in refresh.failures:
            self._failed(failure)
        self.answered.update(refresh.answered)
        return refresh

    async def _status_proofs(self, urls: Sequence[str], ref: PackageRef, trusted: Checkpoint) -> list[tuple[bytes | None, list[bytes] | None]]:
        """The release's status proof (and the consistency proof it needs) from each of urls that serves one; a
        source that fails here is left out (its failure is named when it is tried itself)."""

        async def one(url: str) -> tuple[bytes | None, list[bytes] | None]:
            try:
                return await status_online(url, ref, None, trusted, self.policy, self.now)
            except Exception:  # noqa: BLE001 -- another source's: it proves nothing here
                return None, None

        return list(await asyncio.gather(*(one(u) for u in urls)))

    async def _verify(self, url: str, ref: PackageRef, profile: ProfileConfig, tp: TlogProof, body: Release, module: bytes,
                      sbom: bytes | None, tampered: tuple[str, ...]) -> Decision:
        """Verification against a proof whose checkpoint is the trusted one's size cannot move the trusted
        checkpoint (it is the same one, or a fork): those run side by side. Any other runs alone, from the
        trusted checkpoint as it is then, so the checkpoint only ever moves forward along one history."""
        assert tp.parsed is not None
        refresh = await self.namespace_status(ref.namespace)
        if refresh.status is None:
            unreachable = all(f.reason == "registry-unreachable" for f in refresh.failures)
            raise VerifyError("registry-unreachable" if unreachable else "registry-error",
                              f"no source gave the yanks and revocations of {ref.namespace}: "
                              + "; ".join(f.message for f in refresh.failures[:4]))
        known = await asyncio.to_thread(load_known, self.checkpoints, tp.parsed.origin)
        if known is not None and known.checkpoint.size == tp.parsed.size:
            return await self._verify_from(known, url, ref, profile, tp, body, module, sbom, tampered, refresh)
        async with self._verifying:
            known = await asyncio.to_thread(load_known, self.checkpoints, tp.parsed.origin)
            return await self._verify_from(known, url, ref, profile, tp, body, module, sbom, tampered, refresh)

    async def _verify_from(self, known: KnownCheckpoint | None, url: str, ref: PackageRef, profile: ProfileConfig, tp: TlogProof,
                           body: Release, module: bytes, sbom: bytes | None, tampered: tuple[str, ...], refresh: StatusRefresh) -> Decision:
        assert tp.parsed is not None
        digest = body.module_sha256
        known_size = None if known is None else known.checkpoint.size
        consistency = None
        if known_size not in (None, 0, tp.parsed.size):
            consistency, _ = await online_facts(url, known_size, tp.parsed.size, None, self.policy, self.now)
        # The release's status proof when this source serves one and the policy has witnesses to date it:
        # yanks and revocations proven as of an index root, on top of those every source proved (refresh);
        # and the consistency proof its checkpoint needs when newer than the trusted one. With require_status,
        # every other source's too: the freshest that verifies counts (status_as_of), whoever serves it.
        trusted = known.checkpoint if known is not None and known.checkpoint.size > tp.parsed.size else tp.parsed
        own = await status_online(url, ref, None, trusted, self.policy, self.now)  # its failure is this source's
        others = await self._status_proofs([u for u in self.registries if u != url], ref, trusted) if self.policy.require_status else []
        statuses = [s for s in (own, *others) if s[0] is not None] or [own]

        def verify(policy: TrustPolicy) -> Verified:
            """Against each status proof in turn: the freshest that verifies; a withdrawal, a policy refusal or a
            fork any of them proves, at once; none verifying, the first one's failure (this source's own)."""
            verified: list[Verified] = []
            failures: list[VerifyError] = []
            for status_proof, status_consistency in statuses:
                try:
                    verified.append(verify_module(module=module, proof=tp, policy=policy, now=self.now, sbom=sbom, known=known,
                                                  consistency=consistency, status=refresh.status, status_proof=status_proof,
                                                  status_consistency=status_consistency))
                except VerifyError as e:
                    if e.reason in GONE_REASONS | POLICY_REASONS | {"fork"}:
                        raise
                    failures.append(e)
            if not verified:
                raise failures[0]
            return max(verified, key=lambda v: -1 if v.status is None else v.status.time)

        def verify_and_store() -> Decision:
            try:
                verified = verify(self.policy)
            except VerifyError as e:
                if e.reason in POLICY_REASONS:  # judged before the proofs: final only if the rest verifies
                    verify(dataclasses.replace(self.policy, allowed_imports=None, namespace_keys={}))  # raises what is wrong
                raise
            if verified.known != known:
                save_known(self.checkpoints, verified.known)
            ungranted = imports_granted([(i.module, i.name) for i in body.imports], profile.imports)
            if ungranted:
                return Decision(REFUSED, "capability", f"{ref} imports what profile {profile.name} does not grant: {', '.join(ungranted[:10])}",
                                ref.version, verified.module_sha256, verified.index, url, tampered)
            if tampered or self.store.get(digest) is None:
                self.store.put(digest, module)
            return Decision(ADMITTED, None, None, ref.version, verified.module_sha256, verified.index, url, tampered,
                            status_time=None if verified.status is None else verified.status.time)

        return await asyncio.to_thread(verify_and_store)


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Semantic-version precedence, close enough to order releases: a release above its pre-releases."""
    core, _, pre = version.partition("-")
    try:
        major, minor, patch = (int(x) for x in core.split("."))
    except ValueError:
        return (-1, -1, -1, 0, version)
    return (major, minor, patch, 0 if pre else 1, pre)
