"""The publisher's side: build and sign statements and actions, talk to a registry's API."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import cbor2

from tlog.client import FetchError, read_bounded
from tlog.errors import MalformedError, TooLargeError
from tlog.note import Ed25519Signer

from .diff import diff_releases
from .dsse import ACTION_PAYLOAD_TYPE, INTOTO_PAYLOAD_TYPE, sign_envelope, strict_json
from .record import Action, PackageRef, Release, module_digest
from .sbom import MAX_SBOM_BYTES
from .wasm import MAX_MODULE_BYTES, parse_wasm

MAX_ANSWER_BYTES = max(MAX_MODULE_BYTES, MAX_SBOM_BYTES) + (1 << 20)  # the largest thing a registry serves: a module
MAX_JSON_BYTES = 16 << 20  # an API answer in JSON (a page of /actions is well under 1 MiB)
MAX_ACTION_PROOFS = 100_000  # an online refresh reads at most this many revocations and yanks (~160 MB)


class RegistryError(FetchError):
    """The registry answered with an error: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"registry answered {status}: {message}")
        self.status = status


def release_statement(ref: PackageRef, module: bytes, sbom: bytes | None, sbom_media_type: str | None) -> Release:
    """The release for a module: its digest and its imports as the registry will read them."""
    info = parse_wasm(module)
    return Release(
        ref, module_digest(module), info.imports,
        None if sbom is None else module_digest(sbom), None if sbom is None else sbom_media_type,
    )


class RegistryClient:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.session = session

    async def _check(self, r: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
        """The body of a 200 answer, at most limit bytes (read no further). Raises RegistryError, TooLargeError."""
        body = await read_bounded(r, limit)
        if len(body) > limit:
            raise TooLargeError(f"the registry's answer is over {limit} bytes")
        if r.status != 200:
            try:
                message = str(strict_json(body, "error")["message"])  # type: ignore[index]
            except (MalformedError, KeyError, TypeError):
                message = body[:300].decode("utf-8", "replace")
            raise RegistryError(r.status, message)
        return body

    async def get(self, path: str, limit: int = MAX_ANSWER_BYTES) -> bytes:
        """GET path: a body of at most limit bytes. Raises RegistryError, TooLargeError."""
        async with self.session.get(self.url + path) as r:
            return await self._check(r, limit)

    async def get_json(self, path: str, limit: int = MAX_JSON_BYTES) -> Any:
        """GET path and parse its JSON strictly (no duplicate keys). Raises MalformedError."""
        return strict_json(await self.get(path, limit), f"answer to {path}")

    async def namespace(self, ns: str) -> dict[str, Any] | None:
        try:
            return await self.get_json(f"/api/v1/namespaces/{ns}")  # type: ignore[no-any-return]
        except RegistryError as e:
            if e.status == 404:
                return None
            raise

    async def actions(self, ns: str, *, limit: int | None = None, max_proofs: int = MAX_ACTION_PROOFS) -> list[bytes]:
        """Every page of GET /api/v1/namespaces/{ns}/actions: the tlog-proofs of the namespace's
        revocations and yanks. Raises MalformedError for an answer of the wrong shape, a cursor that
        does not move forward, or more than max_proofs proofs (a registry that never ends)."""
        proofs: list[bytes] = []
        after: int | None = None
        while True:
            query = "&".join(f"{k}={v}" for k, v in (("after", after), ("limit", limit)) if v is not None)
            page = await self.get_json(f"/api/v1/namespaces/{ns}/actions" + (f"?{query}" if query else ""))
            if type(page) is not dict or page.keys() != {"proofs", "next"} or type(page["proofs"]) is not list \
                    or not all(type(p) is str for p in page["proofs"]) \
                    or not (page["next"] is None
                            or (page["proofs"] and type(page["next"]) is int and page["next"] > (after if after is not None else -1))):
                raise MalformedError('an /actions page is {"proofs": [tlog-proofs], "next": null, or a later index after a non-empty page}')
            proofs += [p.encode() for p in page["proofs"]]
            if len(proofs) > max_proofs:
                raise MalformedError(f"the registry lists more than {max_proofs} actions for {ns}")
            if page["next"] is None:
                return proofs
            after = page["next"]

    async def act(self, signer: Ed25519Signer, action: Action) -> bytes:
        env = sign_envelope(ACTION_PAYLOAD_TYPE, action.payload(), signer)
        body = {"type": action.action, "signer": signer.vkey, "envelope": json.loads(env.to_json())}
        async with self.session.post(self.url + "/api/v1/records", json=body) as r:
            return await self._check(r)

    async def claim_if_unclaimed(self, signer: Ed25519Signer, ns: str) -> bool:
        """Claim a namespace for signer (a self-grant) if nobody has; return whether we did."""
        if await self.namespace(ns) is not None:
            return False
        await self.act(signer, Action("key-grant", ns, key=signer.vkey, issued=int(time.time())))
        return True

    async def publish(
        self, signer: Ed25519Signer, ref: PackageRef, module: bytes, sbom: bytes | None = None, sbom_media_type: str | None = None
    ) -> bytes:
        """Sign the release statement and publish; return the module's tlog-proof."""
        await self.claim_if_unclaimed(signer, ref.namespace)
        release = release_statement(ref, module, sbom, sbom_media_type)
        env = sign_envelope(INTOTO_PAYLOAD_TYPE, release.statement(), signer)
        return await self.publish_signed(signer.vkey, env.to_json(), module, sbom)

    async def publish_signed(self, signer: str, envelope: bytes, module: bytes, sbom: bytes | None = None) -> bytes:
        """Send an already signed release (spec/registry-api.md, CBOR body)."""
        parts = {"signer": signer.encode(), "envelope": envelope, "module": module}
        if sbom is not None:
            parts["sbom"] = sbom
        body = cbor2.dumps(parts)
        async with self.session.post(self.url + "/api/v1/publish", data=body, headers={"Content-Type": "application/cbor"}) as r:
            return await self._check(r)

    def package_path(self, ref: PackageRef) -> str:
        return f"/api/v1/packages/{ref.namespace}/{ref.name}/{ref.version}"

    async def release_diff(self, old: PackageRef, new: PackageRef) -> dict[str, Any]:
        """registry.diff.diff_releases of two releases, from their metadata and SBOMs as this registry serves them."""
        metas, sboms = [], []
        for ref in (old, new):
            meta = await self.get_json(self.package_path(ref))
            metas.append(meta)
            sboms.append(await self.get(self.package_path(ref) + "/sbom") if meta["sbom"] else None)
        return diff_releases(metas[0], metas[1], sboms[0], sboms[1])
