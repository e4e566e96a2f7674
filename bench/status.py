"""Status proofs at scale: size and verification time, index upkeep beside the append, audit rate. Prints JSON.

    python bench/status.py [--namespaces 10000] [--records 1000000] [--batch 256] [--appends 2048]

How the big index is built: the map is built directly in memory (IndexState.from_histories) from
synthetic histories: `records` log indexes spread round-robin over `namespaces` namespaces of ten
packages each (one key-grant per namespace, the rest releases and yanks), plus one target
namespace of 100 real, signed records (2 grants, 97 releases of one package, a yank of another
version) at random indexes. The log itself is real (tlog.log.Log over the in-memory store):
filler entries everywhere except the target's records, then the index-root record committing
the map, cosigned by three witnesses. Verification is edge/status.verify_status, timed beside
the Ed25519 checks it cannot avoid (the checkpoint's log signature and its three cosignatures,
and the signatures of the records it replays).

Upkeep: batches of real release records appended to an LMDB log (the registry's store), timed
without and with the index-root trailer, on the big index; the trailer's cost per record is
compared with the append's and with the registry's own per-record checks (decode and rules,
which include the signature check). Audit: records per second recomputing the index (decode +
update), on the big index, and what one full garbage collection costs with that index in memory
(Python runs one whenever the objects that survived collections grew by a quarter: a big map of
tracked objects made the audit a fraction of its rate whenever one fell in the timed window).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from edge.status import verify_status
from registry.dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.index import TYPE_CODES, History, IndexState
from registry.indexer import Indexer
from registry.record import Action, IndexRoot, PackageRef, Record, Release, decode_entry, record_for
from registry.state import RegistryState
from registry.status_proof import Included, build_status_proof
from registry.trust_policy import parse_trust_policy
from tlog.cosignature import cosign, cosignature_verifier_from_vkey
from tlog.hashes import leaf_hash
from tlog.log import Log
from tlog.merkle import inclusion_proofs
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Verifier, open_note, parse_note, verifier_from_vkey
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.memory import MemoryLogStore

LOG = Ed25519Signer.generate("bench.example/log")
WITNESSES = [Ed25519Signer.generate(f"w{i}.bench", ALG_COSIGNATURE_V1) for i in range(3)]
ALICE, BOB = Ed25519Signer.generate("alice"), Ed25519Signer.generate("bob")
NOW = 1_900_000_000
CODES = TYPE_CODES


def action(signer: Ed25519Signer, a: Action) -> Record:
    return record_for(a.action, signer.vkey, sign_envelope(ACTION_PAYLOAD_TYPE, a.payload(), signer))


def release(signer: Ed25519Signer, ref: PackageRef) -> Record:
    rel = Release(ref, "ab" * 32, ())
    return record_for("release", signer.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), signer))


def target_records() -> list[Record]:
    out = [action(ALICE, Action("key-grant", "target", key=ALICE.vkey, issued=1)),
           action(ALICE, Action("key-grant", "target", key=BOB.vkey, issued=1))]
    out += [release(BOB, PackageRef("target", "app", f"1.0.{i}")) for i in range(97)]
    out.append(action(ALICE, Action("yank", "target", name="app", version="1.0.0", issued=2, reason="bench")))
    return out


def big_index(namespaces: int, records: int, rng: random.Random) -> tuple[IndexState, dict[int, Record], int]:
    """The index as of `records` entries, the target's records by index, and the index of the release checked."""
    targets = target_records()
    spots = sorted(rng.sample(range(records), len(targets)))
    at = dict(zip(spots, targets, strict=True))
    histories: dict[str, list[tuple[int, int]]] = {}
    for i in range(records):
        record = at.get(i)
        if record is not None:
            body = record.body
            key = "target" if record.type in ("key-grant", "key-revocation") else \
                f"target:{body.ref.name if isinstance(body, Release) else body.name}"
            histories.setdefault(key, []).append((i, CODES[record.type]))
            continue
        ns = i % namespaces
        if i < namespaces:
            histories.setdefault(f"ns{ns}", []).append((i, CODES["key-grant"]))
        else:
            code = CODES["yank"] if i % 97 == 0 else CODES["release"]
            histories.setdefault(f"ns{ns}:p{(i // namespaces) % 10}", []).append((i, code))
    frozen: dict[str, History] = {k: tuple(v) for k, v in histories.items()}
    checked = spots[-2]  # the last release (1.0.96)
    return IndexState.from_histories(records, frozen), at, checked


