"""Unauthenticated abuse against `wasmlog up` (issue 12), with a probe of legitimate use. Prints JSON.

    python bench/abuse.py [--timeouts 3] [--max-connections 256] [--conns 200] [--module-mib 32]
                          [--sustain 2] [--replays 300] [--yanks 400]

Starts `wasmlog up` on a temporary directory (loopback only; registry on PORT, witnesses on the
next three ports) with short header/body/write timeouts so the run stays under two minutes, then
runs each attack in turn:

- HTTP: gzip bombs, invalid gzip, nested JSON, a GET with a body, slow request heads, trickled
  bodies, a connection flood, non-reading downloads of a large module;
- publish: a CBOR tag-36 bomb, ungranted publishes with a 1,500-component SBOM, a signed publish
  with a 4,000-component SBOM, three ungranted 48 MiB modules (and, as a control, a legitimate
  publish with an SBOM at the limits);
- witnesses: the log's public checkpoint replayed to every witness's POST /add-checkpoint with a
  wrong `old` line, then a legitimate publish timed.

Meanwhile a probe process times `GET /log/checkpoint` every 100 ms and a legitimate signed publish
(RegistryClient.publish, a fresh version each time) every 500 ms, and the resident memory of the
`wasmlog up` process and its children (the SBOM validation worker) is sampled every 50 ms (plus
the main process's exact high-water mark, VmHWM, reset at each attack's start). Last, the size of
the first /actions page of a namespace with --yanks yanks is measured.

Quick attacks are repeated for --sustain seconds so the probe sees them under way. Per attack: its
outcomes (statuses, or what happened to its connections) against the ones expected, its slowest
round against its time budget, the probe's worst checkpoint and publish latencies and failures over
the attack and the half second after it, and RSS baseline / peak / after (after: once back within
64 MB of the baseline, or 3 s after the attack). "targets" evaluates the issue's targets with the
numbers behind each verdict. The witnesses' log list is not a file under `wasmlog up` (it is built
in memory), so the replays cannot be sized from its qpd; they go past each witness's per-client
refusal burst (--replays), and the verdict checks that none of them was charged to the log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import cbor2
from common import free_ports, module_variant, proc_status, with_custom_section

from registry.client import RegistryClient, RegistryError, release_statement
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Action, PackageRef
from tlog.note import Ed25519Signer
from tlog.policy import parse_policy

MIB = 1 << 20
CDX = "application/vnd.cyclonedx+json"
GROWTH_LIMIT_MB = 300  # the target: memory growth during an attack
NEAR_BASELINE_MB = 64  # "back near the baseline": at most this much above it, within SETTLE_S of the attack's end
SETTLE_S = 3.0
PROBE_LIMIT_S = 1.0  # the target: the probe's worst latency
REPLAY_CAP = 3000  # replays per witness at most, whatever the qpd


# --- payloads ---------------------------------------------------------------------------------

def gzip_bomb(mib: int) -> bytes:
    """A gzip member of mib MiB of zeros (about 1 KiB per MiB)."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + segment * mib + end + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)


def sbom(components: int, dependencies: int) -> bytes:
    """A CycloneDX document with that many components and dependency entries."""
    return json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
                       "components": [{"type": "library", "name": f"c{i}", "version": "1.0.0", "bom-ref": f"r{i}"} for i in range(components)],
                       "dependencies": [{"ref": f"r{i % components}", "dependsOn": [f"r{(i + 1) % components}"]} for i in range(dependencies)]}).encode()


@dataclass(frozen=True)
class SignedRelease:
    signer: Ed25519Signer
    envelope: bytes
    module: bytes
    sbom: bytes | None


def signed_release(signer: Ed25519Signer, ref: PackageRef, module: bytes, sbom_bytes: bytes | None = None) -> SignedRelease:
    release = release_statement(ref, module, sbom_bytes, None if sbom_bytes is None else CDX)
    return SignedRelease(signer, sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer).to_json(), module, sbom_bytes)


