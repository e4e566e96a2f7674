"""Edge verifications per second of a module with a 3-cosignature tlog-proof, beside Ed25519. Prints JSON.

    python bench/verify.py [--seconds 20] [--rounds 40] [--log-size 100000]

One verification checks 5 Ed25519 signatures (log, 3 witnesses, the publisher's DSSE envelope)
plus parsing, hashing and the inclusion proof; the signature bound is the raw pynacl verify rate
measured in this run divided by 5. Target: at least 80% of that bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import nacl.signing

from edge.verify import parse_trust_policy, verify_module
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import PackageRef, Release, encode_entry, module_digest
from registry.wasm import parse_wasm
from tlog.cosignature import cosign
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer
from tlog.proof_file import TlogProof, parse_tlog_proof
from tlog.storage.memory import MemoryLogStore

MODULE = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")
SIGNATURES_PER_VERIFICATION = 5


def setup(log_size: int) -> tuple[bytes, str, int]:
    log_key = Ed25519Signer.generate("bench.example/log")
    witnesses = [Ed25519Signer.generate(f"w{i}.example", ALG_COSIGNATURE_V1) for i in range(3)]
    alice = Ed25519Signer.generate("alice")
    rel = Release(PackageRef("acme", "hello", "1.0.0"), module_digest(MODULE), parse_wasm(MODULE).imports)
    entry = encode_entry("release", alice.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), alice))
    log = Log(MemoryLogStore(), log_key)
    # The entry in the middle of the tree: its inclusion proof has the full log2(size) hashes
    # (the last entry's would be shorter).
    log.integrate([b"filler %d" % i for i in range(log_size // 2)])
    (index,), _ = log.integrate([entry])
    _, published = log.integrate([b"filler %d" % i for i in range(log_size // 2, log_size)])
    now = int(time.time())
    note = published.note + b"".join(cosign(w, published.checkpoint.text(), now).line().encode() for w in witnesses)
    tp = parse_tlog_proof(log.tlog_proofs([index], published)[0])
    proof = TlogProof(index, tp.proof, note, entry).encode()
    policy = "\n".join(
        [f"log {log_key.vkey}"] + [f"witness W{i} {w.vkey}" for i, w in enumerate(witnesses)] + ["group g 3 W0 W1 W2", "quorum g"]
    )
    return proof, f'max_checkpoint_age = 3600\ntlog_policy = """\n{policy}\n"""\n', now


def rate(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def paired_rates(baseline, subject, seconds: float, rounds: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Alternate short rounds of baseline and subject so both see the same machine (CPU clock, neighbours)."""
    base: list[float] = []
    subj: list[float] = []
    for _ in range(rounds):
        base.append(rate(baseline, seconds / rounds / 2))
        subj.append(rate(subject, seconds / rounds / 2))
    return base, subj


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=20.0, help="total, split between baseline and verification")
    p.add_argument("--rounds", type=int, default=40, help="alternating rounds; the median round ratio is reported")
    p.add_argument("--log-size", type=int, default=100_000)
    args = p.parse_args()
    proof, policy_text, now = setup(args.log_size)
    proof_hashes = len(parse_tlog_proof(proof).proof)
    policy = parse_trust_policy(policy_text)
    verify_module(module=MODULE, proof=proof, policy=policy, now=now)  # must pass before timing
    sk = nacl.signing.SigningKey.generate()
    msg = b"x" * 200
    sig = sk.sign(msg).signature
    base, subj = paired_rates(
        lambda: sk.verify_key.verify(msg, sig),
        lambda: verify_module(module=MODULE, proof=proof, policy=policy, now=now),
        args.seconds, args.rounds,
    )
    ed25519, verifications = statistics.median(base), statistics.median(subj)
    bound = ed25519 / SIGNATURES_PER_VERIFICATION
    ratios = sorted(v * SIGNATURES_PER_VERIFICATION / b for b, v in zip(base, subj, strict=True))
    json.dump(
        {
            "benchmark": "edge_verify",
            "log_size": args.log_size + 1,
            "inclusion_proof_hashes": proof_hashes,
            "cosignatures": 3,
            "verifications_per_s": verifications,
            "baseline_ed25519_verify_per_s": ed25519,
            "signature_bound_per_s": bound,
            "fraction_of_bound": statistics.median(ratios),  # median over paired rounds
            "fraction_of_bound_min_max": [ratios[0], ratios[-1]],
            "rounds": args.rounds,
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