def cosigned(note: bytes) -> bytes:
    text = parse_note(note).text
    return note + b"".join(cosign(w, text, NOW - 60).line().encode() for w in WITNESSES)


def proof_bench(namespaces: int, records: int, rng: random.Random) -> dict[str, object]:
    started = time.perf_counter()
    index, at, checked = big_index(namespaces, records, rng)
    built = time.perf_counter() - started
    log = Log(MemoryLogStore(), LOG)
    for start in range(0, records, 65536):
        log.integrate([at[i].entry if i in at else b"filler %d" % i for i in range(start, min(records, start + 65536))])
    root_entry = IndexRoot(LOG.name, records, index.root).encode()
    _, published = log.integrate([root_entry])
    size = published.checkpoint.size
    note = cosigned(published.note)

    def included(indexes: Sequence[int]) -> list[Included]:
        proofs = inclusion_proofs(list(indexes), size, log.reader)
        return [Included(i, log.store.read_entries(i, i + 1)[0], tuple(p)) for i, p in zip(indexes, proofs, strict=True)]

    root = included([records])[0]
    sp = build_status_proof(index=index, checkpoint=note, root=root, namespace="target", name="app", included=included)
    data = sp.encode()
    policy = parse_trust_policy('tlog_policy = """\nlog {}\n{}\ngroup g 2 W0 W1 W2\nquorum g\n"""\n'.format(
        LOG.vkey, "\n".join(f"witness W{i} {w.vkey}" for i, w in enumerate(WITNESSES))))
    note_verifiers: list[Verifier] = [verifier_from_vkey(LOG.vkey), *(cosignature_verifier_from_vkey(w.vkey) for w in WITNESSES)]
    runs, sig_runs = [], []
    for _ in range(200):  # alternating, so both see the same machine (it is shared)
        fresh = decode_entry(at[checked].entry)  # nothing cached between runs (signature checks included)
        t = time.perf_counter()
        verify_status(data, release=fresh, release_index=checked, origin=LOG.name, policy=policy, now=NOW)
        runs.append(time.perf_counter() - t)
        fresh_records = [decode_entry(r.entry) for r in sp.records]  # the release's own signature is verify_module's
        t = time.perf_counter()
        open_note(note, note_verifiers)
        assert all(r.signed_by_signer for r in fresh_records)
        sig_runs.append(time.perf_counter() - t)
    verify_s, sigs_s = statistics.median(runs), statistics.median(sig_runs)
    return {
        "namespaces": namespaces, "records": records, "index_keys": len(index.histories), "map_build_seconds": round(built, 2),
        "target_records": 100, "status_proof_bytes": len(data), "status_proof_records": len(sp.records),
        "map_proof_hashes": [len(sp.namespace.proof.siblings), len(sp.package.proof.siblings)],
        "inclusion_proof_hashes": len(root.proof),
        "verify_ms": round(verify_s * 1000, 3), "signature_checks": 4 + len(sp.records),
        "signature_checks_ms": round(sigs_s * 1000, 3), "verify_over_signatures": round(verify_s / sigs_s, 2),
        "_index": index,
    }


