"""The registry's CPU per publish, function by function, on realistic batches. Prints JSON.

    python bench/registry_cpu.py [--namespaces 512] [--batch 100] [--rounds 20] [--seconds 1]

What bench/publish.py's registry processes spend per record, outside HTTP and storage, measured
in one process on the same shapes: `namespaces` publishers, each with its own key and namespace
(claimed by a key grant) publishing versions of one package, `batch` records (of distinct
namespaces) per sequencing transaction, `rounds` transactions already logged. Each figure is
microseconds per record:

- check_signed_release: the request's checks (envelope JSON, statement, Ed25519 signature);
- decode_admitted: decoding a record another process sequenced (its signature not verified again);
- state_apply: RegistryState.apply over a batch, record by record (what admit and following do);
- index_with_records: IndexState.with_records of a batch (admit's index root, the follower's flush);
- tlog_proofs: Log.tlog_proofs of a batch of consecutive entries (answering them), on an LMDB log;
- baseline_ed25519_verify: one Ed25519 verification, the floor of the request's checks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import nacl.signing

from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.index import IndexState
from registry.record import Action, PackageRef, Record, Release, decode_entry, record_for
from registry.service import check_signed_release
from registry.state import RegistryState
from tlog.log import Log
from tlog.note import Ed25519Signer
from tlog.storage.lmdb_store import LMDBLogStore


def per_item_us(fn: Callable[[], object], items: int, seconds: float) -> float:
    """Microseconds per item of fn (which handles `items` items per call), best of runs over seconds."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            return round(best / items * 1e6, 3)


def workload(namespaces: int, rounds: int, batch: int) -> tuple[list[Record], list[Record], list[tuple[str, bytes]]]:
    """(claims, releases logged so far in rounds of batch, the next batch's (signer, release envelope as JSON))."""
    keys = [Ed25519Signer.generate(f"bench{p}") for p in range(namespaces)]
    claims = [record_for("key-grant", k.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, Action("key-grant", f"ns{p}", key=k.vkey, issued=1).payload(), k))
              for p, k in enumerate(keys)]

    def release(p: int, v: int) -> Record:
        rel = Release(PackageRef(f"ns{p}", "mod", f"1.0.{v}"), f"{p:064x}", ())
        return record_for("release", keys[p].vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), keys[p]))

    logged = [release((r * batch + i) % namespaces, (r * batch + i) // namespaces) for r in range(rounds) for i in range(batch)]
    n = rounds * batch
    fresh = [release((n + i) % namespaces, (n + i) // namespaces) for i in range(batch)]
    return claims, logged, [(r.signer, r.envelope.to_json()) for r in fresh]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--namespaces", type=int, default=512)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    claims, logged, envelopes = workload(args.namespaces, args.rounds, args.batch)
    records = claims + logged
    state, index = RegistryState(), IndexState()
    for i, r in enumerate(records):
        state = state.apply(r, i)
    index = index.with_records(enumerate(records), len(records))
    fresh = [check_signed_release(signer=s, envelope=e) for s, e in envelopes]
    entries = [r.entry for r in fresh]
    first = len(records)

    def apply_batch() -> None:
        s = state
        for i, r in enumerate(fresh, start=first):
            s = s.apply(r, i)

    results: dict[str, object] = {
        "check_signed_release": per_item_us(lambda: [check_signed_release(signer=s, envelope=e) for s, e in envelopes], args.batch, args.seconds),
        "decode_admitted": per_item_us(lambda: [decode_entry(e) for e in entries], args.batch, args.seconds),
        "state_apply": per_item_us(apply_batch, args.batch, args.seconds),
        "index_with_records": per_item_us(lambda: index.with_records(enumerate(fresh, start=first), first + args.batch),
                                          args.batch, args.seconds),
    }
    with tempfile.TemporaryDirectory() as d:
        log = Log(LMDBLogStore(d), Ed25519Signer.generate("bench.example/log"))
        for start in range(0, len(records), 1000):
            log.integrate([r.entry for r in records[start : start + 1000]])
        indexes, published = log.integrate(entries)
        results["tlog_proofs"] = per_item_us(lambda: log.tlog_proofs(indexes, published, entries), args.batch, args.seconds)
    sk = nacl.signing.SigningKey.generate()
    sig = sk.sign(b"x" * 600).signature
    results["baseline_ed25519_verify"] = per_item_us(lambda: [sk.verify_key.verify(b"x" * 600, sig) for _ in range(100)], 100, args.seconds)
    print(json.dumps({"benchmark": "registry_cpu_us_per_record", **vars(args), **results}, indent=1))


if __name__ == "__main__":
    main()
