"""The edge verifier: each failure class tampers with exactly one thing and gets exactly its reason code."""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.verify import (
    KnownCheckpoint,
    NamespaceStatus,
    TrustPolicy,
    VerifyError,
    parse_trust_policy,
    verify_module,
)
from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import (
    Action,
    PackageRef,
    Release,
    encode_entry,
    module_digest,
    record_for,
)
from registry.wasm import Import, parse_wasm
from tlog.cosignature import cosign
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.proof_file import TlogProof, parse_tlog_proof
from tlog.storage.memory import MemoryLogStore

LOG = Ed25519Signer.generate("example.com/edge-log")
WITNESSES = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]
ALICE = Ed25519Signer.generate("alice")
MALLORY = Ed25519Signer.generate("mallory")
NOW = 1_800_000_000
MODULE = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")  # (import "env" "log" (func))
SBOM = b'{"bomFormat":"CycloneDX","specVersion":"1.5","version":1}'
REF = PackageRef("acme", "hello", "1.0.0")

POLICY_TOML = f'''
max_checkpoint_age = 3600
tlog_policy = """
log {LOG.vkey}
witness W0 {WITNESSES[0].vkey}
witness W1 {WITNESSES[1].vkey}
witness W2 {WITNESSES[2].vkey}
group g 2 W0 W1 W2
quorum g
"""
[imports]
allow = ["env.*", "wasi_snapshot_preview1.fd_write"]
'''
POLICY = parse_trust_policy(POLICY_TOML)


def release_entry(*, signer: Ed25519Signer = ALICE, envelope_key: Ed25519Signer | None = None, module: bytes = MODULE,
                  imports=None, sbom: bytes | None = SBOM) -> bytes:  # type: ignore[no-untyped-def]
    rel = Release(REF, module_digest(module), parse_wasm(MODULE).imports if imports is None else imports,
                  None if sbom is None else module_digest(sbom), None if sbom is None else "application/vnd.cyclonedx+json")
    env = sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), envelope_key or signer)
    return record_for("release", signer.vkey, env).encode()  # the registry's canonical keyid


def make_proof(entry: bytes, *, cosigners: int = 3, timestamp: int = NOW - 60, others: list[bytes] | None = None) -> tuple[bytes, Log]:
    """Log some entries, then entry; return its tlog-proof with cosignatures, and the log."""
    log = Log(MemoryLogStore(), LOG)
    log.integrate(others if others is not None else [b"first", b"second"])
    (index,), published = log.integrate([entry])
    text = published.checkpoint.text()
    note = published.note + b"".join(cosign(w, text, timestamp).line().encode() for w in WITNESSES[:cosigners])
    tp = parse_tlog_proof(log.tlog_proofs([index], published)[0])
    return TlogProof(index, tp.proof, note, entry).encode(), log


def verify(proof: bytes, module: bytes = MODULE, policy: TrustPolicy = POLICY, **kw):  # type: ignore[no-untyped-def]
    return verify_module(module=module, proof=proof, policy=policy, now=kw.pop("now", NOW), **kw)


