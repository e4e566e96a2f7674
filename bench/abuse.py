"""Unauthenticated abuse against `wasmlog up` (issue 12, findings 4-6). Prints JSON.

    python bench/abuse.py [--timeouts 3] [--max-connections 256] [--conns 300]

Starts `wasmlog up` on a temporary directory (loopback only), with short header/body/write
timeouts so the run stays under a minute, then runs each attack in turn while a probe times
`GET /log/checkpoint` every 100 ms on a kept-alive connection and the server's resident memory
(VmRSS of the `wasmlog up` process) is sampled every 50 ms. For each attack: the statuses it got
(or how many of its connections the server closed), its duration, the probe's worst latency and
failures, and the RSS before, at peak and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
from common import free_port

from registry.client import RegistryClient
from registry.record import PackageRef
from tlog.note import Ed25519Signer

MIB = 1 << 20
BASE_MODULE = bytes.fromhex("0061736d01000000010401600000020b0103656e76036c6f670000")


def big_module(size: int) -> bytes:
    payload = b"\x04blob" + bytes(size)
    n, leb = len(payload), bytearray()
    while True:
        leb.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            break
    return BASE_MODULE + b"\x00" + bytes(leb) + payload


def gzip_bomb(mib: int) -> bytes:
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + segment * mib + end + struct.pack("<II", crc, (mib * MIB) & 0xFFFFFFFF)


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Monitor:
    """Probe latencies and RSS samples, with timestamps, while attacks run."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.probes: list[tuple[float, float | None]] = []  # (time, seconds or None on failure)
        self.rss: list[tuple[float, int]] = []

    async def probe(self, session: aiohttp.ClientSession) -> None:
        while True:
            start = time.monotonic()
            try:
                async with session.get(self.url + "/log/checkpoint") as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            self.probes.append((start, time.monotonic() - start if ok else None))
            await asyncio.sleep(0.1)

    async def sample(self) -> None:
        while True:
            self.rss.append((time.monotonic(), vm_rss(self.pid)))
            await asyncio.sleep(0.05)

    def window(self, start: float, end: float) -> dict[str, float | int]:
        probes = [p for t, p in self.probes if start <= t <= end]
        rss = [r for t, r in self.rss if start <= t <= end] or [vm_rss(self.pid)]
        return {
            "probe_count": len(probes),
            "probe_worst_ms": round(max((p for p in probes if p is not None), default=0.0) * 1000, 1),
            "probe_failures": sum(p is None for p in probes),
            "rss_before_mb": round(rss[0] / MIB, 1),
            "rss_peak_mb": round(max(rss) / MIB, 1),
            "rss_growth_mb": round((max(rss) - rss[0]) / MIB, 1),
        }


async def raw(port: int, head: str, body: bytes = b"", timeout: float = 30) -> int:
    """Send raw bytes; return the response status (0 if the connection closed without one)."""
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return -1
    try:
        w.write(head.encode() + b"\r\n" + body)
        with contextlib.suppress(ConnectionError):
            await w.drain()
        async with asyncio.timeout(timeout):
            line = await r.readline()
        return int(line.split()[1]) if line else 0
    except (ConnectionError, TimeoutError, IndexError, ValueError):
        return 0
    finally:
        w.close()


def post(path: str, length: int, *headers: str) -> str:
    return "".join(f"{h}\r\n" for h in (f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}", *headers))


async def closed_within(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], seconds: float) -> Counter[str]:
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


