"""The audit state file (registry/audit_state.py): plain versioned JSON, strict on load, resumable.

A real registry on loopback is audited, its state saved and loaded back; broken state files
(corrupt, unknown version, the old pickle) are refused with a clear error, and the CLI exits 2.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import pickle
import subprocess
import sys

import pytest
from registry_helpers import CYCLONEDX, REGISTRY_KEY, start_registry, wat_module

from registry.audit import make_auditor
from registry.audit_state import (
    FILE_NAME,
    LEGACY_FILE_NAME,
    VERSION,
    AuditState,
    AuditStateError,
    encode_state,
)
from registry.record import Action, parse_package_ref
from tlog.note import Ed25519Signer, Ed25519Verifier

VERIFIER = Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")
CAROL = Ed25519Signer.generate("carol")


async def audit(client, state: AuditState):  # type: ignore[no-untyped-def]
    auditor = make_auditor(log_url=str(client.make_url("/log")), session=client.session, verifiers=[VERIFIER], state=state,
                           registry_url=str(client.make_url("")))
    await auditor.run()
    return auditor.report("x")


async def test_state_round_trips_through_json_and_the_audit_resumes(aiohttp_client, tmp_path: pathlib.Path) -> None:
    api, client, registry, _ = await start_registry(aiohttp_client, tmp_path)
    base = wat_module("imports_all_kinds", tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), base, CYCLONEDX, "application/vnd.cyclonedx+json")
    await api.publish(ALICE, parse_package_ref("acme:hello@1.1.0"), wat_module("no_imports", tmp_path))
    await api.act(ALICE, Action("key-grant", "acme", key=BOB.vkey, issued=1))
    await api.act(ALICE, Action("key-grant", "acme", key=CAROL.vkey, issued=2))
    await api.act(ALICE, Action("key-revocation", "acme", key=CAROL.vkey, issued=3))
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=4, reason="CVE"))
    state = AuditState()
    first = await audit(client, state)
    assert first["findings"] == [] and first["tree_size"] == 14  # each record closed by its index root
    state.save(tmp_path / "st")

    saved = json.loads((tmp_path / "st" / FILE_NAME).read_text())
    assert saved["format"] == "wasmlog-audit-state" and saved["version"] == VERSION == 1
    acme = saved["namespaces"]["acme"]
    assert sorted(acme["keys"]) == sorted([ALICE.vkey, BOB.vkey]) and list(acme["revoked"]) == [CAROL.vkey]
    assert acme["releases"]["hello@1.0.0"]["yanked_at"] == 12 and acme["releases"]["hello@1.1.0"]["yanked_at"] is None
    assert saved["previous"] == {"acme:hello": "1.1.0"} and saved["follow"]["size"] == 14

    loaded = AuditState.load(tmp_path / "st")
    assert loaded == state  # every field, down to each release's imports and SBOM digest
    hello = loaded.registry.namespaces["acme"].releases["hello@1.0.0"].release
    assert hello.sbom_media_type == "application/vnd.cyclonedx+json" and len(hello.imports) > 0

    await asyncio.gather(*(api.publish(BOB, parse_package_ref(f"acme:hello@2.0.{i}"), base) for i in range(3)))
    second = await audit(client, loaded)
    assert second["findings"] == [] and second["tree_size"] == registry.log.published.checkpoint.size and second["blobs_checked"] == 3  # only the new ones
    assert second["releases"] == 5


def write_state(directory: pathlib.Path, data: bytes, name: str = FILE_NAME) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)
    return directory


class _RunsCode:
    """Unpickling this creates a marker file: proof that a pickle ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def _encode(state: AuditState) -> bytes:
    return encode_state(state)


