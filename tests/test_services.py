"""The test servers themselves: PostgreSQL takes transactions, SeaweedFS speaks S3 with conditional writes."""

from __future__ import annotations

import psycopg
import pytest
from botocore.exceptions import ClientError


def test_postgres_commits_and_survives_a_crash(postgres, pg_dsn) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (k int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one')")
    postgres.stop("immediate")  # a crash: committed rows must come back from the WAL
    postgres.start()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT v FROM t WHERE k = 1").fetchone() == ("one",)


def test_seaweed_put_get_and_conditional_write(seaweed, s3_path) -> None:
    s3 = seaweed.client()
    bucket, prefix = s3_path.split("/", 1)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/a", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/a", Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/a")["Body"].read() == b"first"
