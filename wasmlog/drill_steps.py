"""The checks `wasmlog drill`'s steps share: a failed expectation, the agent's view of a module, the
edge decision on a release, and the telemetry replay of step 7."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from edge.verify import TrustPolicy, VerifyError, verify_module
from edge.verify_cli import online_facts
from registry.client import RegistryClient
from registry.record import PackageRef
from tlog.proof_file import parse_tlog_proof

# Step 7's telemetry part, until the agent has telemetry: said in the step's detail, not counted as a failure.
TELEMETRY_NOT_AVAILABLE = "telemetry replay: not available (this build of the agent records no telemetry)"


class StepFailed(Exception):
    """A drill step that did not behave: the message says what was seen instead."""


def expect(condition: bool, otherwise: str) -> None:
    """Raise StepFailed(otherwise) unless condition holds."""
    if not condition:
        raise StepFailed(otherwise)


def module_entry(status: int, body: bytes, ref: str) -> dict[str, Any]:
    """The module ref in the agent's GET /status answer (status and body)."""
    expect(status == 200, f"the agent's /status answered {status}: {body[:200]!r}")
    m = next((m for m in json.loads(body)["modules"] if m["ref"] == ref), None)
    expect(m is not None, f"the agent's /status has no module {ref}")
    assert m is not None
    return m  # type: ignore[no-any-return]


async def edge_decision(api: RegistryClient, policy: TrustPolicy, ref: PackageRef) -> str:
    """What an edge verifier that follows the registry decides on ref now: "ok" or the reason code
    (the agent's admission check: the release's proof, module and SBOM, and the namespace's yanks and
    revocations fetched online)."""
    path = api.package_path(ref)
    tp = parse_tlog_proof(await api.get(path + "/tlog-proof"))
    meta = await api.get_json(path)
    sbom = await api.get(path + "/sbom") if meta["sbom"] else None
    now = int(time.time())
    assert tp.parsed is not None
    try:
        _, status = await online_facts(api.url, None, tp.parsed.size, ref.namespace, policy, now)
        verify_module(module=await api.get(path + "/module.wasm"), proof=tp, policy=policy, now=now, sbom=sbom, status=status)
    except VerifyError as e:
        return e.reason
    return "ok"


async def telemetry_replay(agent_dir: pathlib.Path, since: float, until: float) -> str:
    """Step 7's replay of the agent's telemetry between since and until (POSIX seconds) and the check of
    its chain. The agent of this build records none: TELEMETRY_NOT_AVAILABLE, a documented gap."""
    del agent_dir, since, until
    return TELEMETRY_NOT_AVAILABLE
