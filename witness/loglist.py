"""The witness-network log list (``logs/v0``): which logs a witness knows. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from tlog.checkpoint import parse_decimal
from tlog.errors import MalformedError
from tlog.note import Ed25519Verifier, verifier_from_vkey

HEADER = "logs/v0"
MAX_QPD = 2**31 - 1
MAX_LOG_LIST_BYTES = 16 << 20


@dataclass(frozen=True)
class KnownLog:
    origin: str
    verifier: Ed25519Verifier
    qpd: int
    contact: str = ""
    url: str | None = None  # wasmlog extension: the log's tlog-tiles prefix, for gossip proofs


def parse_log_list(text: str) -> dict[str, KnownLog]:
    """Parse a log list: the header, then blocks of ``vkey``, optional ``origin``, ``qpd``, ``contact``.

    The origin defaults to the key name. A ``url`` line (the log's tlog-tiles
    prefix) is a wasmlog extension used for gossip. Raises MalformedError.
    """
    if len(text) > MAX_LOG_LIST_BYTES:
        raise MalformedError("log list is too large")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != HEADER:
        raise MalformedError(f"log list does not start with {HEADER}")
    blocks: list[dict[str, str]] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(" ")
        if not sep or not value or key not in ("vkey", "origin", "qpd", "contact", "url"):
            raise MalformedError(f"log list line {n}: malformed")
        if key == "vkey":
            blocks.append({})
        elif not blocks:
            raise MalformedError(f"log list line {n}: {key} before any vkey")
        if key in blocks[-1]:
            raise MalformedError(f"log list line {n}: duplicate {key}")
        blocks[-1][key] = value
    logs: dict[str, KnownLog] = {}
    for b in blocks:
        verifier = verifier_from_vkey(b["vkey"])
        if "qpd" not in b:
            raise MalformedError(f"log {b['vkey']} has no qpd")
        qpd = parse_decimal(b["qpd"], "qpd", MAX_QPD)
        if qpd < 1:
            raise MalformedError("qpd must be at least 1")
        origin = b.get("origin", verifier.name)
        if origin in logs:
            raise MalformedError(f"log list names origin {origin!r} twice")
        logs[origin] = KnownLog(origin, verifier, qpd, b.get("contact", ""), b.get("url"))
    return logs
