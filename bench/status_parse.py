"""What parsing a status proof costs, valid and hostile: peak traced memory and time. Prints JSON.

    python bench/status_parse.py

For each input, parse_status_proof's peak (tracemalloc) and seconds, and beside it the same for a
plain cbor2.loads of the input: what the parser did first before it scanned the CBOR heads against
the bounds of a valid status proof (registry/status_proof.py scan_heads), so the baseline is measured
in the same run. Inputs: a small valid proof (100 history items), the largest valid one (every
count at its bound of spec/status-proof.md), and 4 MiB hostile files: arrays of empty maps or of
empty arrays (the cheapest container per byte), and the hostile file that stays inside every count
bound and costs the most (the items a valid proof may have, as 11-character text strings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import tracemalloc
from collections.abc import Callable

import cbor2

from registry.index_map import MapProof
from registry.status_proof import (
    MAX_HISTORY,
    MAX_ITEMS,
    MAX_RECORDS,
    MAX_STATUS_PROOF_BYTES,
    Included,
    KeyProof,
    StatusProof,
    parse_status_proof,
)
from tlog.merkle import MAX_PROOF_HASHES

HASH = bytes(32)


def valid(history: int, records: int, proof_hashes: int, entry: int) -> bytes:
    """A status proof of two keys of `history` items each and `records` records (not a verifiable
    one: the parser checks its form, edge/status.py the rest)."""
    items = tuple((i * 1000, i % 4) for i in range(history))
    key = KeyProof("acme", items, MapProof((HASH,) * 20, None))
    return StatusProof(b"example.com/log\n3\n" + bytes(44), Included(2, b"root-entry", (HASH,) * 20), key,
                       dataclasses.replace(key, key="acme:app"),
                       tuple(Included(i, b"x" * entry, (HASH,) * proof_hashes) for i in range(records))).encode()


def hostile_inputs() -> dict[str, bytes]:
    n = MAX_STATUS_PROOF_BYTES - 5
    per = MAX_HISTORY
    lists = MAX_ITEMS // per
    inside_bounds = [["abcdefghijk"] * per for _ in range(lists)] + [["abcdefghijk"] * (MAX_ITEMS - lists * per - lists - 2)]
    return {
        "4MiB_array_of_empty_maps": b"\x9a" + n.to_bytes(4, "big") + b"\xa0" * n,
        "4MiB_array_of_empty_arrays": b"\x9a" + n.to_bytes(4, "big") + b"\x80" * n,
        "status_proof_whose_records_are_empty_maps": cbor2.dumps(
            {"v": 1, "keys": [], "root": {}, "records": [{}] * (n - 64), "checkpoint": b"x"}),
        "most_items_inside_the_bounds_as_text": cbor2.dumps(inside_bounds),
    }


def measure(f: Callable[[bytes], object], data: bytes) -> dict[str, object]:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        f(data)
        outcome = "accepted"
    except Exception as e:  # the outcome is reported, whatever it is
        outcome = f"{type(e).__name__}: {str(e)[:100]}"
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    untraced_start = time.perf_counter()  # tracemalloc slows allocation-heavy code: time it again untraced
    with contextlib.suppress(Exception):  # the outcome was reported above
        f(data)
    return {"peak_mib": round(peak / 2**20, 2), "seconds": round(time.perf_counter() - untraced_start, 4),
            "seconds_traced": round(seconds, 4), "outcome": outcome}


def main() -> None:
    inputs = {"valid_100_history_items": valid(100, 1, 20, 300),
              "valid_at_every_bound": valid(MAX_HISTORY, MAX_RECORDS, MAX_PROOF_HASHES, 1), **hostile_inputs()}
    out = {}
    for name, data in inputs.items():
        out[name] = {"bytes": len(data), "parse_status_proof": measure(parse_status_proof, data),
                     "cbor2_loads_baseline": measure(cbor2.loads, data)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