# --- the server's memory ------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def tree_rss(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, StopIteration):
            total += proc_status(p, "VmRSS")
    return total


def reset_hwm(pid: int) -> bool:
    """Reset pid's VmHWM to its current RSS (Linux clear_refs 5); whether that worked."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mb(n: float) -> float:
    return round(n / MIB, 1)


# --- the probe (its own process, so the attacks cannot delay it) --------------------------------

async def probe_main(url: str) -> None:
    """Time GET /log/checkpoint every 100 ms and a signed publish every 500 ms until stdin closes.

    Prints "ready", then one JSON line per request: [kind, start (time.monotonic), seconds, error or null].
    """
    key = Ed25519Signer.generate("prober")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def emit(kind: str, start: float, error: str | None) -> None:
        print(json.dumps([kind, start, time.monotonic() - start, error]), flush=True)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        api = RegistryClient(url, session)
        await api.publish(key, PackageRef("probe", "m", "0.0.0"), module_variant(0))  # claims the namespace
        print("ready", flush=True)

        async def every(period: float, kind: str, request: Callable[[int], Awaitable[None]]) -> None:
            n = 1
            while not stop.is_set():
                start = time.monotonic()
                try:
                    await request(n)
                    emit(kind, start, None)
                except (aiohttp.ClientError, TimeoutError, RegistryError) as e:
                    emit(kind, start, f"{type(e).__name__}: {e}"[:200])
                n += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, start + period - time.monotonic()))

        async def checkpoint(_: int) -> None:
            await api.get("/log/checkpoint")

        async def publish(n: int) -> None:
            await api.publish(key, PackageRef("probe", "m", f"1.0.{n}"), module_variant(n))

        async def until_eof() -> None:
            await stdin.read()
            stop.set()

        await asyncio.gather(every(0.1, "checkpoint", checkpoint), every(0.5, "publish", publish), until_eof())


class Probe:
    """The probe process and the events it reported: (kind, start, seconds, error)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[tuple[str, float, float, str | None]] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, url: str) -> Probe:
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--probe", url,
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line != b"ready\n":
            raise SystemExit(f"the probe did not start: {line!r}")
        probe = cls(proc)
        probe._reader = asyncio.create_task(probe._read())
        return probe

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            kind, start, seconds, error = json.loads(line)
            self.events.append((kind, start, seconds, error))

    async def stop(self) -> None:
        """Let the requests in flight finish and collect them."""
        assert self.proc.stdin is not None and self._reader is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self._reader, 40)
        await self.proc.wait()

    def window(self, start: float, end: float) -> dict[str, object]:
        """The requests that overlapped [start, end]: count, worst latency, failures."""
        out: dict[str, object] = {}
        for kind in ("checkpoint", "publish"):
            evs = [(s, e) for k, t, s, e in self.events if k == kind and t <= end and t + s >= start]
            ok = [s for s, e in evs if e is None]
            errors = Counter(e.split(":")[0] for _, e in evs if e is not None)
            out[kind] = {"count": len(evs), "ok": len(ok), "worst_ms": round(max(ok, default=0.0) * 1000, 1),
                         "failures": sum(errors.values()), **({"errors": dict(errors)} if errors else {})}
        return out


# --- raw HTTP -----------------------------------------------------------------------------------

