"""Object writes to an S3-compatible bucket from the event loop, without boto3's client.

boto3's client spends ~1.6 ms of CPU on each request (parameter validation, endpoint rules, event
hooks, response parsing), more than the bucket itself spends storing a small object, and a registry
writes one blob per publish. AsyncBucket takes the endpoint, region and credentials from
storage/s3_endpoint.py, as ObjectStore does (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...
resolved by botocore), signs each request there with tlog/sigv4.py (botocore's signer alone costs
~0.1 ms) and sends it over kept-alive connections of its own (storage/http1.py: aiohttp's client
cost ~0.2 ms of CPU per request), path-style (ENDPOINT/BUCKET/KEY; keys of unreserved characters
only, so a URL is its own canonical form). Connection failures and 5xx answers are retried
(ATTEMPTS in all), as boto3's standard mode does.
"""

from __future__ import annotations

import asyncio
import hashlib

from ..errors import StorageUnavailableError
from ..http_answer import MalformedAnswerError
from ..tiles import IMMUTABLE
from .http1 import Origin
from .objects import SHORT_LIVED, parse_objects_url
from .s3_endpoint import ATTEMPTS, BACKOFF, RETRY_STATUSES, S3Endpoint

MAX_ANSWER = 64 << 10  # bytes of an answer read (S3 answers a PUT with an empty body, or a short XML error)


class AsyncBucket:
    """A bucket and prefix (url: s3://BUCKET[/PREFIX]) written from one event loop.

    connections bounds the requests in flight. The HTTP session is opened by the first request and
    closed by aclose()."""

    def __init__(self, url: str, *, connections: int = 32, endpoint_url: str | None = None, endpoint: S3Endpoint | None = None) -> None:
        """endpoint_url: the bucket's endpoint, instead of the one botocore resolves (AWS_ENDPOINT_URL, ...);
        endpoint: one resolved already for this url (ObjectStore.endpoint): resolving costs ~0.1 s."""
        self.bucket, self.prefix = parse_objects_url(url)
        if endpoint is not None and (endpoint.bucket, endpoint.prefix) != (self.bucket, self.prefix):
            raise ValueError(f"the endpoint given is for s3://{endpoint.bucket}/{endpoint.prefix}, not {url}")
        self._endpoint = endpoint if endpoint is not None else S3Endpoint(self.bucket, self.prefix, endpoint_url=endpoint_url)
        self._connections = connections
        self._http: Origin | None = None

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
        encoded = self._endpoint.path(path)
        failure = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
            try:  # unreserved characters only: the path is sent as signed
                answer = await self._open().request(method, encoded, self._endpoint.signed(method, encoded, headers, payload_sha256), body)
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
            self._http = Origin(self._endpoint.origin, connections=self._connections, max_body=MAX_ANSWER, cafile=self._endpoint.ca_bundle)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
