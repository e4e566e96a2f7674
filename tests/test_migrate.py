"""`wasmlog log migrate`: a registry's log and blobs LMDB -> PostgreSQL + S3 -> LMDB, every entry, hash and blob kept.

Real LMDB on disk, real PostgreSQL and SeaweedFS (tests/services.py), the real command in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import CYCLONEDX, REGISTRY_KEY, start_registry, with_custom_section

from registry.blobs import BlobStore
from registry.bucket_blobs import BucketBlobStore
from registry.record import PackageRef
from tlog.errors import UnverifiedNoteError
from tlog.log import Log
from tlog.note import Ed25519Signer, parse_note, sign_note, verifier_from_vkey
from tlog.storage.lmdb_store import LMDBLogStore
from tlog.storage.shared import SharedLogStore
from tlog.tiles import TILE_WIDTH

EMPTY_MODULE = b"\x00asm\x01\x00\x00\x00"
RELEASES = 300  # more than one full tile and bundle
REGISTRY_VERIFIER = verifier_from_vkey(REGISTRY_KEY.vkey)


def migrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wasmlog", "log", "migrate", "--vkey", REGISTRY_KEY.vkey, "--registry", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def contents(store: LMDBLogStore | SharedLogStore) -> tuple[bytes | None, list[bytes], list[bytes]]:
    """The checkpoint, every entry and every full hash tile at level 0 of a stored log."""
    state, note = store.load()
    entries = store.read_entries(0, state.size)
    tiles = [store.read_tile(0, i) for i in range(state.size // TILE_WIDTH)]
    return note, entries, tiles


def logged_size(data: pathlib.Path) -> int:
    store = LMDBLogStore(str(data / "log"))
    try:
        return store.load()[0].size
    finally:
        store.close()


@pytest.fixture
async def lmdb_registry(tmp_path, aiohttp_client):  # type: ignore[no-untyped-def]
    """A registry data directory (LMDB log, blobs) with RELEASES releases, some with an SBOM; returns (dir, modules)."""
    data = tmp_path / "src"
    api, _, _, store = await start_registry(aiohttp_client, data)
    alice = Ed25519Signer.generate("alice")
    await api.claim_if_unclaimed(alice, "acme")
    modules = [with_custom_section(EMPTY_MODULE, i) for i in range(RELEASES)]
    await asyncio.gather(*(
        api.publish(alice, PackageRef("acme", "mod", f"1.0.{i}"), m, CYCLONEDX if i % 50 == 0 else None,
                    "application/vnd.cyclonedx+json" if i % 50 == 0 else None)
        for i, m in enumerate(modules)
    ))
    store.close()
    return data, modules


async def test_a_registry_migrates_to_shared_storage_and_back_keeping_every_entry_hash_and_blob(
    lmdb_registry, tmp_path, pg_dsn, seaweed, s3_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    data, modules = lmdb_registry
    objects = f"s3://{s3_path}/reg"
    done = migrate(seaweed.env, "--from", str(data), "--to-store", pg_dsn, "--to-objects", objects)
    assert done.returncode == 0, done.stderr
    size = logged_size(data)  # the claim, the releases and the index roots closing each batch
    assert size > RELEASES + 1 and f"copied {size} entries (the copy has {size})" in done.stdout
    for k, v in seaweed.env.items():
        monkeypatch.setenv(k, v)
    source = LMDBLogStore(str(data / "log"))
    shared = SharedLogStore(pg_dsn, f"{objects}/log")
    try:
        assert contents(shared) == contents(source)
        Log(shared, REGISTRY_KEY)  # servable: its checkpoint matches its tree
        bucket_blobs = BucketBlobStore(f"{objects}/blobs")
        for m in [*modules, CYCLONEDX]:
            assert bucket_blobs.get(hashlib.sha256(m).hexdigest()) == m
        again = migrate(seaweed.env, "--from", str(data), "--to-store", pg_dsn, "--to-objects", objects)  # idempotent
        assert again.returncode == 0 and "copied 0 entries" in again.stdout, again.stderr
        back = tmp_path / "back"
        done = migrate(seaweed.env, "--from-store", pg_dsn, "--from-objects", objects, "--to", str(back))
        assert done.returncode == 0, done.stderr
        copy = LMDBLogStore(str(back / "log"))
        try:
            assert contents(copy) == contents(source)
            Log(copy, REGISTRY_KEY)
        finally:
            copy.close()
        blobs = BlobStore(str(back / "blobs"))
        for m in [*modules, CYCLONEDX]:
            assert blobs.get(hashlib.sha256(m).hexdigest()) == m
    finally:
        source.close()
        shared.close()


async def test_an_interrupted_migration_resumes_and_a_tampered_source_is_refused(lmdb_registry, tmp_path, seaweed) -> None:  # type: ignore[no-untyped-def]
    data, _ = lmdb_registry
    target = tmp_path / "copy"
    (target / "log").mkdir(parents=True)
    partial = LMDBLogStore(str(target / "log"))  # the first 256 entries, as a run killed after one batch leaves them
    source = LMDBLogStore(str(data / "log"))
    try:
        from wasmlog.migrate import copy_log

        def killed(done: int, size: int) -> None:
            raise RuntimeError(f"killed at {done} of {size}")

        with pytest.raises(RuntimeError, match="killed at 256 of"):
            copy_log(source, partial, REGISTRY_VERIFIER, progress=killed, batch=TILE_WIDTH)
        assert partial.load()[0].size > 0
        with pytest.raises(Exception, match="does not match the stored tree"):
            Log(partial, REGISTRY_KEY)  # a half copy is never served
    finally:
        partial.close()
        source.close()
    done = migrate({}, "--from", str(data), "--to", str(target))
    assert done.returncode == 0, done.stderr
    assert "copied 0 entries" not in done.stdout and f"(the copy has {logged_size(data)})" in done.stdout
    # Tamper with one logged entry: its tiles no longer match, and the copy is refused.
    env = lmdb.open(str(data / "log"), max_dbs=5)
    with env.begin(write=True) as txn:
        txn.put((7).to_bytes(8, "big"), b"tampered", db=env.open_db(b"entries", txn=txn))
    env.close()
    refused = migrate({}, "--from", str(data), "--to", str(tmp_path / "fresh"))
    assert refused.returncode == 1 and "recomputed root" in refused.stderr, refused.stderr


def test_migrate_needs_one_source_and_one_target(tmp_path: pathlib.Path) -> None:
    done = migrate({}, "--from", str(tmp_path))
    assert done.returncode == 2 and "--to DIR" in done.stderr


@settings(max_examples=20, deadline=None)
@given(count=st.integers(1, 700), chunk=st.integers(1, 300), batch_tiles=st.integers(1, 2), killed_after=st.integers(1, 3))
def test_a_copy_interrupted_after_any_batch_and_resumed_is_the_source_tree(count: int, chunk: int, batch_tiles: int, killed_after: int) -> None:
    """copy_log against the RFC 6962 definition (tests/reference.py), for any size, source batching and interruption."""
    from reference import mth

    from wasmlog.migrate import copy_log

    entries = [b"entry %d" % i for i in range(count)]
    with tempfile.TemporaryDirectory() as d:
        source, target = LMDBLogStore(f"{d}/src"), LMDBLogStore(f"{d}/dst")
        try:
            log = Log(source, REGISTRY_KEY)
            for first in range(0, count, chunk):
                log.integrate(entries[first : first + chunk])
            calls = []

            def killed(done: int, size: int) -> None:
                calls.append(done)
                if len(calls) == killed_after and done < size:
                    raise RuntimeError("killed")

            with contextlib.suppress(RuntimeError):
                copy_log(source, target, REGISTRY_VERIFIER, progress=killed, batch=batch_tiles * TILE_WIDTH)
            report = copy_log(source, target, REGISTRY_VERIFIER, batch=batch_tiles * TILE_WIDTH)
            assert report.size == count
            assert contents(target) == contents(source)
            assert Log(target, REGISTRY_KEY).integrated.checkpoint.root_hash == mth(tuple(entries))
        finally:
            source.close()
            target.close()


def lmdb_log(directory: pathlib.Path, signer: Ed25519Signer, entries: list[bytes]) -> None:
    store = LMDBLogStore(str(directory))
    try:
        Log(store, signer).integrate(entries)
    finally:
        store.close()


def test_a_source_rewritten_and_signed_by_another_key_is_refused(tmp_path: pathlib.Path) -> None:
    """Entries and checkpoint both rewritten, by a key of the log's name: the tree is consistent, the
    signature is not the log's, and nothing is copied."""
    impostor = Ed25519Signer.generate(REGISTRY_KEY.name)
    lmdb_log(tmp_path / "src", impostor, [b"rewritten %d" % i for i in range(300)])
    (tmp_path / "log.vkey").write_text(REGISTRY_KEY.vkey + "\n")

    def run(vkey: str, to: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wasmlog", "log", "migrate", "--vkey", vkey, "--from", str(tmp_path / "src"),
                               "--to", str(tmp_path / to)], capture_output=True, text=True, timeout=300)

    refused = run(str(tmp_path / "log.vkey"), "copy")  # the vkey from its file
    assert refused.returncode == 1, refused.stderr
    assert f"the source's checkpoint is not signed by the log's key {REGISTRY_KEY.name}+{REGISTRY_KEY.key_id:08x}" in refused.stderr
    assert not (tmp_path / "copy").exists() or logged_lmdb_size(tmp_path / "copy") == 0
    assert run(impostor.vkey, "copy").returncode == 0  # the same source under its own key copies
    assert run("not a vkey", "other").returncode == 2


