"""tlog/sigv4.py: AWS's published S3 examples, and botocore's signer as an independent reference."""

from __future__ import annotations

import datetime
import hashlib

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.sigv4 import SigV4Signer

# The example credentials of https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
EXAMPLE = SigV4Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1")
HOST = "examplebucket.s3.amazonaws.com"


def test_the_published_get_object_example() -> None:
    headers = EXAMPLE.sign("GET", HOST, "/test.txt", {"Range": "bytes=0-9"}, hashlib.sha256(b"").hexdigest(), "20130524T000000Z")
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert headers["Host"] == HOST and headers["X-Amz-Date"] == "20130524T000000Z" and headers["Range"] == "bytes=0-9"


def test_the_published_put_object_example() -> None:
    body = b"Welcome to Amazon S3."
    payload = hashlib.sha256(body).hexdigest()
    assert payload == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    headers = EXAMPLE.sign("PUT", HOST, "/test%24file.text",
                           {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}, payload, "20130524T000000Z")
    assert headers["Authorization"].endswith("Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd")
    assert headers["X-Amz-Content-Sha256"] == payload


def test_the_signing_key_follows_the_day() -> None:
    payload = hashlib.sha256(b"").hexdigest()
    signer = SigV4Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1")
    signer.sign("GET", HOST, "/test.txt", {"Range": "bytes=0-9"}, payload, "20130523T235959Z")  # the day before: another key
    headers = signer.sign("GET", HOST, "/test.txt", {"Range": "bytes=0-9"}, payload, "20130524T000000Z")
    assert headers["Authorization"].endswith("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


_NAMES = st.from_regex(r"x-[a-z0-9]{1,8}(-[a-z0-9]{1,8})?", fullmatch=True)
_VALUES = st.from_regex(r"[!-~]([ !-~]{0,30}[!-~])?", fullmatch=True)
_PATHS = st.from_regex(r"(/[A-Za-z0-9._~-]{1,20}){1,4}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(["GET", "PUT", "HEAD"]), path=_PATHS, headers=st.dictionaries(_NAMES, _VALUES, max_size=4),
       body=st.binary(max_size=64), token=st.none() | st.from_regex(r"[A-Za-z0-9+/=]{8,40}", fullmatch=True),
       seconds=st.integers(0, 2**31))
def test_it_signs_as_botocore_does(method: str, path: str, headers: dict[str, str], body: bytes, token: str | None, seconds: int) -> None:
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(tzinfo=None)
    payload = hashlib.sha256(body).hexdigest()
    ours = SigV4Signer("AKIDEXAMPLE", "secret/Key+1", "eu-west-3", token).sign(
        method, "bucket.example:9000", path, headers, payload, when.strftime("%Y%m%dT%H%M%SZ"))
    request = AWSRequest(method, "http://bucket.example:9000" + path, data=body, headers=dict(headers))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.auth, "get_current_datetime", lambda: when)
        S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret/Key+1", token), "s3", "eu-west-3").add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
