"""What a local tamperer plants under a digest's name (a directory, a FIFO, a link to /dev/zero, a foreign
file) is found bad, removed, and never stops the check of the other entries or blocks the agent."""

from __future__ import annotations

import hashlib
import os
import pathlib

import pytest

from edge.agent_state import ModuleStore
from edge.artifacts import ArtifactCache, load_or_create_key

MODULE = b"\0asm\x01\0\0\0"
DIGEST = hashlib.sha256(MODULE).hexdigest()


def plant(path: pathlib.Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block forever
    elif kind == "zero-link":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        path.write_bytes(b"not what the name says")


KINDS = ["directory", "fifo", "zero-link", "foreign"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_module_store_check_survives_what_is_planted(tmp_path: pathlib.Path, kind: str) -> None:
    store = ModuleStore(tmp_path)
    good = store.put(DIGEST, MODULE)
    other = "ab" * 32
    plant(store.path(other), kind)
    assert store.get(other) is None  # never read through a link, never blocked by a FIFO
    assert store.check() == [other]  # found, while the good entry is still checked
    assert not os.path.lexists(store.path(other)) and good.read_bytes() == MODULE
    assert store.check() == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_artifact_cache_survives_what_is_planted(tmp_path: pathlib.Path, kind: str) -> None:
    cache = ArtifactCache(tmp_path / "artifacts", load_or_create_key(tmp_path / "artifact.key"), "0" * 16)
    cache.store(DIGEST, b"compiled")
    other = "cd" * 32
    plant(cache.path(other), kind)
    assert cache.load(other) == (None, True)  # bad, removed, and the agent would rebuild it
    assert not os.path.lexists(cache.path(other))
    plant(cache.path(other), kind)
    assert cache.verify_all() == [other]
    assert cache.load(DIGEST) == (b"compiled", False)
