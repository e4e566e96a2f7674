"""Create the S3 bucket named on the command line (AWS_* variables say where), waiting for the server; exit 0 if it exists.

A signed PUT /BUCKET (tlog/storage/s3_endpoint.py resolves the endpoint and credentials as the log does)."""

import http.client
import sys
import time

from tlog.storage.objects import parse_objects_url
from tlog.storage.s3_endpoint import S3Endpoint
from tlog.storage.s3_sync import EMPTY_SHA256

bucket, _ = parse_objects_url(f"s3://{sys.argv[1]}")
endpoint = S3Endpoint(bucket, "")
connection = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
deadline = time.monotonic() + 120
while True:
    try:
        conn = connection(endpoint.host, timeout=10)
        conn.request("PUT", endpoint.bucket_path, headers=endpoint.signed("PUT", endpoint.bucket_path, {}, EMPTY_SHA256))
        answer = conn.getresponse()
        said = answer.read(4096)
        conn.close()
        if answer.status == 200 or b"<Code>BucketAlreadyOwnedByYou</Code>" in said or b"<Code>BucketAlreadyExists</Code>" in said:
            break
        error = f"HTTP {answer.status}: {said[:200].decode(errors='replace')}"
    except (OSError, http.client.HTTPException) as e:
        error = f"{type(e).__name__}: {e}"
    if time.monotonic() > deadline:
        sys.exit(f"could not create bucket {bucket}: {error}")
    time.sleep(1)
print(f"bucket {bucket} ready")
