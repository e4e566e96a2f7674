"""Admission: fetch a release from the first source that serves it, verify it with the same code as
`wasmlog verify` (registry/verify.py, online facts as registry/verify_cli.py fetches them), then
check its logged imports against the module's profile. Nothing here instantiates a module.

Sources are untrusted: a source whose answer does not verify is skipped for the next one. A
refusal backed by signed facts (the release was yanked, its key revoked, its imports exceed the
profile, the trust policy does not allow it) is the same from every source: it ends the search.
"""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from edge.state import load_known, save_evidence, save_known
from edge.verify import (
    EVIDENCE_REASONS,
    KnownCheckpoint,
    NamespaceStatus,
    TrustPolicy,
    VerifyError,
    verify_module,
)
from edge.verify_cli import online_facts, parse_proof, status_proof_of
from registry.client import RegistryClient, RegistryError
from registry.record import PackageRef, Release, decode_entry
from registry.sbom import MAX_SBOM_BYTES
from registry.wasm import MAX_MODULE_BYTES
from tlog.client import UNREACHABLE, failure_kind
from tlog.errors import TlogError
from tlog.policy import NONE
from tlog.proof_file import TlogProof

from .agent_config import ModuleConfig, ProfileConfig
from .agent_state import ADMITTED, REFUSED, ModuleStore
from .sandbox import imports_granted

# Refusals backed by what the log and the policy say, not by what one source sent: no other source can change them.
FINAL_REASONS = frozenset({"capability", "yanked", "key-revoked", "import-not-allowed", "publisher-not-allowed", "not-a-release"})
# Failures that say nothing about the release: a previously admitted module keeps serving.
UNAVAILABLE_REASONS = frozenset({"registry-unreachable", "registry-error", "not-found", "no-release"})
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=60)
MAX_PROOF_BYTES = 1 << 20  # a tlog-proof: the entry (at most 65,535 bytes) in base64, a proof and a note


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