async def raw(port: int, head: str, body: bytes = b"", timeout: float = 30) -> str:
    """Send raw bytes; return the response status ("closed" if the connection closed without one)."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        w.write(head.encode() + b"\r\n" + body)
        with contextlib.suppress(ConnectionError):
            await w.drain()
        async with asyncio.timeout(timeout):
            line = await r.readline()
        return line.split()[1].decode() if line else "closed"
    except ConnectionError:
        return "reset"
    except TimeoutError:
        return "no answer"
    except IndexError:
        return "garbage"
    finally:
        w.close()


def post(path: str, length: int, *headers: str) -> str:
    return "".join(f"{h}\r\n" for h in (f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", *headers))


Conns = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def closed_within(conns: Conns, seconds: float) -> Counter[str]:
    """Wait for the server to close each connection; count them by the status line they got first."""
    async def one(r: asyncio.StreamReader) -> str:
        try:
            async with asyncio.timeout(seconds):
                data = b""
                while chunk := await r.read(4096):
                    data += chunk
                return data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "closed"
        except ConnectionError:
            return "reset"
        except TimeoutError:
            return "still open"

    return Counter(await asyncio.gather(*(one(r) for r, _ in conns)))


async def connect(port: int, n: int) -> Conns:
    out = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            out.append(await asyncio.open_connection("127.0.0.1", port))
    return out


def close_all(conns: Conns) -> None:
    for _, w in conns:
        w.close()


# --- the network --------------------------------------------------------------------------------

async def start_network(args: argparse.Namespace, data: pathlib.Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_ports(4)  # the registry and, on the next three ports, its witnesses
    url = f"http://127.0.0.1:{port}"
    t = str(args.timeouts)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wasmlog", "up", "--data", str(data), "--listen", f"127.0.0.1:{port}",
        "--header-timeout", t, "--body-timeout", t, "--write-timeout", t, "--max-connections", str(args.max_connections),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/log/checkpoint") as r:
                    if r.status == 200 and (data / "trust-policy.toml").exists():
                        return proc, url
            if time.monotonic() > deadline or proc.returncode is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise SystemExit(f"wasmlog up did not come up: {(await proc.communicate())[1].decode()[-2000:]}")
            await asyncio.sleep(0.1)


def witness_urls(data: pathlib.Path) -> list[str]:
    """The witnesses' URLs, from the edge trust policy `wasmlog up` wrote."""
    policy = parse_policy(tomllib.loads((data / "trust-policy.toml").read_text())["tlog_policy"].encode())
    return [w.url.rstrip("/") for w in policy.witnesses.values() if w.url]


def log_list_qpd(data: pathlib.Path, origin: str) -> tuple[int | None, str]:
    """The qpd the witnesses' log list (a logs/v0 file in the data directory) gives origin, and where it was found.

    (bench/witness.py shadows the witness package here, so the list is read by hand: blocks start at
    a vkey line; the origin is the key's name unless an origin line says otherwise.)
    """
    for path in sorted(data.rglob("*")):
        with contextlib.suppress(OSError, ValueError):
            if not (path.is_file() and path.stat().st_size < 1 << 20 and path.read_bytes().startswith(b"logs/v0\n")):
                continue
            blocks: list[dict[str, str]] = []
            for line in path.read_text().splitlines()[1:]:
                key, _, value = line.partition(" ")
                if key == "vkey":
                    blocks.append({"origin": value.split("+", 1)[0]})
                if blocks and key in ("origin", "qpd"):
                    blocks[-1][key] = value
            for b in blocks:
                if b["origin"] == origin and "qpd" in b:
                    return int(b["qpd"]), str(path.relative_to(data))
    return None, "no logs/v0 file in the data directory (wasmlog up builds its witnesses' log list in memory)"


