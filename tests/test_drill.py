"""`wasmlog drill`: the malicious-update incident on a real local network (registry, witnesses, monitor, an agent
process with Wasmtime workers), run as the command; and the drill failing, naming the step, when the agent's
profile is broken."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = ["publish-and-serve", "malicious-release", "detect", "agent-refuses", "respond", "recover", "forensics", "audit"]


def drill(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "wasmlog", "drill", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_the_drill_plays_every_step_and_each_behaves(tmp_path) -> None:
    data = tmp_path / "drill"
    done = drill("--json", "--data", str(data))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"steps", "time_to_detect_s", "time_to_recover_s"}
    steps = report["steps"]
    assert [s["name"] for s in steps] == STEPS
    assert all(s["ok"] is True and set(s) == {"name", "ok", "at", "detail"} for s in steps), steps
    ats = [s["at"] for s in steps]
    assert ats == sorted(ats) and ats[0] > 0
    assert report["time_to_detect_s"] > 0 and report["time_to_recover_s"] > 0
    by_name = {s["name"]: s["detail"] for s in steps}
    assert "reason capability" in by_name["agent-refuses"] and "wasi_snapshot_preview1.sock_accept" in by_name["agent-refuses"]
    assert "capability-escalation" in by_name["detect"] and "sbom-change" in by_name["detect"]
    assert "no findings" in by_name["audit"]
    assert "chain verified" in by_name["forensics"] and "admitted 1.0.0 -> quarantined 1.1.0 (capability) -> admitted 1.2.0" in by_name["forensics"]
    # What the drill left in --data says the same: the agent's state on disk serves 1.2.0 ...
    state = json.loads((data / "agent" / "agent-data" / "state.json").read_text())
    assert {k: state["modules"]["acme:hello"][k] for k in ("state", "version")} == {"state": "admitted", "version": "1.2.0"}
    # ... and only the two good releases' modules were ever stored by the agent (v1.1 never was).
    stored = sorted(p.name for p in (data / "agent" / "agent-data" / "modules" / "sha256").iterdir())
    assert len(stored) == 2 and state["modules"]["acme:hello"]["digest"] in stored


def test_the_drill_fails_naming_the_step_when_the_profile_grants_the_escalated_capability(tmp_path) -> None:
    done = drill("--grant-escalated", "--data", str(tmp_path / "drill"))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    failed = [line for line in lines if re.match(r" *\+[0-9.]+s  FAIL  ", line)]
    passed = [line for line in lines if re.match(r" *\+[0-9.]+s  ok    ", line)]
    assert len(failed) == 1 and len(passed) == 7, done.stdout
    assert "FAIL  4. agent-refuses: the agent's sweep did not refuse acme:hello@1.1.0" in failed[0]
    assert "'state': 'admitted'" in failed[0]  # what it saw instead
    assert lines[-1] == "drill FAILED: agent-refuses"


def test_the_drill_starts_only_from_an_empty_data_directory(tmp_path) -> None:
    (tmp_path / "old").write_text("x")
    done = drill("--data", str(tmp_path))
    assert done.returncode == 2 and "is not empty" in done.stderr