def reason_of(**kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(VerifyError) as e:
        verify(**kw)
    return e.value.reason


GOOD, GOOD_LOG = make_proof(release_entry())


def test_a_good_module_verifies() -> None:
    v = verify(GOOD, sbom=SBOM)
    assert v.ref == REF and v.signer == ALICE.vkey and v.witnesses == ("W0", "W1", "W2") and v.index == 2
    assert "OK acme:hello@1.0.0" in v.summary()


def test_proof_malformed() -> None:
    assert reason_of(proof=b"garbage") == "proof-malformed"
    no_extra = GOOD.replace(GOOD.split(b"\n")[1] + b"\n", b"", 1)
    assert reason_of(proof=no_extra) == "proof-malformed"


def test_entry_invalid() -> None:
    proof, _ = make_proof(b"not cbor")
    assert reason_of(proof=proof) == "entry-invalid"


def test_not_a_release() -> None:
    env = sign_envelope(ACTION_PAYLOAD_TYPE, Action("key-grant", "acme", key=ALICE.vkey).payload(), ALICE)
    proof, _ = make_proof(encode_entry("key-grant", ALICE.vkey, env))
    assert reason_of(proof=proof) == "not-a-release"


def test_module_digest() -> None:
    assert reason_of(proof=GOOD, module=MODULE + b"\x00\x02\x01x") == "module-digest"


def test_module_invalid() -> None:
    proof, _ = make_proof(release_entry(module=b"\x00asm\x02\x00\x00\x00", imports=()))
    assert reason_of(proof=proof, module=b"\x00asm\x02\x00\x00\x00") == "module-invalid"


def test_imports_mismatch() -> None:
    proof, _ = make_proof(release_entry(imports=()))
    assert reason_of(proof=proof) == "imports-mismatch"


def test_import_not_allowed() -> None:
    strict = dataclasses.replace(POLICY, allowed_imports=("wasi_snapshot_preview1.*",))
    assert reason_of(proof=GOOD, policy=strict) == "import-not-allowed"


def test_import_patterns_match_module_and_field_separately() -> None:
    """issue 12: `env.log` allowed a core import with module "" and field "env.log"."""
    empty_module = bytes.fromhex("0061736d01000000010401600000020c010007") + b"env.log" + b"\0\0"  # (import "" "env.log" (func))
    imports = parse_wasm(empty_module).imports
    assert imports == (Import("", "env.log", "func"),)
    proof, _ = make_proof(release_entry(module=empty_module, imports=imports))
    only_env_log = dataclasses.replace(POLICY, allowed_imports=("env.log",))
    with pytest.raises(VerifyError) as e:
        verify(proof, module=empty_module, policy=only_env_log)
    assert e.value.reason == "import-not-allowed" and ".env.log" in str(e.value)
    verify(proof, module=empty_module, policy=dataclasses.replace(POLICY, allowed_imports=(".env.log",)))
    verify(GOOD, policy=only_env_log)  # module "env", field "log"
    p = dataclasses.replace(POLICY, allowed_imports=("env.log.v2", "a?b.*", "wasi:http/types@0.2.0", "*"))
    assert p.import_allowed(Import("env", "log.v2", "func"), False)  # dots in the field
    assert not p.import_allowed(Import("env.log", "v2", "func"), False)
    assert p.import_allowed(Import("a.b", "f", "func"), False)
    assert p.import_allowed(Import("", "wasi:http/types@0.2.0", "instance"), True)
    assert not dataclasses.replace(POLICY, allowed_imports=("*",)).import_allowed(Import("env", "log", "func"), False)


_NAMES = st.text(alphabet="ab.", max_size=5)
_PATTERNS = st.lists(st.text(alphabet="ab.*?[]!", max_size=6), max_size=4)


@given(module=_NAMES, name=_NAMES, patterns=_PATTERNS, component=st.booleans())
def test_import_matcher_agrees_with_a_naive_reference(module: str, name: str, patterns: list[str], component: bool) -> None:
    def naive(p: str) -> bool:
        if component:
            return fnmatch.fnmatchcase(name, p)
        if "." not in p:
            return False
        i = p.index(".")
        return fnmatch.fnmatchcase(module, p[:i]) and fnmatch.fnmatchcase(name, p[i + 1:])

    policy = dataclasses.replace(POLICY, allowed_imports=tuple(patterns))
    imp = Import("" if component else module, name, "func")
    assert policy.import_allowed(imp, component) == any(naive(p) for p in patterns)


def test_signature_invalid() -> None:
    proof, _ = make_proof(release_entry(signer=ALICE, envelope_key=MALLORY))
    assert reason_of(proof=proof) == "signature-invalid"


def test_publisher_not_allowed() -> None:
    pinned = dataclasses.replace(POLICY, namespace_keys={"acme": frozenset({MALLORY.vkey})})
    assert reason_of(proof=GOOD, policy=pinned) == "publisher-not-allowed"
    other = dataclasses.replace(POLICY, namespace_keys={"other": frozenset({MALLORY.vkey})})
    verify(GOOD, policy=other)


def test_sbom_digest() -> None:
    assert reason_of(proof=GOOD, sbom=SBOM + b" ") == "sbom-digest"


def test_log_unknown() -> None:
    other = parse_trust_policy(POLICY_TOML.replace(LOG.vkey, Ed25519Signer.generate("example.com/other").vkey))
    assert reason_of(proof=GOOD, policy=other) == "log-unknown"


def test_log_signature() -> None:
    impostor = parse_trust_policy(POLICY_TOML.replace(LOG.vkey, Ed25519Signer.generate(LOG.name).vkey))
    assert reason_of(proof=GOOD, policy=impostor) == "log-signature"
    line = next(l for l in GOOD.split(b"\n") if l.startswith("\u2014 example.com".encode()))
    sig = bytearray(base64.b64decode(line.split(b" ")[2]))
    sig[10] ^= 1
    bad = GOOD.replace(line, line.split(b" ")[0] + b" " + line.split(b" ")[1] + b" " + base64.b64encode(bytes(sig)))
    assert reason_of(proof=bad) == "log-signature"


def test_inclusion() -> None:
    bad = GOOD.replace(b"\nindex 2\n", b"\nindex 1\n")
    assert reason_of(proof=bad) == "inclusion"


def test_witness_signature() -> None:
    line = next(l for l in GOOD.split(b"\n") if l.startswith("\u2014 w1.example".encode()))
    sig = bytearray(base64.b64decode(line.split(b" ")[2]))
    sig[20] ^= 1
    bad = GOOD.replace(line, b" ".join(line.split(b" ")[:2]) + b" " + base64.b64encode(bytes(sig)))
    assert reason_of(proof=bad) == "witness-signature"


def test_witness_quorum() -> None:
    proof, _ = make_proof(release_entry(), cosigners=1)
    assert reason_of(proof=proof) == "witness-quorum"
    future, _ = make_proof(release_entry(), timestamp=NOW + 3600)  # cosignatures from the future do not count
    assert reason_of(proof=future) == "witness-quorum"


def test_stale() -> None:
    assert reason_of(proof=GOOD, now=NOW + 7200) == "stale"
    verify(GOOD, now=NOW + 7200, policy=dataclasses.replace(POLICY, max_checkpoint_age=None))


def test_two_failures_report_the_first_in_the_documented_order() -> None:
    """spec/trust-policy.md: the checkpoint's signatures, quorum and freshness come before inclusion."""
    wrong_index = GOOD.replace(b"\nindex 2\n", b"\nindex 1\n")
    assert reason_of(proof=wrong_index, now=NOW + 7200) == "stale"
    one_cosigner, _ = make_proof(release_entry(), cosigners=1)
    assert reason_of(proof=one_cosigner.replace(b"\nindex 2\n", b"\nindex 1\n")) == "witness-quorum"
    assert reason_of(proof=wrong_index, sbom=b"another SBOM") == "sbom-digest"


def _known(log: Log) -> KnownCheckpoint:
    return KnownCheckpoint(log.published.checkpoint, log.published.note)


def test_consistency_required_and_supplied() -> None:
    log = Log(MemoryLogStore(), LOG)
    log.integrate([b"first", b"second", release_entry()])
    log.integrate([b"later"])
    newer = _known(log)  # size 4; GOOD is at size 3 of the same history
    assert reason_of(proof=GOOD, known=newer) == "consistency-required"
    v = verify(GOOD, known=newer, consistency=log.consistency_proof(3, 4))
    assert v.known == newer  # an older proof does not move the state back
    older = Log(MemoryLogStore(), LOG)
    older.integrate([b"first"])
    v = verify(GOOD, known=_known(older), consistency=GOOD_LOG.consistency_proof(1, 3))
    assert v.known.checkpoint.size == 3


def test_fork() -> None:
    fork = Log(MemoryLogStore(), LOG)
    fork.integrate([b"first", b"other", b"third"])  # size 3, another history
    assert reason_of(proof=GOOD, known=_known(fork)) == "fork"
    bigger = Log(MemoryLogStore(), LOG)
    bigger.integrate([b"first", b"other", b"third", b"fourth"])
    with pytest.raises(VerifyError) as e:
        verify(GOOD, known=_known(bigger), consistency=bigger.consistency_proof(3, 4))
    assert e.value.reason == "fork" and "known" in e.value.evidence


def test_yanked_and_key_revoked() -> None:
    assert reason_of(proof=GOOD, status=NamespaceStatus(yanked=frozenset({"hello@1.0.0"}))) == "yanked"
    assert reason_of(proof=GOOD, status=NamespaceStatus(revoked={ALICE.vkey: 1})) == "key-revoked"
    verify(GOOD, status=NamespaceStatus(revoked={ALICE.vkey: 5}))  # revoked after the release: still valid
    alias = Ed25519Signer("alice-alias", ALICE.seed).vkey  # the same key revoked under another name
    assert reason_of(proof=GOOD, status=NamespaceStatus(revoked={alias: 1})) == "key-revoked"


@pytest.mark.parametrize(
    "text",
    ["", "tlog_policy = 1", 'tlog_policy = "quorum none\\n"', POLICY_TOML + "\nextra = 1",
     POLICY_TOML.replace("max_checkpoint_age = 3600", "max_checkpoint_age = -1"), POLICY_TOML + '\n[namespaces.acme]\nkeys = ["nope"]\n',
     POLICY_TOML + '\n[namespaces.acme]\nkeys = ["' + Ed25519Signer("ali\u200bce", ALICE.seed).vkey + '"]\n'],
)
def test_policy_malformed(text: str) -> None:
    with pytest.raises(VerifyError) as e:
        parse_trust_policy(text)
    assert e.value.reason == "policy-malformed" and e.value.unusable_input


def test_cli_exit_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "policy.toml").write_text(POLICY_TOML)
    (tmp_path / "m.wasm").write_bytes(MODULE)
    (tmp_path / "m.wasm.tlog-proof").write_bytes(GOOD)
    run = lambda *a: subprocess.run([sys.executable, "-m", "wasmlog", "verify", "--policy", str(tmp_path / "policy.toml"), "--now", str(NOW), *a], capture_output=True, text=True)
    ok = run("--state", str(tmp_path / "state"), str(tmp_path / "m.wasm"))
    assert ok.returncode == 0 and ok.stdout.startswith("OK acme:hello@1.0.0")
    assert list((tmp_path / "state").iterdir())  # the accepted checkpoint is remembered
    (tmp_path / "bad.wasm").write_bytes(MODULE + b"\x00\x02\x01x")
    bad = run("--proof", str(tmp_path / "m.wasm.tlog-proof"), "--json", str(tmp_path / "bad.wasm"))
    assert bad.returncode == 1 and '"reason": "module-digest"' in bad.stdout
    missing = run(str(tmp_path / "none.wasm"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