async def witness_counters(session: aiohttp.ClientSession, url: str) -> Counter[str]:
    """The witness's add-checkpoint refusal and rate-limit counters, from its /metrics."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        for metric, label in (("wasmlog_witness_rate_limited_requests_total", "scope"), ("wasmlog_witness_refused_requests_total", "status")):
            if line.startswith(metric + "{"):
                value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
                out[f"{metric.removeprefix('wasmlog_witness_').removesuffix('_total')} {value}"] += int(float(line.rsplit(" ", 1)[1]))
    return out


# --- the run ------------------------------------------------------------------------------------

Outcome = tuple[Counter[str], dict[str, object]]


@dataclass
class Attack:
    name: str
    run: Callable[[], Awaitable[Outcome]]
    accepted: frozenset[str]  # the outcomes that mean "refused as documented"
    budget_s: float
    repeat: bool = False  # a quick attack: repeated for --sustain seconds, so the probe sees it under way
    control: bool = False  # a legitimate request for comparison: not an attack
    result: dict[str, object] = field(default_factory=dict)


async def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="wasmlog-abuse-") as d:
        return await run_in(args, pathlib.Path(d))


async def run_in(args: argparse.Namespace, data: pathlib.Path) -> dict[str, object]:
    t = args.timeouts
    proc, url = await start_network(args, data)
    port = int(url.rsplit(":", 1)[1])
    rss: list[tuple[float, int]] = []
    probe: Probe | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=64)) as session:
            api = RegistryClient(url, session)
            witnesses = witness_urls(data)
            public_checkpoint = await api.get("/log/checkpoint")
            origin = public_checkpoint.split(b"\n", 1)[0].decode()
            qpd, qpd_source = log_list_qpd(data, origin)

            alice, bob = Ed25519Signer.generate("alice"), Ed25519Signer.generate("bob")  # alice owns acme; bob has no grant
            big_ref = PackageRef("acme", "big", "1.0.0")
            await api.publish(alice, big_ref, with_custom_section(b"blob", bytes(args.module_mib * MIB)))
            await api.publish(alice, PackageRef("acme", "warm", "1.0.0"), module_variant(1), sbom(10, 10), CDX)  # starts the SBOM worker
            module_path = api.package_path(big_ref) + "/module.wasm"

            # Every payload is built before the clock starts.
            bomb = gzip_bomb(1024)
            tag_bomb = cbor2.dumps(cbor2.CBORTag(36, "Content-Type: multipart/mixed; boundary=b\n\n" + "--b\n\nx\n" * 300_000))
            medium = sbom(1500, 1500)
            ungranted_sboms = [signed_release(bob, PackageRef("acme", "m", f"1.0.{i}"), module_variant(10 + i), medium) for i in range(6)]
            huge_sbom = signed_release(alice, PackageRef("acme", "m", "2.0.0"), module_variant(20), sbom(4000, 4000))
            big = with_custom_section(b"blob", bytes(48 * MIB))
            ungranted_bigs = [signed_release(bob, PackageRef("acme", "m", f"3.0.{i}"), big, None) for i in range(3)]
            control = signed_release(alice, PackageRef("acme", "m", "4.0.0"), module_variant(40), sbom(1000, 1000))

            async def publish(rel: SignedRelease, notes: dict[str, object]) -> str:
                try:
                    await api.publish_signed(rel.signer.vkey, rel.envelope, rel.module, rel.sbom)
                    return "200"
                except RegistryError as e:
                    notes.setdefault(f"{e.status} message", str(e)[:160])
                    return str(e.status)

            async def publishes(rels: list[SignedRelease]) -> Outcome:
                notes: dict[str, object] = {}
                return Counter(await asyncio.gather(*(publish(r, notes) for r in rels))), notes

            async def bombs() -> Outcome:
                heads = [post("/api/v1/records", len(bomb), "Content-Encoding: gzip", "Content-Type: application/json"),
                         post("/api/v1/publish", len(bomb), "Content-Encoding: gzip", "Content-Type: application/cbor"),
                         post("/log/checkpoint", len(bomb), "Content-Encoding: gzip")]
                return Counter(await asyncio.gather(*(raw(port, heads[i % 3], bomb) for i in range(6)))), {}

            async def many(head: str, body: bytes, n: int = 20) -> Outcome:
                return Counter(await asyncio.gather(*(raw(port, head, body) for _ in range(n)))), {}

            junk = b"\x1f\x8b\x08\x00" + b"junk" * 100
            deep = b"[" * 30000 + b"]" * 30000
            get_body = bytes(MIB)

            async def slow_heads() -> Outcome:
                conns = await connect(port, args.conns)
                for _, w in conns:
                    w.write(b"GET /log/checkpoint HTTP/1.1\r\nHost: ")
                got = await closed_within(conns, t + 10)
                close_all(conns)
                return got, {}

            async def trickled_bodies() -> Outcome:
                conns = await connect(port, args.conns)
                for _, w in conns:
                    w.write(post("/api/v1/records", 60000).encode() + b"\r\n{")

                async def trickle() -> None:
                    while True:
                        await asyncio.sleep(0.5)
                        for _, w in conns:
                            if not w.is_closing():
                                with contextlib.suppress(ConnectionError, RuntimeError):
                                    w.write(b" ")

                dripping = asyncio.create_task(trickle())
                got = await closed_within(conns, t + 10)
                dripping.cancel()
                close_all(conns)
                return got, {}

            async def connection_flood() -> Outcome:
                conns = await connect(port, args.max_connections + 200)
                closing = asyncio.create_task(closed_within(conns, t + 2))  # over the cap: 503 at once; the rest closed by the header timeout
                async with aiohttp.ClientSession() as fresh, fresh.get(url + "/log/checkpoint") as r:  # a newcomer, during
                    during = r.status
                got = await closing
                close_all(conns)
                await asyncio.sleep(0.3)
                async with aiohttp.ClientSession() as fresh, fresh.get(url + "/log/checkpoint") as r:  # a newcomer, after
                    got[f"newcomer {r.status}"] += 1
                return got, {"newcomer_during_flood": during}

            async def non_reading_downloads() -> Outcome:
                socks = []
                for _ in range(20):
                    s = socket.socket()
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    s.connect(("127.0.0.1", port))
                    s.sendall(f"GET {module_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    s.setblocking(False)
                    socks.append(s)
                await asyncio.sleep(t + 2)  # the write timeout cuts them off; their unread data stays in our buffers
                loop = asyncio.get_running_loop()
                got: Counter[str] = Counter()
                for s in socks:
                    total = 0
                    try:
                        async with asyncio.timeout(5):
                            while chunk := await loop.sock_recv(s, 1 << 16):
                                total += len(chunk)
                        got["closed"] += 1
                    except ConnectionError:
                        got["reset"] += 1
                    except TimeoutError:
                        got["still open"] += 1
                    finally:
                        s.close()
                    got["complete" if total >= args.module_mib * MIB else "cut off"] += 1
                return got, {}

            async def raw_cbor(body: bytes) -> Outcome:
                async with session.post(url + "/api/v1/publish", data=body, headers={"Content-Type": "application/cbor"}) as r:
                    return Counter([str(r.status)]), {"message": (await r.text())[:160]}

            async def witness_replays() -> Outcome:
                """The log's public checkpoint, with a wrong old size, to every witness, then a timed legitimate publish."""
                checkpoint = await api.get("/log/checkpoint")
                path = "/" + hashlib.sha256(origin.encode()).hexdigest() + "/checkpoint"
                per_witness = min(3 * qpd, REPLAY_CAP) if qpd is not None else args.replays
                before = [await witness_counters(session, w) for w in witnesses]
                bodies = []
                for w in witnesses:
                    async with session.get(w + path) as r:
                        size = int((await r.read()).split(b"\n")[1]) if r.status == 200 else 0
                    bodies.append((w, f"old {0 if size else 1}\n\n".encode() + checkpoint))  # never the witness's size: 409
                sem = asyncio.Semaphore(16)

                async def replay(w: str, body: bytes) -> str:
                    async with sem:
                        try:
                            async with session.post(w + "/add-checkpoint", data=body) as r:
                                await r.read()
                                return str(r.status)
                        except aiohttp.ClientError as e:
                            return type(e).__name__

                got = Counter(await asyncio.gather(*(replay(w, b) for w, b in bodies for _ in range(per_witness))))
                after = [await witness_counters(session, w) for w in witnesses]
                start = time.monotonic()
                notes: dict[str, object] = {}
                status = await publish(signed_release(alice, PackageRef("acme", "after-replays", "1.0.0"), module_variant(50)), notes)
                return got, {
                    "replays_per_witness": per_witness, "log_qpd": qpd, "qpd_source": qpd_source,
                    "replays_over_qpd": None if qpd is None else per_witness > qpd,
                    "witness_counter_deltas": [{k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)} for b, a in zip(before, after, strict=True)],
                    "log_scope_429s": sum(a.get("rate_limited_requests log", 0) - b.get("rate_limited_requests log", 0) for b, a in zip(before, after, strict=True)),
                    "publish_after": {"status": status, "seconds": round(time.monotonic() - start, 3), **notes},
                }

            attacks = [
                Attack("gzip bombs (6 x 1 GiB)", bombs, frozenset({"413", "415", "405"}), 5, repeat=True),
                Attack("invalid gzip (20)", lambda: many(post("/api/v1/records", len(junk), "Content-Encoding: gzip"), junk),
                       frozenset({"400"}), 3, repeat=True),
                Attack("nested JSON (20)", lambda: many(post("/api/v1/records", len(deep)), deep), frozenset({"400", "413"}), 3, repeat=True),
                Attack("GET with 1 MiB body (20)", lambda: many(f"GET /log/checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: {len(get_body)}\r\n", get_body),
                       frozenset({"413"}), 3, repeat=True),
                Attack(f"slow request heads ({args.conns})", slow_heads, frozenset({"closed", "reset", "408"}), t + 2),
                Attack(f"trickled bodies ({args.conns})", trickled_bodies, frozenset({"408", "closed", "reset"}), t + 2),
                Attack(f"connection flood ({args.max_connections + 200}, cap {args.max_connections})", connection_flood,
                       frozenset({"503", "closed", "reset", "newcomer 200"}), t + 3),
                Attack(f"non-reading downloads of {args.module_mib} MiB (20)", non_reading_downloads,
                       frozenset({"closed", "reset", "cut off"}), t + 2 + 3),
                Attack(f"CBOR tag 36 (MIME) bomb, {mb(len(tag_bomb))} MB", lambda: raw_cbor(tag_bomb), frozenset({"400"}), 2, repeat=True),
                Attack("6 ungranted publishes, SBOM of 1,500 components", lambda: publishes(ungranted_sboms), frozenset({"403"}), 3, repeat=True),
                Attack("1 signed publish, SBOM of 4,000 components", lambda: publishes([huge_sbom]), frozenset({"413", "422"}), 3, repeat=True),
                Attack("3 ungranted 48 MiB modules at once", lambda: publishes(ungranted_bigs), frozenset({"403"}), 5, repeat=True),
                Attack("witness add-checkpoint replays with a wrong old size", witness_replays, frozenset({"409", "429"}), 15),
                Attack("control: 1 signed publish, SBOM of 1,000 components (the limit)", lambda: publishes([control]),
                       frozenset({"200"}), 20, control=True),
            ]

            probe = await Probe.start(url)

            async def sample() -> None:
                while True:
                    rss.append((time.monotonic(), tree_rss(proc.pid)))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            await asyncio.sleep(1.0)  # a quiet second: the probe's baseline
            quiet_end = time.monotonic()

            for attack in attacks:
                baseline = tree_rss(proc.pid)
                main_baseline = proc_status(proc.pid, "VmRSS")
                hwm = reset_hwm(proc.pid)
                start = time.monotonic()
                outcomes: Counter[str] = Counter()
                notes: dict[str, object] = {}
                rounds, slowest = 0, 0.0
                while not rounds or (attack.repeat and time.monotonic() < start + args.sustain):
                    round_start = time.monotonic()
                    got, said = await attack.run()
                    slowest = max(slowest, time.monotonic() - round_start)
                    outcomes.update(got)
                    notes = notes or said
                    rounds += 1
                end = time.monotonic()
                main_hwm = proc_status(proc.pid, "VmHWM") if hwm else None
                await asyncio.sleep(0.5)  # a probe of the aftermath, and time for memory to be given back
                while tree_rss(proc.pid) > baseline + NEAR_BASELINE_MB * MIB and time.monotonic() < end + SETTLE_S:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # polling a process's memory: no event to wait on
                after, settled = tree_rss(proc.pid), time.monotonic()
                peak = max([r for ts, r in rss if start <= ts <= end] + [baseline, after])
                growth = max(peak - baseline, (main_hwm - main_baseline) if main_hwm is not None else 0)
                attack.result = {
                    "attack": attack.name, **({"control": True} if attack.control else {}),
                    "outcomes": dict(outcomes), "expected": sorted(attack.accepted),
                    "rounds": rounds, "seconds": round(end - start, 2), "slowest_round_s": round(slowest, 2), "budget_s": attack.budget_s,
                    "refused_as_expected": set(outcomes) <= attack.accepted and slowest <= attack.budget_s,
                    "window": [round(start - quiet_end, 2), round(settled - quiet_end, 2)],
                    "rss_baseline_mb": mb(baseline), "rss_peak_mb": mb(peak),
                    "main_hwm_growth_mb": mb(max(0, main_hwm - main_baseline)) if main_hwm is not None else None,
                    "rss_growth_mb": mb(growth), "rss_after_mb": mb(after), **notes,
                }
                attack.result["_span"] = (start, settled)

            yanks = await yank_page(api, args.yanks)
            sampler.cancel()
            await probe.stop()
            quiet = probe.window(quiet_end - 1.0, quiet_end)
            for attack in attacks:
                attack.result["probe"] = probe.window(*attack.result.pop("_span"))  # type: ignore[misc]
    finally:
        if probe is not None and probe.proc.returncode is None:
            probe.proc.kill()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    results = [a.result for a in attacks]
    return {
        "machine": {"load_average_at_end": os.getloadavg(), "cpus": os.cpu_count()},
        "settings": {"timeouts_s": t, "max_connections": args.max_connections, "conns": args.conns, "module_mib": args.module_mib},
        "targets": targets(results, yanks),
        "probe_quiet_second": quiet,
        "attacks": results,
        "actions_page": yanks,
    }