async def connect(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    out = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            out.append(await asyncio.open_connection("127.0.0.1", port))
    return out


async def run(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t = args.timeouts
    data = tempfile.mkdtemp(prefix="wasmlog-abuse-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasmlog", "up", "--data", data, "--listen", f"127.0.0.1:{port}",
         "--header-timeout", str(t), "--body-timeout", str(t), "--write-timeout", str(t),
         "--max-connections", str(args.max_connections)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    monitor = Monitor(url, proc.pid)
    results: list[dict[str, object]] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/log/checkpoint") as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise SystemExit(f"wasmlog up did not come up: {proc.communicate()[1].decode()[-2000:]}")
                await asyncio.sleep(0.1)
            key = Ed25519Signer.generate("abuser")
            module = big_module(args.module_mib * MIB)
            api = RegistryClient(url, session)
            ref = PackageRef("abuse", "big", "1.0.0")
            await api.publish(key, ref, module)
            module_path = api.package_path(ref) + "/module.wasm"
            del module
            tasks = [asyncio.create_task(monitor.probe(session)), asyncio.create_task(monitor.sample())]
            await asyncio.sleep(0.5)

            async def attack(name: str, body: Callable[[], Awaitable[Counter[str] | Counter[int]]]) -> None:
                start = time.monotonic()
                outcome = await body()
                await asyncio.sleep(0.3)  # let the server settle before the after-sample
                end = time.monotonic()
                window = monitor.window(start, end)
                window["rss_after_mb"] = round(vm_rss(proc.pid) / MIB, 1)
                results.append({"attack": name, "seconds": round(end - start - 0.3, 2),
                                "outcomes": {str(k): v for k, v in outcome.items()}, **window})

            bomb = gzip_bomb(1024)

            async def bombs() -> Counter[int]:
                heads = [post("/api/v1/records", len(bomb), "Content-Encoding: gzip", "Content-Type: application/json"),
                         post("/api/v1/publish", len(bomb), "Content-Encoding: gzip", "Content-Type: application/cbor"),
                         post("/log/checkpoint", len(bomb), "Content-Encoding: gzip")]
                return Counter(await asyncio.gather(*(raw(port, heads[i % 3], bomb) for i in range(6))))

            async def invalid_gzip() -> Counter[int]:
                junk = b"\x1f\x8b\x08\x00" + b"junk" * 100
                return Counter(await asyncio.gather(*(raw(port, post("/api/v1/records", len(junk), "Content-Encoding: gzip"), junk)
                                                      for _ in range(20))))

            async def nested_json() -> Counter[int]:
                deep = b"[" * 30000 + b"]" * 30000
                return Counter(await asyncio.gather(*(raw(port, post("/api/v1/records", len(deep)), deep) for _ in range(20))))

            async def get_with_body() -> Counter[int]:
                body = bytes(MIB)
                head = f"GET /log/checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                return Counter(await asyncio.gather(*(raw(port, head, body) for _ in range(20))))

            async def slow_headers() -> Counter[str]:
                conns = await connect(port, args.conns)
                for _, w in conns:
                    w.write(b"GET /log/checkpoint HTTP/1.1\r\nHost: ")
                got = await closed_within(conns, t + 10)
                for _, w in conns:
                    w.close()
                return got

            async def trickled_bodies() -> Counter[str]:
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
                for _, w in conns:
                    w.close()
                return got

            async def connection_flood() -> Counter[str]:
                conns = await connect(port, args.max_connections + 200)
                got = await closed_within(conns, 2)  # the ones over the cap are answered 503 at once
                for _, w in conns:
                    w.close()
                await asyncio.sleep(0.3)
                async with aiohttp.ClientSession() as fresh, fresh.get(url + "/log/checkpoint") as r:  # a newcomer, after
                    got[f"newcomer {r.status}"] += 1
                return got

            async def non_reading_downloads() -> Counter[str]:
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
                return got

            for name, body in [("gzip bombs (6 x 1 GiB)", bombs), ("invalid gzip (20)", invalid_gzip),
                               ("nested JSON (20)", nested_json), ("GET with 1 MiB body (20)", get_with_body),
                               (f"slow request heads ({args.conns})", slow_headers),
                               (f"trickled bodies ({args.conns})", trickled_bodies),
                               (f"connection flood ({args.max_connections + 200})", connection_flood),
                               (f"non-reading downloads of {args.module_mib} MiB (20)", non_reading_downloads)]:
                await attack(name, body)  # type: ignore[arg-type]
            for task in tasks:
                task.cancel()
    finally:
        proc.terminate()
        proc.wait(20)
    return {"timeouts_s": t, "max_connections": args.max_connections, "attacks": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeouts", type=float, default=3.0, help="header, body and write timeouts given to the server")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--conns", type=int, default=200, help="connections per slow-client attack")
    p.add_argument("--module-mib", type=int, default=32)
    print(json.dumps(asyncio.run(run(p.parse_args())), indent=1))


if __name__ == "__main__":
    main()
