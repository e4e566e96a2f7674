"""A verifying mirror: copy a registry's log and blobs, check everything, serve the same read API.

Each round fetches the source's checkpoint (verified against the trust policy: log
signature and witness quorum), every new entry bundle and tile (each hash recomputed by
the Follower), and every new release's module and SBOM (digests and imports checked).
Only when all of that holds does it append the entries locally, with the source's cosigned
checkpoint, in one transaction. Anything that does not verify stops the mirror where it is.
A round that fails for any other reason (the source unreachable or answering errors) is
retried after a capped exponential backoff with jitter; /mirror/status says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pathlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tlog.client import FetchError, TileClient, failure_kind
from tlog.errors import ProofError, TlogError
from tlog.log import Log
from tlog.merkle import check_extends
from tlog.sequencer import Sequencer
from tlog.storage.lmdb_store import LMDBLogStore

from .blobs import BlobStore
from .client import RegistryClient
from .follow import Finding, Follower, FollowState
from .record import (
    ImportsMismatch,
    ModuleDigestMismatch,
    Release,
    check_module,
    decode_entry,
)
from .service import Registry
from .trust_policy import TrustPolicy, VerifyError, open_checkpoint

logger = logging.getLogger("wasmlog.mirror")
MAX_BACKOFF = 600.0  # seconds: the longest wait between failed rounds


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": the n-th failure in a row waits in [d/2, d], d = min(cap, base * 2**(n-1))."""

    base: float
    cap: float = MAX_BACKOFF
    jitter: Callable[[], float] = random.random  # uniform in [0, 1)

    def delay(self, failures: int) -> float:
        d = min(self.cap, self.base * 2.0 ** min(failures - 1, 62))
        return d / 2 + d / 2 * self.jitter()


@dataclass
class Retry:
    """Why the last rounds failed, for /mirror/status; attempts is the count of failures in a row."""

    attempts: int = 0
    last_error: str | None = None
    error_kind: str | None = None  # tlog.client.failure_kind: unreachable, bad-response, internal
    next_retry: float | None = None  # POSIX seconds

    def as_json(self) -> dict[str, object]:
        return {"attempts": self.attempts, "last_error": self.last_error, "error_kind": self.error_kind, "next_retry": self.next_retry}