@dataclass
class Admission:
    """What admission works with: the policy, the sources, the module store, the anti-rollback state."""

    policy: TrustPolicy
    registries: Sequence[str]
    store: ModuleStore
    checkpoints: pathlib.Path
    now: int
    _status: dict[tuple[str, str], NamespaceStatus] = field(default_factory=dict)  # (source, namespace): its yanks and revocations
    _verifying: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by a verification that may move the trusted checkpoint

    async def decide(self, session: aiohttp.ClientSession, module: ModuleConfig, profile: ProfileConfig) -> Decision:
        """Admit module (pinned or the newest good release of its name) under profile, or say why not."""
        if module.version is not None:
            return await self.release(session, PackageRef(module.namespace, module.name, module.version), profile)
        versions, failure = await self._versions(session, module.namespace, module.name)
        if failure is not None:
            return failure
        last: Decision | None = None
        for version in sorted(versions, key=semver_key, reverse=True):
            last = await self.release(session, PackageRef(module.namespace, module.name, version), profile)
            if last.reason not in ("yanked", "key-revoked"):
                return last
        return Decision(REFUSED, "no-release", f"{module.ref}: every release is yanked or signed by a revoked key"
                        if last is not None else f"{module.ref}: no release")

    async def _versions(self, session: aiohttp.ClientSession, ns: str, name: str) -> tuple[list[str], Decision | None]:
        first: Decision | None = None
        for url in self.registries:
            try:
                obj = await RegistryClient(url, session).get_json(f"/api/v1/packages/{ns}/{name}")
                versions = obj["versions"]
                if type(versions) is not list or not all(type(v) is str for v in versions):
                    raise TypeError("versions is not a list of strings")
                return versions, None
            except Exception as e:  # noqa: BLE001 -- every failure is this source's: named, then the next source
                first = first or _source_failure(url, e)
        assert first is not None
        return [], first

    async def release(self, session: aiohttp.ClientSession, ref: PackageRef, profile: ProfileConfig) -> Decision:
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
                decision = _source_failure(url, e, ref)
            if decision.state == ADMITTED or decision.reason in FINAL_REASONS:
                return decision
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
        digest = body.module_sha256
        module = await asyncio.to_thread(self.store.get, digest)
        tampered: tuple[str, ...] = ()
        if module is None:
            tampered = (digest,) if self.store.path(digest).exists() else ()
            module = await api.get(path + "/module.wasm", MAX_MODULE_BYTES)
        sbom = await api.get(path + "/sbom", MAX_SBOM_BYTES) if body.sbom_sha256 is not None else None
        return await self._verify(url, ref, profile, tp, body, module, sbom, tampered)

    async def _verify(self, url: str, ref: PackageRef, profile: ProfileConfig, tp: TlogProof, body: Release, module: bytes,
                      sbom: bytes | None, tampered: tuple[str, ...]) -> Decision:
        """Verification against a proof whose checkpoint is the trusted one's size cannot move the trusted
        checkpoint (it is the same one, or a fork): those run side by side. Any other runs alone, from the
        trusted checkpoint as it is then, so the checkpoint only ever moves forward along one history."""
        assert tp.parsed is not None
        known = await asyncio.to_thread(load_known, self.checkpoints, tp.parsed.origin)
        if known is not None and known.checkpoint.size == tp.parsed.size:
            return await self._verify_from(known, url, ref, profile, tp, body, module, sbom, tampered)
        async with self._verifying:
            known = await asyncio.to_thread(load_known, self.checkpoints, tp.parsed.origin)
            return await self._verify_from(known, url, ref, profile, tp, body, module, sbom, tampered)

    async def _verify_from(self, known: KnownCheckpoint | None, url: str, ref: PackageRef, profile: ProfileConfig, tp: TlogProof,
                           body: Release, module: bytes, sbom: bytes | None, tampered: tuple[str, ...]) -> Decision:
        assert tp.parsed is not None
        digest = body.module_sha256
        known_size = None if known is None else known.checkpoint.size
        # Yanks and revocations from the release's status proof when the registry serves one and the
        # policy has witnesses to date it (without, the namespace's actions list, as before).
        status_proof = None if self.policy.tlog.quorum == NONE else await status_proof_of(url, ref)
        status = self._status.get((url, ref.namespace))
        consistency = None
        if status is None or known_size not in (None, 0, tp.parsed.size):  # the namespace's actions once per admission round
            namespace = None if status is not None or status_proof is not None else ref.namespace
            consistency, fetched = await online_facts(url, known_size, tp.parsed.size, namespace, self.policy, self.now)
            status = self._status.setdefault((url, ref.namespace), fetched) if fetched is not None else status

        def verify_and_store() -> Decision:
            verified = verify_module(module=module, proof=tp, policy=self.policy, now=self.now, sbom=sbom, known=known,
                                     consistency=consistency, status=status, status_proof=status_proof)
            if verified.ref != ref:
                raise VerifyError("entry-invalid", f"{url} answered for {ref} with the proof of {verified.ref}")
            if verified.known != known:
                save_known(self.checkpoints, verified.known)
            ungranted = imports_granted([(i.module, i.name) for i in body.imports], profile.imports)
            if ungranted:
                return Decision(REFUSED, "capability", f"{ref} imports what profile {profile.name} does not grant: {', '.join(ungranted[:10])}",
                                ref.version, verified.module_sha256, verified.index, url, tampered)
            if tampered or self.store.get(digest) is None:
                self.store.put(digest, module)
            return Decision(ADMITTED, None, None, ref.version, verified.module_sha256, verified.index, url, tampered)

        return await asyncio.to_thread(verify_and_store)


def _source_failure(url: str, e: Exception, ref: PackageRef | None = None) -> Decision:
    what = f"{ref} from {url}" if ref is not None else url
    if isinstance(e, RegistryError) and e.status == 404:
        return Decision(REFUSED, "not-found", f"{what}: {e}", None if ref is None else ref.version, source=url)
    reason = "registry-unreachable" if failure_kind(e) == UNREACHABLE else "registry-error"
    return Decision(REFUSED, reason, f"{what}: {e!r}", None if ref is None else ref.version, source=url)


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Semantic-version precedence, close enough to order releases: a release above its pre-releases."""
    core, _, pre = version.partition("-")
    try:
        major, minor, patch = (int(x) for x in core.split("."))
    except ValueError:
        return (-1, -1, -1, 0, version)
    return (major, minor, patch, 0 if pre else 1, pre)
