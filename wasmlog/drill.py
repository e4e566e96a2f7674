"""`wasmlog drill`: the malicious-update incident played end to end on a local network, every step checked.

The network is `wasmlog up`'s (registry and log, three witnesses, 2-of-3 quorum) on free loopback
ports, with a namespace monitor following the log and one edge agent as a real process. The owner
of namespace acme holds an owner key and grants a CI key that publishes; the attacker steals the CI
key. Each step checks what the parts did (not only that a command ran) and reports what it saw; a
step that misbehaves is reported as such and the drill goes on with the next. Times are monotonic
seconds since the drill started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import pathlib
import time
from typing import Any

import aiohttp

from registry.audit import Event, make_auditor
from registry.audit_state import AuditState
from registry.client import RegistryClient, RegistryError
from registry.record import Action, PackageRef
from registry.sbom import CYCLONEDX
from registry.trust_policy import parse_trust_policy
from tlog.note import Ed25519Signer
from tlog.proof_file import parse_tlog_proof

from .drill_parts import (
    ESCALATED_IMPORT,
    EVIL_COMPONENT,
    GRANTED_IMPORT,
    AgentProcess,
    Monitor,
    hello_module,
    hello_sbom,
    network,
)
from .drill_steps import Report, Step, StepFailed, edge_decision, expect, module_entry, telemetry_replay

NS, NAME = "acme", "hello"
V1, V11, V12, V13 = "1.0.0", "1.1.0", "1.2.0", "1.3.0"
DETECT_TIMEOUT = 30.0  # seconds the monitor has to report the malicious release
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=60)


def ref(version: str) -> PackageRef:
    return PackageRef(NS, NAME, version)


def index_of(proof: bytes) -> int:
    return parse_tlog_proof(proof).index


class Drill:
    """The scenario's actors and what they have done so far; play() runs the eight steps in order."""

    def __init__(self, data: pathlib.Path, registry: str, collector: str, session: aiohttp.ClientSession, *, grant_escalated: bool) -> None:
        self.data = data
        self.registry = registry
        self.collector = collector
        self.session = session
        self.api = RegistryClient(registry, session)
        self.trust_policy = data / "network" / "trust-policy.toml"  # written by the network
        self.policy = parse_trust_policy(self.trust_policy.read_text())
        self.verifiers = [log.verifier for log in self.policy.tlog.logs]
        self.grant_escalated = grant_escalated
        self.owner = Ed25519Signer.generate("acme-owner")
        self.ci = Ed25519Signer.generate("acme-ci")  # the publisher's key, stolen by the attacker
        self.ci2 = Ed25519Signer.generate("acme-ci-2")  # its successor
        self.modules = {V1: hello_module(V1), V11: hello_module(V11, escalate=True), V12: hello_module(V12),
                        V13: hello_module(V13, escalate=True)}
        self.sboms = {V1: hello_sbom(V1), V11: hello_sbom(V11, evil=True), V12: hello_sbom(V12), V13: hello_sbom(V13, evil=True)}
        self.index: dict[str, int] = {}  # the incident's records: what -> log index
        self.observed: list[tuple[str, str | None, str | None]] = []  # the agent's (state, version, reason) as steps 1, 4, 6 saw it
        self.agent = AgentProcess(self._agent_config())
        self.monitor = Monitor(session, registry, self.verifiers, NS, frozenset({self.owner.vkey, self.ci.vkey}))
        self.started = time.monotonic()
        self.wall_start = time.time()
        self.t_attack = self.t_detect = self.t_recover = 0.0

    def _agent_config(self) -> pathlib.Path:
        d = self.data / "agent"
        d.mkdir(parents=True, exist_ok=True)
        imports = [GRANTED_IMPORT] + ([ESCALATED_IMPORT] if self.grant_escalated else [])
        q = json.dumps  # a JSON string or list of strings is a TOML one
        (d / "agent.toml").write_text(
            f"trust_policy = {q(str(self.trust_policy))}\nregistries = {q([self.registry])}\ndata = \"agent-data\"\n"
            f"listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nsweep_interval = 3600\ntelemetry = {q([self.collector])}\n\n"
            f"[profiles.hello]\nimports = {q(imports)}\nmemory_mb = 16\ntimeout_ms = 2000\n\n"
            f"[[modules]]\nref = {q(f'{NS}:{NAME}')}\nprofile = \"hello\"\n")
        return d / "agent.toml"

    async def play(self) -> Report:
        steps: list[Step] = []
        follower = asyncio.create_task(self.monitor.follow())
        try:
            for name, step in (("publish-and-serve", self.publish_and_serve), ("malicious-release", self.malicious_release),
                               ("detect", self.detect), ("agent-refuses", self.agent_refuses), ("respond", self.respond),
                               ("recover", self.recover), ("forensics", self.forensics), ("audit", self.audit)):
                try:
                    detail, ok = await step(), True
                except StepFailed as e:
                    detail, ok = str(e), False
                except Exception as e:  # noqa: BLE001 -- anything that stops a step is that step's failure, named
                    detail, ok = f"{type(e).__name__}: {e}", False
                steps.append(Step(name, ok, self._since(time.monotonic()), detail))
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self.agent.stop()
        detect = round(self.t_detect - self.t_attack, 3) if self.t_detect else None
        recover = round(self.t_recover - self.t_detect, 3) if self.t_recover and self.t_detect else None
        return Report(steps, detect, recover)

    def _observe(self, m: dict[str, Any] | None) -> dict[str, Any] | None:
        """Note the agent's state of the module (a change of it), for step 7 to find in the telemetry."""
        if m is not None and (not self.observed or self.observed[-1] != (m["state"], m["version"], m["reason"])):
            self.observed.append((m["state"], m["version"], m["reason"]))
        return m

    def _since(self, t: float) -> float:
        return round(t - self.started, 3)

    async def _publish(self, signer: Ed25519Signer, version: str) -> int:
        proof = await self.api.publish(signer, ref(version), self.modules[version], self.sboms[version], CYCLONEDX)
        return index_of(proof)

    async def _act(self, action: Action) -> int:
        return index_of(await self.api.act(self.owner, action))

    async def _agent(self, method: str, path: str) -> tuple[int, bytes]:
        """A request to the agent: /run/... on its module listener, the rest on its admin listener."""
        base = self.agent.url if path.startswith("/run/") else self.agent.admin
        async with self.session.request(method, base + path) as r:
            return r.status, await r.read()

    async def _sweep(self) -> dict[str, Any]:
        status, body = await self._agent("POST", "/sweep")
        expect(status == 200, f"POST /sweep answered {status}: {body[:200]!r}")
        return json.loads(body)  # type: ignore[no-any-return]

    # 1
    async def publish_and_serve(self) -> str:
        now = int(time.time())
        self.index["owner claims acme"] = await self._act(Action("key-grant", NS, key=self.owner.vkey, issued=now))
        self.index["owner grants acme-ci"] = await self._act(Action("key-grant", NS, key=self.ci.vkey, issued=now))
        self.index["v1 released"] = await self._publish(self.ci, V1)
        await self.agent.start()
        status, body = await self._agent("GET", "/status")
        m = module_entry(status, body, f"{NS}:{NAME}")
        self._observe(m)
        expect(m["state"] == "admitted" and m["version"] == V1 and m["digest"] == _sha256(self.modules[V1]),
               f"the agent did not admit {ref(V1)}: {m}")
        status, body = await self._agent("GET", f"/run/{NS}/{NAME}")
        expect((status, body) == (200, f"hello from {V1}\n".encode()), f"GET /run/{NS}/{NAME} answered {status}: {body[:200]!r}")
        return (f"{ref(V1)} (index {self.index['v1 released']}, imports {GRANTED_IMPORT}, signed by acme-ci) admitted by the "
                f"agent (profile grants {GRANTED_IMPORT}) and served: 200 {body.decode().strip()!r}")

    # 2
    async def malicious_release(self) -> str:
        self.t_attack = time.monotonic()
        index = self.index["v1.1 released by the attacker"] = await self._publish(self.ci, V11)
        meta = await self.api.get_json(self.api.package_path(ref(V11)))
        imports = sorted(f"{i['module']}.{i['name']}" for i in meta["imports"])
        expect(meta["index"] == index and meta["signer"] == self.ci.vkey and ESCALATED_IMPORT in imports,
               f"the registry's record of {ref(V11)} is not the attacker's release: {meta}")
        return (f"with the stolen key acme-ci the attacker released {ref(V11)} at index {index}: imports {', '.join(imports)} "
                f"(adds {ESCALATED_IMPORT}), SBOM adds {EVIL_COMPONENT}")

    # 3
    async def detect(self) -> str:
        index = self.index["v1.1 released by the attacker"]

        def events() -> dict[str, tuple[float, Event]]:
            return {e.kind: (t, e) for t, e in self.monitor.events if e.index == index}

        found = await self.monitor.until(lambda: {"capability-escalation", "sbom-change"} <= events().keys(), DETECT_TIMEOUT)
        expect(found, f"within {DETECT_TIMEOUT:.0f} s the monitor reported only {sorted(events())} for index {index} "
                      f"(errors: {self.monitor.errors[-3:]}, findings: {[f.as_json() for f in self.monitor.auditor.findings]})")
        (t1, escalation), (t2, change) = events()["capability-escalation"], events()["sbom-change"]
        added = change.detail["components"]["added"]
        expect(escalation.detail["added_imports"] == [ESCALATED_IMPORT], f"the escalation names {escalation.detail['added_imports']}")
        expect(EVIL_COMPONENT in added, f"the SBOM change adds {added}, not {EVIL_COMPONENT}")
        self.t_detect = max(t1, t2)
        signer = "no unexpected-key event: the stolen key is one the owner expects" if "unexpected-key" not in events() \
            else "and an unexpected-key event"
        return (f"the monitor reported {ref(V11)} {self.t_detect - self.t_attack:.2f} s after the attacker's publish: "
                f"capability-escalation (+{ESCALATED_IMPORT}) and sbom-change (+{', '.join(added)}); {signer}")

    # 4
    async def agent_refuses(self) -> str:
        sweep = await self._sweep()
        m = self._observe(next((m for m in sweep["modules"] if m["ref"] == f"{NS}:{NAME}"), None))
        expect(m is not None and m["version"] == V11 and m["reason"] == "capability" and m["state"] in ("quarantined", "refused"),
               f"the agent's sweep did not refuse {ref(V11)} for its capability: {m}")
        assert m is not None
        expect(ESCALATED_IMPORT in m["message"], f"the refusal does not name {ESCALATED_IMPORT}: {m['message']}")
        digest = _sha256(self.modules[V11])
        data = self.agent.config.parent / "agent-data"
        expect(not (data / "modules" / "sha256" / digest).exists(), f"the agent stored {ref(V11)}'s module")
        compiled = sorted(p.name for p in (data / "artifacts").glob(f"{digest}.*")) if (data / "artifacts").exists() else []
        expect(not compiled, f"the agent compiled {ref(V11)}: {compiled}")
        status, body = await self._agent("GET", f"/run/{NS}/{NAME}")
        expect(status == 403, f"GET /run/{NS}/{NAME} answered {status} after the refusal: {body[:200]!r}")
        return (f"the sweep {m['state']} {NS}:{NAME} at {ref(V11)}, reason capability ({m['message']}); its module was never "
                f"stored, compiled or linked; /run answers 403 until a good release (the node fails closed)")

    # 5
    async def respond(self) -> str:
        now = int(time.time())
        self.index["owner grants acme-ci-2"] = await self._act(Action("key-grant", NS, key=self.ci2.vkey, issued=now))
        self.index["owner revokes acme-ci"] = await self._act(Action("key-revocation", NS, key=self.ci.vkey, issued=now))
        self.monitor.auditor.expected_keys = frozenset({self.owner.vkey, self.ci2.vkey})
        self.index["owner yanks v1.1"] = await self._act(
            Action("yank", NS, name=NAME, version=V11, issued=now, reason="released with a stolen key: capability escalation"))
        self.index["v1.2 released"] = await self._publish(self.ci2, V12)
        try:
            await self._publish(self.ci, V13)
        except RegistryError as e:
            expect(e.status == 403 and "revoked" in str(e), f"the attacker's release after the revocation was refused, but not "
                                                            f"for the revocation: {e}")
            refused = str(e)
        else:
            raise StepFailed(f"the registry accepted {ref(V13)} signed by the revoked key acme-ci")
        return ("; ".join(f"{what} at index {self.index[what]}" for what in
                          ("owner grants acme-ci-2", "owner revokes acme-ci", "owner yanks v1.1", "v1.2 released"))
                + f"; the attacker's {ref(V13)} with the revoked key was refused ({refused})")

    # 6
    async def recover(self) -> str:
        sweep = await self._sweep()
        m = self._observe(next((m for m in sweep["modules"] if m["ref"] == f"{NS}:{NAME}"), None))
        expect(m is not None and m["state"] == "admitted" and m["version"] == V12 and m["digest"] == _sha256(self.modules[V12]),
               f"the agent's sweep did not move to {ref(V12)}: {m}")
        assert m is not None
        size = sweep["checkpoint"].get("size", 0)
        expect(size > self.index["v1.2 released"], f"the agent's trusted checkpoint (size {size}) does not cover the revocation and the yank")
        status, body = await self._agent("GET", f"/run/{NS}/{NAME}")
        expect((status, body) == (200, f"hello from {V12}\n".encode()), f"GET /run/{NS}/{NAME} answered {status}: {body[:200]!r}")
        self.t_recover = time.monotonic()
        reasons = {v: await edge_decision(self.api, self.policy, ref(v)) for v in (V1, V11, V12)}
        expect(reasons == {V1: "ok", V11: "yanked", V12: "ok"}, f"an edge verifier decides {reasons} (want v1.1 yanked, the rest ok)")
        return (f"the sweep (checkpoint size {size}, past the revocation and the yank) moved {NS}:{NAME} from {m['previous']} to "
                f"{ref(V12)} (signed by acme-ci-2), served: 200 {body.decode().strip()!r}; "
                f"verified as the agent does, v1.1 is now refused (yanked), and the revoked key signed nothing after its "
                f"revocation (the registry refused it)")

    # 7
    async def forensics(self) -> str:
        replay = await telemetry_replay(self.session, self.agent.admin, self.collector, self.wall_start, time.time())
        moves = replay.module_moves(f"{NS}:{NAME}")
        expect(moves == self.observed, f"the agent's telemetry tells {moves}, the drill saw {self.observed}")
        covered = max((e.seq for e in replay.window if e.attr("wasmlog.module.ref") == f"{NS}:{NAME}"), default=0)
        expect(covered <= replay.signed_through, f"events up to seq {covered}, signed only through {replay.signed_through}")
        expect(replay.checkpoint_size() > self.index["owner yanks v1.1"],
               f"the agent's events advance its checkpoint only to size {replay.checkpoint_size()}, short of the revocation and the yank")
        d1, d2, d3 = [await self.api.release_diff(ref(a), ref(b)) for a, b in ((V1, V11), (V11, V12), (V1, V12))]
        expect(d1["imports"] == {"added": [ESCALATED_IMPORT], "removed": []} and list(d1["components"]["added"]) == [EVIL_COMPONENT],
               f"{V1} -> {V11}: {d1['imports']}, components {d1['components']}")
        expect(d2["imports"] == {"added": [], "removed": [ESCALATED_IMPORT]} and list(d2["components"]["removed"]) == [EVIL_COMPONENT],
               f"{V11} -> {V12}: {d2['imports']}, components {d2['components']}")
        expect(d3["imports"] == {"added": [], "removed": []} and not d3["components"]["added"] and not d3["components"]["removed"],
               f"{V1} -> {V12} is not clean: {d3['imports']}, components {d3['components']}")
        story = " -> ".join(f"{state} {version}" + (f" ({reason})" if reason else "") for state, version, reason in moves)
        return (f"telemetry from the collector: {replay.events} events of node {replay.node[:8]}, chain verified and signed through "
                f"seq {replay.signed_through} by the node's key; in the window {len(replay.window)} events: {NS}:{NAME} {story}, "
                f"{replay.refused_requests(f'{NS}:{NAME}')} requests refused, checkpoint advanced to size {replay.checkpoint_size()} "
                f"(past the revocation and the yank); "
                f"diffs: {V1} -> {V11} adds import {ESCALATED_IMPORT} and component {EVIL_COMPONENT}; "
                f"{V11} -> {V12} removes both; {V1} -> {V12} adds no import and no component")

    # 8
    async def audit(self) -> str:
        events: list[Event] = []
        auditor = make_auditor(log_url=self.registry + "/log", session=self.session, verifiers=self.verifiers, state=AuditState(),
                               registry_url=self.registry, namespaces=frozenset({NS}), on_event=events.append)
        await auditor.run()
        report = auditor.report(self.registry + "/log")
        expect(not report["findings"], f"the audit found {report['findings']}")
        kinds: dict[int, str] = {}
        for e in events:
            kinds.setdefault(e.index, e.kind)  # the record's own event comes first
        missing = [f"{what} (index {i})" for what, i in self.index.items() if i not in kinds]
        expect(not missing, f"the audit's replay does not show {missing}")
        ns = auditor.state.registry.namespaces[NS]
        yanked, revoked = ns.releases[f"{NAME}@{V11}"].yanked_at, ns.revoked.get(self.ci.vkey)
        expect(yanked == self.index["owner yanks v1.1"] and revoked == self.index["owner revokes acme-ci"]
               and ns.keys == {self.owner.vkey, self.ci2.vkey}, f"the replayed namespace: yank at {yanked}, revocation at {revoked}")
        late = [k for k, r in ns.releases.items() if r.signer == self.ci.vkey and revoked is not None and r.index > revoked]
        expect(not late, f"releases signed by acme-ci after its revocation: {late}")
        timeline = ", ".join(f"{i} {kinds[i]} ({what})" for what, i in sorted(self.index.items(), key=lambda x: x[1]))
        return (f"audit of {report['tree_size']} entries ({report['blobs_checked']} modules and SBOMs re-checked): no findings; "
                f"the incident's records: {timeline}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run_drill(data: pathlib.Path, *, grant_escalated: bool = False) -> Report:
    """Play the drill with everything under data (network/, agent/); return its report."""
    async with network(data / "network") as (registry, collector), aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        return await Drill(data, registry, collector, session, grant_escalated=grant_escalated).play()