def logged_lmdb_size(directory: pathlib.Path) -> int:
    store = LMDBLogStore(str(directory))
    try:
        return store.load()[0].size
    finally:
        store.close()


def test_a_target_or_published_checkpoint_signed_by_another_key_is_refused(tmp_path: pathlib.Path) -> None:
    from wasmlog.migrate import copy_log

    entries = [b"entry %d" % i for i in range(600)]
    impostor = Ed25519Signer.generate(REGISTRY_KEY.name)
    lmdb_log(tmp_path / "src", REGISTRY_KEY, entries)
    lmdb_log(tmp_path / "dst", impostor, entries[:300])  # a prefix of the source's tree, under another key
    source, target = LMDBLogStore(str(tmp_path / "src")), LMDBLogStore(str(tmp_path / "dst"))
    try:
        with pytest.raises(UnverifiedNoteError, match="the target's checkpoint is not signed by the log's key"):
            copy_log(source, target, REGISTRY_VERIFIER)
        assert target.load()[0].size == 300  # untouched
        text = parse_note(source.load()[1] or b"").text
        source.publish(sign_note(text, [impostor]))  # the tree the log signed, "published" under another key
        fresh = LMDBLogStore(str(tmp_path / "fresh"))
        try:
            with pytest.raises(UnverifiedNoteError, match="the source's published checkpoint is not signed"):
                copy_log(source, fresh, REGISTRY_VERIFIER)
            source.publish(sign_note(text, [REGISTRY_KEY]))
            assert copy_log(source, fresh, REGISTRY_VERIFIER).size == 600
            assert fresh.published() == source.published()
        finally:
            fresh.close()
    finally:
        source.close()
        target.close()
