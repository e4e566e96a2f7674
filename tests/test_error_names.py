"""Errors are named for what happened, every error type is raised somewhere, and the registry maps each to its status."""

from __future__ import annotations

import ast
import json
import pathlib
import time

from registry_helpers import start_registry, wat_module

from registry.dsse import ACTION_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, parse_package_ref
from tlog.note import Ed25519Signer

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("tlog", "witness", "registry", "edge", "wasmlog")
ALICE = Ed25519Signer.generate("alice")
BOB = Ed25519Signer.generate("bob")


def exception_classes() -> dict[str, set[str]]:
    """Every class in our packages that derives (by name, transitively) from an exception: name -> its bases."""
    bases: dict[str, set[str]] = {}
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
    roots = {"Exception", "ValueError", "TypeError"}
    errors: dict[str, set[str]] = {}
    changed = True
    while changed:
        changed = False
        for name, bs in bases.items():
            if name not in errors and bs & (roots | set(errors)):
                errors[name] = bs
                changed = True
    return errors


def raised_names() -> set[str]:
    """Names raised, or constructed anywhere (an error built to be raised later, returned across a
    thread, or handed to set_exception is used too)."""
    names: set[str] = set()
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            exc = node.exc if isinstance(node, ast.Raise) else node.func if isinstance(node, ast.Call) else None
            if isinstance(exc, ast.Call):
                exc = exc.func
            if isinstance(exc, ast.Name):
                names.add(exc.id)
            elif isinstance(exc, ast.Attribute):
                names.add(exc.attr)
    return names


def test_every_error_type_is_raised_or_is_the_base_of_one() -> None:
    errors = exception_classes()
    raised = raised_names()
    assert {"TlogError", "VerifyError", "WitnessError", "ValidationError"} <= set(errors)  # the scan finds them
    used = set(raised)
    for name in sorted(raised, key=len):  # a raised type keeps its bases alive
        stack = [name]
        while stack:
            for base in errors.get(stack.pop(), ()):
                if base in errors and base not in used:
                    used.add(base)
                    stack.append(base)
    assert sorted(set(errors) - used) == []


async def test_registry_answers_each_refusal_with_its_own_type_and_status(aiohttp_client, tmp_path) -> None:
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    await api.publish(ALICE, parse_package_ref("acme:hello@1.0.0"), wat_module("no_imports", tmp_path))
    now = int(time.time())
    await api.act(ALICE, Action("yank", "acme", name="hello", version="1.0.0", issued=now))
    cases = [
        (Action("key-revocation", "acme", key=BOB.vkey, issued=now), 404, "UnknownKey"),
        (Action("yank", "acme", name="hello", version="9.9.9", issued=now), 404, "UnknownRelease"),
        (Action("key-grant", "acme", key=ALICE.vkey, issued=now + 7), 409, "KeyAlreadyGranted"),  # not the claim itself (that would answer its entry)
        (Action("yank", "acme", name="hello", version="1.0.0", issued=now + 1), 409, "AlreadyYanked"),
    ]
    for action, status, error in cases:
        env = sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), ALICE)
        body = {"type": action.action, "signer": ALICE.vkey, "envelope": json.loads(env.to_json())}
        r = await client.post("/api/v1/records", json=body)
        text = await r.text()
        assert r.status == status and json.loads(text)["error"] == error, (error, r.status, text)


HTTP_ANSWERS = {"RegistryError"}  # a client's view of a status some server answered: it carries that status


def test_errors_carry_no_http_status() -> None:
    """Statuses live only in each server's table: no error class of ours keeps a status attribute."""
    errors = set(exception_classes()) - HTTP_ANSWERS
    for path in (p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name in errors):
            for node in ast.walk(cls):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                names = {t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else "" for t in targets}
                assert "status" not in names, f"{cls.name} in {path.relative_to(ROOT)} carries a status"


def test_the_witness_table_gives_every_refusal_its_protocol_status() -> None:
    from witness import errors
    from witness.server import witness_status

    expected = {"BadRequest": 400, "Forbidden": 403, "UnknownOrigin": 404, "Conflict": 409, "BadProof": 422,
                "SplitViewProof": 422, "Frozen": 422, "TooManyRequests": 429, "LogOverBudget": 429, "ClientOverBudget": 429}
    refusals = {name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, errors.WitnessError)}
    assert set(refusals) - {"WitnessError"} == set(expected)
    got = {name: witness_status(cls.__new__(cls)) for name, cls in refusals.items() if name != "WitnessError"}
    assert got == expected
