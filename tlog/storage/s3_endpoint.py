"""Where an S3-compatible bucket is and how to sign a request to it: what both bucket clients share
(storage/objects.py's, synchronous, and storage/bucket_http.py's, on the event loop).

The endpoint, region, CA bundle and credentials come from botocore's session, the standard way
(AWS_ENDPOINT_URL, AWS_REGION, AWS_CA_BUNDLE, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, the
shared config files, or any other source botocore reads; credentials that expire are refreshed by
botocore when asked for). botocore only resolves them: it never sends a request. Requests are
path-style (ENDPOINT/BUCKET/PREFIX/PATH) with object paths of unreserved characters only, so a
URL path is its own canonical form, and signed with tlog/sigv4.py.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

from ..errors import MalformedError, MissingDependencyError, StorageUnavailableError
from ..sigv4 import SigV4Signer

ATTEMPTS = 3  # requests that fail to connect or get a 5xx answer are tried this many times in all (boto3's standard mode)
RETRY_STATUSES = {500, 502, 503, 504}
BACKOFF = 0.1  # seconds before the second attempt, doubled for each next one
_PATH = re.compile(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*")  # unreserved characters only: the URL is its own encoding


class S3Endpoint:
    """One bucket and prefix at the endpoint botocore resolves (or at endpoint_url, if given)."""

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        """bucket and prefix as parse_objects_url gives them. Raises MissingDependencyError without botocore."""
        try:
            import botocore.session
        except ImportError as e:
            raise MissingDependencyError("S3 object storage", "shared", e) from e
        self.bucket, self.prefix = bucket, prefix
        session = botocore.session.get_session()
        client = session.create_client("s3", endpoint_url=endpoint_url)  # resolves the endpoint and region the standard way; never sends
        endpoint = urlsplit(client.meta.endpoint_url)
        self.region: str = client.meta.region_name
        self.scheme, self.host, self.base = endpoint.scheme, endpoint.netloc, endpoint.path.rstrip("/")
        self.origin = f"{self.scheme}://{self.host}"
        # The CA file botocore would verify an https endpoint with (AWS_CA_BUNDLE, ca_bundle in the config file); None: the system's.
        self.ca_bundle: str | None = session.get_config_variable("ca_bundle") or None
        self._credentials: Any = session.get_credentials()
        self._signer: SigV4Signer | None = None

    @property
    def bucket_path(self) -> str:
        """The URL path of the bucket itself (/BUCKET)."""
        return f"{self.base}/{self.bucket}"

    def path(self, path: str) -> str:
        """The URL path of an object (path-style: /BUCKET/PREFIX/path). Raises MalformedError for a path
        that is not slash-separated segments of unreserved characters (letters, digits, '.', '_', '~', '-')."""
        if not _PATH.fullmatch(path):
            raise MalformedError(f"object path {path[:100]!r}: only letters, digits, '.', '_', '~', '-' and '/' between them")
        return f"{self.base}/{self.bucket}/{self.prefix}/{path}" if self.prefix else f"{self.base}/{self.bucket}/{path}"

    def signed(self, method: str, url_path: str, headers: dict[str, str], payload_sha256: str) -> dict[str, str]:
        """headers plus Host and the SigV4 ones for this request, signed with the credentials of the moment.
        Raises StorageUnavailableError if there are none."""
        if self._credentials is None:
            raise StorageUnavailableError("no AWS credentials found for the bucket (AWS_ACCESS_KEY_ID, ...)")
        now = self._credentials.get_frozen_credentials()  # botocore refreshes expiring ones here
        signer = self._signer
        if signer is None or (signer.access_key, signer.secret_key, signer.token) != (now.access_key, now.secret_key, now.token):
            signer = self._signer = SigV4Signer(now.access_key, now.secret_key, self.region, now.token)
        return signer.sign(method, self.host, url_path, headers, payload_sha256, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