BROKEN = {
    "not JSON": (b"\x00\x01 garbage", "not valid JSON"),
    "truncated": (_encode(AuditState())[:-3], "not valid JSON"),
    "duplicate key": (b'{"format": "wasmlog-audit-state", "format": "x", "version": 1}', "duplicate JSON key"),
    "another format": (b'{"format": "something-else", "version": 1}', "not a wasmlog-audit-state file"),
    "a JSON list": (b"[1, 2]", "not a wasmlog-audit-state file"),
    "version 2": (_encode(AuditState()).replace(b'"version": 1', b'"version": 2'), "version 2 is not 1"),
    "no version": (_encode(AuditState()).replace(b'"version": 1', b'"versio": 1'), "version None is not 1"),
    "extra field": (_encode(AuditState()).replace(b'"previous": {}', b'"previous": {}, "x": 1'), "exactly the fields"),
    "compact of the wrong length": (
        _encode(AuditState()).replace(b'"compact": []', b'"compact": ["' + b"A" * 43 + b'="]'), "compact range of size 0"),
    "negative size": (_encode(AuditState()).replace(b'"size": 0', b'"size": -1'), "follow state"),
    "size without checkpoint": (
        _encode(AuditState()).replace(b'"compact": []', b'"compact": ["' + b"A" * 43 + b'="]').replace(b'"size": 0', b'"size": 1'),
        "without the checkpoint"),
    "a pickle under the JSON name": (pickle.dumps((2, "anything")), "not valid JSON"),
    "an index history past the index's size": (
        _encode(AuditState()).replace(b'"histories": {}', b'"histories": {"acme": [[0, 1]]}'), "index: the history of 'acme'"),
    "an index with an extra field": (_encode(AuditState()).replace(b'"histories": {}', b'"histories": {}, "root": 1'), "index must have"),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_broken_state_files_are_refused_with_what_is_wrong(tmp_path: pathlib.Path, case: str) -> None:
    data, want = BROKEN[case]
    with pytest.raises(AuditStateError) as e:
        AuditState.load(write_state(tmp_path / "st", data))
    assert want in str(e.value) and str(tmp_path / "st" / FILE_NAME) in str(e.value)


async def test_a_tampered_state_does_not_fit_its_checkpoint(aiohttp_client, tmp_path: pathlib.Path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    state = AuditState()
    await audit(client, state)
    state.save(tmp_path / "st")
    path = tmp_path / "st" / FILE_NAME
    good = json.loads(path.read_text())
    cases = {
        "another root": lambda s: s["follow"].update(compact=[s["follow"]["compact"][0][:-4] + "AAA="]),
        "another statement": lambda s: s["namespaces"]["acme"]["releases"]["hello@1.0.0"].update(
            statement=s["namespaces"]["acme"]["releases"]["hello@1.0.0"]["statement"].replace("acme:hello@1.0.0", "acme:hello@9.0.0")),
        "a release under another name": lambda s: s["namespaces"]["acme"]["releases"].update(
            {"bye@1.0.0": s["namespaces"]["acme"]["releases"].pop("hello@1.0.0")}),
        "a negative index": lambda s: s["namespaces"]["acme"]["releases"]["hello@1.0.0"].update(index=-1),
        "a bad label": lambda s: s["namespaces"].update({"Acme!": s["namespaces"].pop("acme")}),
    }
    for name, tamper in cases.items():
        bad = json.loads(json.dumps(good))
        tamper(bad)
        path.write_text(json.dumps(bad))
        try:
            AuditState.load(tmp_path / "st")
        except AuditStateError:
            continue
        pytest.fail(f"a state with {name} was loaded")


def test_the_old_pickle_state_is_never_unpickled(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pickle-ran-code"
    directory = write_state(tmp_path / "st", pickle.dumps(_RunsCode(marker)), LEGACY_FILE_NAME)
    with pytest.raises(AuditStateError) as e:
        AuditState.load(directory)
    assert "older wasmlog" in str(e.value) and "never loaded" in str(e.value)
    assert not marker.exists()
    pickle.loads((directory / LEGACY_FILE_NAME).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("command", ["audit", "monitor"])
@pytest.mark.parametrize("case", ["corrupt", "version 2", "old pickle"])
def test_cli_exits_2_with_one_line_for_an_unusable_state(tmp_path: pathlib.Path, command: str, case: str) -> None:
    directory = tmp_path / "st"
    if case == "corrupt":
        write_state(directory, b'{"format": "wasmlog-audit-state", "vers')
    elif case == "version 2":
        write_state(directory, _encode(AuditState()).replace(b'"version": 1', b'"version": 2'))
    else:
        write_state(directory, pickle.dumps((2, "old state")), LEGACY_FILE_NAME)
    extra = ["--namespace", "acme"] if command == "monitor" else []
    # Port 9 (discard) is never contacted: the state is read before the log is.
    proc = subprocess.run(
        [sys.executable, "-m", "wasmlog", command, "http://127.0.0.1:9", "--vkey", REGISTRY_KEY.vkey, "--state", str(directory), *extra],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(directory) in lines[0]
