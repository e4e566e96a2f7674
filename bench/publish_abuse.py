"""Abusive publishes against `wasmlog registry serve` (one process), each while a probe times
GET /log/checkpoint. Prints one JSON line per attack (issue 12, findings 2-4, the publish path).

    python bench/publish_abuse.py

Attacks: a CBOR tag-36 (MIME) bomb; six ungranted publishes with a 1,500-component SBOM; a signed
publish with a 4,000-component SBOM; three concurrent ungranted 48 MiB modules (peak RSS of the
server, VmHWM); and, for comparison, one valid signed publish with an SBOM at the limits.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp
import cbor2
from common import free_port

from registry.client import RegistryClient, RegistryError
from registry.dsse import INTOTO_PAYLOAD_TYPE, sign_envelope
from registry.record import Release, module_digest, parse_package_ref
from tlog.note import Ed25519Signer

MODULE = b"\x00asm\x01\x00\x00\x00"
CDX = "application/vnd.cyclonedx+json"


def sbom(components: int, dependencies: int) -> bytes:
    return json.dumps({"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
                       "components": [{"type": "library", "name": f"c{i}", "version": "1.0.0", "bom-ref": f"r{i}"} for i in range(components)],
                       "dependencies": [{"ref": f"r{i % components}", "dependsOn": [f"r{(i + 1) % components}"]} for i in range(dependencies)]}).encode()


def envelope(signer: Ed25519Signer, ref: str, module: bytes, sbom_bytes: bytes | None) -> bytes:
    release = Release(parse_package_ref(ref), module_digest(module), (), None if sbom_bytes is None else module_digest(sbom_bytes),
                      None if sbom_bytes is None else CDX)
    return sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer).to_json()


PROBE = """
import select, sys, time, urllib.request
urllib.request.urlopen(sys.argv[1] + "/log/checkpoint").read()
print("ready", flush=True)
worst = 0.0
while True:
    t = time.perf_counter()
    urllib.request.urlopen(sys.argv[1] + "/log/checkpoint").read()
    worst = max(worst, time.perf_counter() - t)
    if select.select([sys.stdin], [], [], 0.02)[0]:
        break
print(round(worst, 3))
"""


def start_probe(url: str) -> subprocess.Popen[str]:
    """A process that times GET /log/checkpoint every 20 ms until its stdin closes, then prints the worst."""
    probe = subprocess.Popen([sys.executable, "-c", PROBE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert probe.stdout is not None and probe.stdout.readline() == "ready\n"
    return probe


def stop_probe(probe: subprocess.Popen[str]) -> float:
    out, _ = probe.communicate("", timeout=60)
    return float(out)


def rss_mb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field))


def start_registry() -> tuple[subprocess.Popen[bytes], str]:
    """`wasmlog registry serve` (one process) on a fresh data directory; the process and its URL."""
    tmp = tempfile.mkdtemp()
    key = Ed25519Signer.generate("registry.example/abuse")
    with open(f"{tmp}/key", "w") as f:
        f.write(key.private_key + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wasmlog", "registry", "serve", "--data", f"{tmp}/data", "--key", f"{tmp}/key",
                             "--listen", f"127.0.0.1:{port}", "--interval-ms", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def main() -> None:
    proc, url = start_registry()
    alice, bob = Ed25519Signer.generate("alice"), Ed25519Signer.generate("bob")
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.get(url + "/log/checkpoint") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)
            api = RegistryClient(url, session)
            await api.claim_if_unclaimed(alice, "acme")

            async def attack(name: str, run: Callable[[], Awaitable[object]]) -> None:
                prober = await asyncio.to_thread(start_probe, url)  # its own process: this one is busy sending the attack
                t = time.perf_counter()
                result = await run()
                seconds = time.perf_counter() - t
                worst = await asyncio.to_thread(stop_probe, prober)
                print(json.dumps({"attack": name, "seconds": round(seconds, 3), "probe_worst_s": worst, "result": result}), flush=True)

            async def publish(signer: Ed25519Signer, ref: str, module: bytes, sbom_bytes: bytes | None) -> object:
                try:
                    return len(await api.publish_signed(signer.vkey, envelope(signer, ref, module, sbom_bytes), module, sbom_bytes))
                except RegistryError as e:
                    return [e.status, str(e)[:120]]

            async def tag_bomb() -> object:
                body = cbor2.dumps(cbor2.CBORTag(36, "Content-Type: multipart/mixed; boundary=b\n\n" + "--b\n\nx\n" * 300_000))
                async with session.post(url + "/api/v1/publish", data=body, headers={"Content-Type": "application/cbor"}) as r:
                    return r.status

            await attack("CBOR tag 36 (MIME multipart), 2.1 MB", tag_bomb)
            medium = sbom(1500, 1500)
            await attack("6 ungranted publishes, SBOM of 1,500 components", lambda: asyncio.gather(
                *(publish(bob, f"acme:m@1.0.{i}", MODULE, medium) for i in range(6))))
            await attack("1 signed publish, SBOM of 4,000 components", lambda: publish(alice, "acme:m@2.0.0", MODULE, sbom(4000, 4000)))
            big = MODULE + b"\x00" * (48 << 20)
            base = rss_mb(proc.pid, "VmRSS")

            async def big_modules() -> object:
                return {"answers": await asyncio.gather(*(publish(bob, "acme:m@3.0.0", big, None) for _ in range(3))),
                        "rss_before_mb": base, "rss_peak_mb": rss_mb(proc.pid, "VmHWM"), "rss_after_mb": rss_mb(proc.pid, "VmRSS")}

            await attack("3 ungranted 48 MiB modules at once", big_modules)
            await attack("1 valid signed publish, SBOM of 1,000 components (the limit)",
                         lambda: publish(alice, "acme:m@4.0.0", MODULE, sbom(1000, 1000)))
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    asyncio.run(main())