@dataclass
class Mirror:
    source: str  # the source registry's URL
    policy: TrustPolicy
    log: Log
    sequencer: Sequencer
    registry: Registry
    blobs: BlobStore
    stopped: str | None = None  # why the mirror refuses to advance, if it does
    findings: list[Finding] = field(default_factory=list)
    retry: Retry = field(default_factory=Retry)

    async def round(self, session: aiohttp.ClientSession, now: int) -> int:
        """Copy up to the source's latest checkpoint; return the local size. Sets stopped on a failure."""
        if self.stopped:
            return self.log.published.checkpoint.size
        tiles = TileClient(self.source.rstrip("/") + "/log", session)
        api = RegistryClient(self.source, session)
        note = await tiles.checkpoint()
        try:
            cp, _, _, _ = open_checkpoint(note, self.policy, now)
        except VerifyError as e:
            return self._stop(f"source checkpoint refused: {e.reason}: {e}")
        local = self.log.published.checkpoint
        if cp.size == local.size:
            try:
                check_extends(local.size, local.root_hash, cp.size, cp.root_hash, ())
            except ProofError:
                return self._stop("the source shows a different tree at our size: a fork")
            return local.size
        follower = Follower(tiles, [self.log.verifier], FollowState(local.size, self.log.state.compact_hashes))
        entries: list[bytes] = []
        async for _, entry in follower.entries(cp):
            entries.append(entry)
        if follower.findings and all(f.kind == "fetch-failed" for f in follower.findings):
            raise FetchError(f"source tiles: {follower.findings[0].message} ({follower.findings[0].where})")  # retried, not a verdict
        if follower.findings:
            self.findings.extend(follower.findings)
            return self._stop(f"source tiles do not verify: {follower.findings[0].kind} at {follower.findings[0].where}")
        for entry in entries:
            refused = await self._copy_blobs(api, entry)
            if refused is not None:
                return self._stop(refused)
        indexes, _ = await asyncio.to_thread(self.log.integrate, entries, note=note)
        for listener in self.sequencer.on_integrated:
            listener(entries, indexes)
        return self.log.published.checkpoint.size

    async def _copy_blobs(self, api: RegistryClient, entry: bytes) -> str | None:
        """Fetch and check a release's module and SBOM; return why they are refused, or None once stored."""
        try:
            record = decode_entry(entry)
        except TlogError:  # not ours to judge: the registry replay reports void records
            return None
        release = record.body
        if not isinstance(release, Release):
            return None
        path = api.package_path(release.ref)
        module = await api.get(path + "/module.wasm")
        try:
            check_module(release, module)
        except ModuleDigestMismatch:
            return f"{release.ref}: the source serves a module that is not the logged one"
        except ImportsMismatch:
            return f"{release.ref}: the module's imports are not the logged ones"
        blobs = [module]
        if release.sbom_sha256 is not None:
            sbom = await api.get(path + "/sbom")
            if hashlib.sha256(sbom).hexdigest() != release.sbom_sha256:
                return f"{release.ref}: the source serves an SBOM that is not the logged one"
            blobs.append(sbom)
        for blob in blobs:
            await asyncio.to_thread(self.blobs.put, blob)
        return None

    def _stop(self, why: str) -> int:
        """Refuse to advance from here on; return the size we stay at."""
        self.stopped = why
        logger.error("mirror stopped: %s", why)
        return self.log.published.checkpoint.size

    async def run(
        self, session: aiohttp.ClientSession, interval: float, clock: Callable[[], float], *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep, backoff: Backoff | None = None,
    ) -> None:
        """Copy every interval seconds until stopped; after a failed round, wait backoff's delay instead."""
        backoff = backoff or Backoff(interval)
        while not self.stopped:
            try:
                await self.round(session, int(clock()))
                self.retry = Retry()
                delay = interval
            except Exception as e:  # noqa: BLE001 - any failure is retried: recorded, logged, backed off
                attempts = self.retry.attempts + 1
                delay = backoff.delay(attempts)
                self.retry = Retry(attempts, f"{type(e).__name__}: {e}", failure_kind(e), clock() + delay)
                logger.warning("mirror round failed (%s, attempt %d, next in %.1fs): %r", self.retry.error_kind, attempts, delay, e)
            await sleep(delay)


MIRROR = web.AppKey("mirror", Mirror)


def open_mirror(*, source: str, policy: TrustPolicy, data: pathlib.Path) -> tuple[Mirror, LMDBLogStore]:
    """A mirror over a local LMDB store and blob directory; the policy must name exactly one log."""
    if len(policy.tlog.logs) != 1:
        raise TlogError("a mirror's trust policy names exactly one log: the one it copies")
    store = LMDBLogStore(str(data / "log"))
    log = Log(store, None, verifier=policy.tlog.logs[0].verifier)
    sequencer = Sequencer(log)  # never fed: the mirror appends itself; the app needs one to serve
    blobs = BlobStore(str(data / "blobs"))
    return Mirror(source, policy, log, sequencer, Registry(sequencer=sequencer, blobs=blobs), blobs), store


async def mirror_status(request: web.Request) -> web.Response:
    m = request.app[MIRROR]
    return web.json_response({
        "source": m.source, "size": m.log.published.checkpoint.size, "stopped": m.stopped,
        "findings": [f.as_json() for f in m.findings], "retry": m.retry.as_json(),
    }, status=503 if m.stopped else 200)


def run_mirror(
    *, source: str, policy: TrustPolicy, data: pathlib.Path, interval: float,
    clock: Callable[[], float] = time.time, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    backoff: Backoff | None = None,
) -> web.Application:
    """The mirror's app: the registry read API and tiles, plus GET /mirror/status; copying runs alongside."""
    from .server import make_app

    mirror, store = open_mirror(source=source, policy=policy, data=data)
    app = make_app(mirror.registry, mirror.sequencer, read_only=True)
    app[MIRROR] = mirror
    app.router.add_get("/mirror/status", mirror_status)

    async def copying(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            task = asyncio.create_task(mirror.run(session, interval, clock, sleep=sleep, backoff=backoff))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store.close()

    app.cleanup_ctx.append(copying)
    return app
