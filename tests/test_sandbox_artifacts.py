"""edge.artifacts: the compiled-artifact cache hands out only bytes whose HMAC checks."""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import time

import pytest

from edge.artifacts import (
    MAGIC,
    STALE_TMP,
    ArtifactCache,
    KeyFileError,
    load_or_create_key,
)

A, B = "a" * 64, "b" * 64


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", load_or_create_key(tmp_path / "key"), "0123456789abcdef")


def test_stored_artifacts_load_and_carry_an_hmac_over_digest_settings_and_bytes(cache: ArtifactCache, tmp_path: pathlib.Path) -> None:
    cache.store(A, b"compiled code")
    assert cache.load(A) == (b"compiled code", False)
    data = cache.path(A).read_bytes()
    key = (tmp_path / "key").read_bytes()
    expected = hmac.new(key, b"wasmlog compiled artifact\0" + A.encode() + b"\0" + b"0123456789abcdef\0" + b"compiled code", hashlib.sha256).digest()
    assert data == MAGIC + expected + b"compiled code"  # checked against an independent computation
    assert cache.load(B) == (None, False)


@pytest.mark.parametrize("damage", ["flip code", "flip mac", "truncate", "empty", "no magic"])
def test_a_damaged_artifact_is_refused_and_deleted(cache: ArtifactCache, damage: str) -> None:
    cache.store(A, b"compiled code" * 100)
    path = cache.path(A)
    data = bytearray(path.read_bytes())
    if damage == "flip code":
        data[-5] ^= 1
    elif damage == "flip mac":
        data[len(MAGIC) + 3] ^= 1
    elif damage == "truncate":
        del data[-1]
    elif damage == "empty":
        data = bytearray()
    else:
        data[:len(MAGIC)] = b"x" * len(MAGIC)
    path.write_bytes(bytes(data))
    assert cache.load(A) == (None, True)
    assert not path.exists()


def test_an_artifact_moved_to_another_digest_or_settings_is_refused(cache: ArtifactCache, tmp_path: pathlib.Path) -> None:
    cache.store(A, b"code of a")
    os.replace(cache.path(A), cache.path(B))
    assert cache.load(B) == (None, True)
    cache.store(A, b"code of a")
    other = ArtifactCache(tmp_path / "cache", load_or_create_key(tmp_path / "key"), "fedcba9876543210")
    os.replace(cache.path(A), other.path(A))
    assert other.load(A) == (None, True)


def test_verify_all_rechecks_every_artifact_and_clears_only_stale_temporaries(cache: ArtifactCache) -> None:
    cache.store(A, b"good")
    cache.store(B, b"will be bad")
    bad = cache.path(B)
    bad.write_bytes(bad.read_bytes()[:-1] + b"!")
    stale, fresh = cache.dir / ".x.tmp", cache.dir / ".y.tmp"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    old = time.time() - STALE_TMP - 10
    os.utime(stale, (old, old))
    (cache.dir / "README").write_text("not ours")
    assert cache.verify_all() == [B]
    assert cache.load(A) == (b"good", False) and not bad.exists()
    assert not stale.exists() and fresh.exists() and (cache.dir / "README").exists()


def test_key_file(tmp_path: pathlib.Path) -> None:
    key = load_or_create_key(tmp_path / "key")
    assert len(key) == 32 and (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "key") == key
    (tmp_path / "short").write_bytes(b"x" * 31)
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(KeyFileError, match="31 bytes"):
        load_or_create_key(tmp_path / "short")
    (tmp_path / "key").chmod(0o644)
    with pytest.raises(KeyFileError, match="0600"):
        load_or_create_key(tmp_path / "key")
    (tmp_path / "key").chmod(0o600)
    (tmp_path / "link").symlink_to(tmp_path / "key")  # a key read through a link could be anyone's file
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_key(tmp_path / "link")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="regular file"):
        load_or_create_key(tmp_path / "dir")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".key-")]  # no temporary file left behind