async def yank_page(api: RegistryClient, n: int) -> dict[str, object]:
    """Publish and yank n versions in one namespace; the size of its first /actions page (finding 7)."""
    key = Ed25519Signer.generate("yanker")
    start = time.monotonic()
    await api.claim_if_unclaimed(key, "yanks")
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        ref = PackageRef("yanks", "m", f"1.0.{i}")
        async with sem:
            rel = release_statement(ref, module_variant(1000 + i), None, None)
            await api.publish_signed(key.vkey, sign_envelope(INTOTO_PAYLOAD_TYPE, rel.statement(), key).to_json(), module_variant(1000 + i))
            await api.act(key, Action("yank", "yanks", name="m", version=ref.version, issued=int(time.time())))

    await asyncio.gather(*(one(i) for i in range(n)))
    setup = time.monotonic() - start
    body = await api.get("/api/v1/namespaces/yanks/actions")
    page = json.loads(body)
    return {"yanks": n, "setup_seconds": round(setup, 1), "first_page_bytes": len(body), "first_page_proofs": len(page["proofs"]),
            "next": page["next"], "all_pages_proofs": len(await api.actions("yanks"))}


def targets(results: list[dict[str, object]], yanks: dict[str, object]) -> dict[str, object]:
    """The issue's targets, each with its verdict and the numbers behind it."""
    attacks = [r for r in results if not r.get("control")]

    def worst(rows: list[dict[str, object]], value: Callable[[dict[str, object]], float]) -> tuple[float, str]:
        row = max(rows, key=value)
        return value(row), str(row["attack"])

    def probe(kind: str, key: str) -> Callable[[dict[str, object]], float]:
        return lambda r: float(r["probe"][kind][key])  # type: ignore[index]

    cp_ms, cp_at = worst(results, probe("checkpoint", "worst_ms"))
    pub_ms, pub_at = worst(results, probe("publish", "worst_ms"))
    growth, growth_at = worst(results, lambda r: float(r["rss_growth_mb"]))  # type: ignore[arg-type]
    residue, residue_at = worst(results, lambda r: float(r["rss_after_mb"]) - float(r["rss_baseline_mb"]))  # type: ignore[arg-type]
    failures = {str(r["attack"]): r["probe"]["publish"]["failures"] for r in results if r["probe"]["publish"]["failures"]}  # type: ignore[index]
    no_success = [str(r["attack"]) for r in results if not r["probe"]["publish"]["ok"]]  # type: ignore[index]
    overall = float(results[-1]["rss_after_mb"]) - float(results[0]["rss_baseline_mb"])  # type: ignore[arg-type]
    replay = next(r for r in results if "replays_per_witness" in r)
    client_limited = [int(d.get("rate_limited_requests client", 0)) for d in replay["witness_counter_deltas"]]  # type: ignore[attr-defined]
    after = replay["publish_after"]
    out: dict[str, object] = {
        "every_attack_refused_within_budget": {
            "pass": all(r["refused_as_expected"] for r in attacks),
            "failing": {str(r["attack"]): {"outcomes": r["outcomes"], "slowest_round_s": r["slowest_round_s"], "budget_s": r["budget_s"]}
                        for r in attacks if not r["refused_as_expected"]},
        },
        "probe_checkpoint_worst_under_1s": {"pass": cp_ms < PROBE_LIMIT_S * 1000, "worst_ms": cp_ms, "during": cp_at,
                                            "failures": sum(int(r["probe"]["checkpoint"]["failures"]) for r in results)},  # type: ignore[index,misc]
        "probe_publish_worst_under_1s": {"pass": pub_ms < PROBE_LIMIT_S * 1000, "worst_ms": pub_ms, "during": pub_at},
        "memory_growth_under_300mb": {"pass": growth < GROWTH_LIMIT_MB, "worst_growth_mb": growth, "during": growth_at},
        "memory_back_near_baseline": {"pass": residue <= NEAR_BASELINE_MB and overall <= NEAR_BASELINE_MB, "tolerance_mb": NEAR_BASELINE_MB,
                                      "within_s": SETTLE_S, "worst_after_minus_baseline_mb": round(residue, 1), "after": residue_at,
                                      "first_baseline_mb": results[0]["rss_baseline_mb"], "last_after_mb": results[-1]["rss_after_mb"]},
        "legitimate_publishes_succeed": {"pass": not failures and not no_success and all(r["refused_as_expected"] for r in results if r.get("control")),
                                         "probe_failures": failures, "attacks_without_a_successful_probe_publish": no_success},
        "witness_replays_spend_no_log_budget": {
            "pass": replay["log_scope_429s"] == 0 and all(client_limited) and after["status"] == "200" and after["seconds"] < PROBE_LIMIT_S,  # type: ignore[index,operator]
            "replays_per_witness": replay["replays_per_witness"], "client_scope_429s_per_witness": client_limited, "log_qpd": replay["log_qpd"], "replays_over_qpd": replay["replays_over_qpd"],
            "log_scope_429s": replay["log_scope_429s"], "publish_after": after,
        },
        "actions_first_page_bounded": {"pass": yanks["next"] is not None and int(yanks["first_page_bytes"]) < 637_000,  # type: ignore[call-overload]
                                       "first_page_bytes": yanks["first_page_bytes"], "yanks": yanks["yanks"]},
    }
    out["all_pass"] = all(bool(v["pass"]) for v in out.values() if isinstance(v, dict))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeouts", type=float, default=3.0, help="header, body and write timeouts given to the server")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--conns", type=int, default=200, help="connections per slow-client attack")
    p.add_argument("--module-mib", type=int, default=32, help="the module the non-reading clients download")
    p.add_argument("--sustain", type=float, default=2.0, help="seconds each quick attack is repeated for")
    p.add_argument("--replays", type=int, default=300, help="add-checkpoint replays per witness when the log's qpd is not known")
    p.add_argument("--yanks", type=int, default=400, help="yanks in the namespace whose /actions page is measured")
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # run as the probe process
    args = p.parse_args()
    if args.probe:
        asyncio.run(probe_main(args.probe))
        return
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
