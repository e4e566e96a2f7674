"""AWS Signature Version 4 for S3 requests, in the Authorization header, without a query string. Pure.

The algorithm of https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html:
a canonical request (method, URI-encoded path, empty query, every signed header lowercased with its
value trimmed, their names, the payload's SHA-256), the string to sign over its hash and the scope
DATE/REGION/SERVICE/aws4_request, and an HMAC-SHA256 chain from the secret key. The chain's key
depends only on the secret, the date and the region, so a signer keeps it for the day: a request
then costs two SHA-256s and one HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class SigV4Signer:
    """Signs requests with one set of credentials for one region and service."""

    def __init__(self, access_key: str, secret_key: str, region: str, token: str | None = None, service: str = "s3") -> None:
        self.access_key, self.secret_key, self.region, self.token, self.service = access_key, secret_key, region, token, service
        self._day_key: tuple[str, bytes] | None = None

    def _signing_key(self, day: str) -> bytes:
        if self._day_key is None or self._day_key[0] != day:
            key = _hmac(_hmac(_hmac(("AWS4" + self.secret_key).encode(), day), self.region), self.service)
            self._day_key = (day, _hmac(key, "aws4_request"))
        return self._day_key[1]

    def sign(self, method: str, host: str, path: str, headers: Mapping[str, str], payload_sha256: str, amz_date: str) -> dict[str, str]:
        """headers plus Host, X-Amz-Date, X-Amz-Content-Sha256 (and X-Amz-Security-Token) and the
        Authorization that signs all of them. path is URI-encoded already; amz_date is YYYYMMDDTHHMMSSZ (UTC)."""
        out = {**headers, "Host": host, "X-Amz-Date": amz_date, "X-Amz-Content-Sha256": payload_sha256}
        if self.token is not None:
            out["X-Amz-Security-Token"] = self.token
        canonical = sorted((name.lower(), " ".join(value.split())) for name, value in out.items())
        signed = ";".join(name for name, _ in canonical)
        request = "\n".join([method, path, "", "".join(f"{name}:{value}\n" for name, value in canonical), signed, payload_sha256])
        scope = f"{amz_date[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(amz_date[:8]), to_sign.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = f"{ALGORITHM} Credential={self.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
        return out
