"""Object writes to an S3-compatible bucket from the event loop, without boto3's client.

boto3's client spends ~1.6 ms of CPU on each request (parameter validation, endpoint rules, event
hooks, response parsing), more than the bucket itself spends storing a small object, and a registry
writes one blob per publish. AsyncBucket takes the endpoint, region and credentials from botocore
exactly as ObjectStore's client does (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ... or any
other source botocore reads, refreshed by botocore when they expire), signs each request with
tlog/sigv4.py (botocore's signer alone costs ~0.1 ms) and sends it over kept-alive connections of
its own (storage/http1.py: aiohttp's client cost ~0.2 ms of CPU per request), path-style
(ENDPOINT/BUCKET/KEY; keys of unreserved characters only, so a URL is its own canonical form).
Connection failures and 5xx answers are retried (ATTEMPTS in all), as boto3's standard mode does.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any
from urllib.parse import urlsplit

from ..errors import MalformedError, MissingDependencyError, StorageUnavailableError
from ..http_answer import MalformedAnswerError
from ..sigv4 import SigV4Signer
from ..tiles import IMMUTABLE
from .http1 import Origin
from .objects import SHORT_LIVED, parse_objects_url

ATTEMPTS = 3
RETRY_STATUSES = {500, 502, 503, 504}
BACKOFF = 0.1  # seconds before the second attempt, doubled for each next one
MAX_ANSWER = 64 << 10  # bytes of an answer read (S3 answers a PUT with an empty body, or a short XML error)
_PATH = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*")  # unreserved characters only: the URL is its own encoding


class AsyncBucket:
    """A bucket and prefix (url: s3://BUCKET[/PREFIX]) written from one event loop.

    connections bounds the requests in flight. The HTTP session is opened by the first request and
    closed by aclose()."""

    def __init__(self, url: str, *, connections: int = 32) -> None:
        self.bucket, self.prefix = parse_objects_url(url)
        try:
            import botocore.session
        except ImportError as e:
            raise MissingDependencyError("S3 object storage", "shared", e) from e
        session = botocore.session.get_session()
        client = session.create_client("s3")  # resolves the endpoint and region the standard way; never sends
        endpoint = urlsplit(client.meta.endpoint_url)
        self.region: str = client.meta.region_name
        self._origin, self._host, self._base = f"{endpoint.scheme}://{endpoint.netloc}", endpoint.netloc, endpoint.path.rstrip("/")
        self._credentials: Any = session.get_credentials()
        self._signer: SigV4Signer | None = None
        self._connections = connections
        self._http: Origin | None = None

    def _path(self, path: str) -> str:
        """The URL path of an object (path-style: /BUCKET/PREFIX/path). Raises MalformedError for a path
        that is not slash-separated segments of unreserved characters (letters, digits, '.', '_', '~', '-')."""
        if not _PATH.fullmatch(path):
            raise MalformedError(f"object path {path[:100]!r}: only letters, digits, '.', '_', '~', '-' and '/' between them")
        return f"{self._base}/{self.bucket}/{self.prefix}/{path}" if self.prefix else f"{self._base}/{self.bucket}/{path}"

    def _signed(self, method: str, path: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        """headers plus the SigV4 ones for this request, signed with the credentials of the moment."""
        if self._credentials is None:
            raise StorageUnavailableError("no AWS credentials found for the bucket (AWS_ACCESS_KEY_ID, ...)")
        now = self._credentials.get_frozen_credentials()  # botocore refreshes expiring ones here
        signer = self._signer
        if signer is None or (signer.access_key, signer.secret_key, signer.token) != (now.access_key, now.secret_key, now.token):
            signer = self._signer = SigV4Signer(now.access_key, now.secret_key, self.region, now.token)
        return signer.sign(method, self._host, path, headers, payload_sha256, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))

    async def put(self, path: str, body: bytes, *, immutable: bool, content_type: str = "application/octet-stream",
                  sha256: str | None = None) -> bool:
        """Write one object; an immutable one only if absent (If-None-Match: *). True if written, False
        if an immutable object was there already (the caller compares bytes if its path does not fix
        them). sha256: the body's hex SHA-256 if the caller has it. Raises StorageUnavailableError."""
        headers = {"Cache-Control": IMMUTABLE if immutable else SHORT_LIVED, "Content-Type": content_type}
        if immutable:
            headers["If-None-Match"] = "*"
        payload_sha256 = sha256 if sha256 is not None else hashlib.sha256(body).hexdigest()
        status = await self._send("PUT", path, body, headers, payload_sha256, ok={200, 412} if immutable else {200})
        return status == 200

    async def _send(self, method: str, path: str, body: bytes, headers: dict[str, str], payload_sha256: str, ok: set[int]) -> int:
        encoded = self._path(path)
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
            try:  # unreserved characters only: the path is sent as signed
                answer = await self._open().request(method, encoded, self._signed(method, encoded, headers, payload_sha256), body)
            except (OSError, TimeoutError, MalformedAnswerError) as e:
                failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if answer.status in ok:
                return answer.status
            failure = f"HTTP {answer.status}: {answer.body[:200].decode(errors='replace')}"
            if answer.status not in RETRY_STATUSES:
                break
        raise StorageUnavailableError(f"{method.lower()} {path} in the bucket: {failure}")

    def _open(self) -> Origin:
        if self._http is None:
            self._http = Origin(self._origin, connections=self._connections, max_body=MAX_ANSWER)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