def upkeep_bench(index: IndexState, batch: int, appends: int) -> dict[str, object]:
    signer = Ed25519Signer.generate("pub")
    records = [action(signer, Action("key-grant", "upkeep", key=signer.vkey, issued=1))]
    records += [release(signer, PackageRef("upkeep", f"p{i % 10}", f"1.0.{i}")) for i in range(appends - 1)]
    entries = [r.entry for r in records]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        plain = Log(LMDBLogStore(d1), LOG)
        indexed = Log(LMDBLogStore(d2), LOG)
        pending = {leaf_hash(r.entry): r for r in records}  # the registry reuses the records it checked
        indexer = Indexer(indexed, pending.get)
        indexer.index = dataclasses.replace(index, size=0)  # the big map, as if it were this log's
        upkeep_s = 0.0

        def timed(plan):  # type: ignore[no-untyped-def]
            nonlocal upkeep_s
            t0 = time.perf_counter()
            out = indexer.trailer(plan)
            upkeep_s += time.perf_counter() - t0
            return out

        indexed.trailer = timed
        append_s = with_trailer_s = 0.0
        for s in range(0, appends, batch):  # alternating, so both logs see the same disk
            t = time.perf_counter()
            plain.integrate(entries[s:s + batch])
            append_s += time.perf_counter() - t
            t = time.perf_counter()
            indexes, _ = indexed.integrate(entries[s:s + batch])
            t0 = time.perf_counter()
            indexer.batch_done(indexes[-1] + 1)
            upkeep_s += time.perf_counter() - t0
            with_trailer_s += time.perf_counter() - t
        append_s /= appends
        with_trailer_s /= appends
    t = time.perf_counter()
    state = RegistryState()
    for i, e in enumerate(entries):
        state = state.apply(decode_entry(e), i)
    checks_s = (time.perf_counter() - t) / appends
    publish_s = append_s + checks_s
    return {
        "batch": batch, "appends": appends,
        "append_us_per_record": round(append_s * 1e6, 1), "append_with_trailer_us_per_record": round(with_trailer_s * 1e6, 1),
        "upkeep_us_per_record": round(upkeep_s / appends * 1e6, 1), "checks_us_per_record": round(checks_s * 1e6, 1),
        "upkeep_over_append": round(upkeep_s / appends / append_s, 3),
        "upkeep_over_publish": round(upkeep_s / appends / publish_s, 3),
        "_entries": entries,
    }


def audit_bench(index: IndexState, entries: list[bytes], batch: int) -> dict[str, object]:
    """The auditor's index work: decode every entry, update the index once per batch (it flushes at each index root)."""
    state = dataclasses.replace(index, size=0)
    t = time.perf_counter()
    for s in range(0, len(entries), batch):
        chunk = entries[s:s + batch]
        state = state.with_records([(s + i, decode_entry(e)) for i, e in enumerate(chunk)], s + len(chunk))
    rate = len(entries) / (time.perf_counter() - t)
    t = time.perf_counter()
    gc.collect()  # what one full collection costs with the big index in memory (one in the timed window drops the rate)
    full_s = time.perf_counter() - t
    return {"audit_records_per_second": round(rate), "full_collection_ms": round(full_s * 1000, 1),
            "audit_records_per_second_with_one_full_collection": round(len(entries) / (len(entries) / rate + full_s))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--namespaces", type=int, default=10_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--appends", type=int, default=2048)
    args = ap.parse_args()
    rng = random.Random(16)
    proof = proof_bench(args.namespaces, args.records, rng)
    index = proof.pop("_index")
    upkeep = upkeep_bench(index, args.batch, args.appends)  # type: ignore[arg-type]
    entries = upkeep.pop("_entries")
    audit = audit_bench(index, entries, args.batch)  # type: ignore[arg-type]
    json.dump({"status_proof": proof, "upkeep": upkeep, "audit": audit,
               "targets": {"status_proof_under_4KiB": proof["status_proof_bytes"] < 4096,  # type: ignore[operator]
                           "verify_within_2x_signatures": proof["verify_over_signatures"] <= 2,  # type: ignore[operator]
                           "upkeep_under_10pct_of_publish": upkeep["upkeep_over_publish"] < 0.10}},  # type: ignore[operator]
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
