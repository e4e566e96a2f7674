"""Create the S3 bucket named on the command line (AWS_* variables say where), waiting for the server; exit 0 if it exists."""

import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError

bucket = sys.argv[1]
s3 = boto3.client("s3")
deadline = time.monotonic() + 120
while True:
    try:
        s3.create_bucket(Bucket=bucket)
        break
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            break
        error: Exception = e
    except BotoCoreError as e:
        error = e
    if time.monotonic() > deadline:
        sys.exit(f"could not create bucket {bucket}: {error}")
    time.sleep(1)
print(f"bucket {bucket} ready")
