"""What a local tamperer plants under a digest's name (a directory, a FIFO, a link to /dev/zero, a foreign
file) is found bad, removed, and never stops the check of the other entries or blocks the agent; and
state.json is used only when its MAC checks under this node's key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import pytest

from edge.agent_state import ModuleState, ModuleStore, StateError, StateFile, state_key
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


def states(*refs: str) -> dict[str, ModuleState]:
    return {ref: ModuleState(ref, "admitted", None, None, "stdout", 1_700_000_000, "1.0.0", DIGEST, 3) for ref in refs}


def test_state_json_round_trips_under_its_mac(tmp_path: pathlib.Path) -> None:
    key = state_key(load_or_create_key(tmp_path / "artifact.key"))
    assert key != load_or_create_key(tmp_path / "artifact.key")  # derived: never the artifact MAC's own key
    f = StateFile(tmp_path, key)
    assert f.load() is None  # no file
    f.save(states("acme:a@1.0.0", "acme:b"))
    assert f.load() == states("acme:a@1.0.0", "acme:b")
    with pytest.raises(StateError, match="MAC"):  # another node's key
        StateFile(tmp_path, state_key(bytes(32))).load()


@pytest.mark.parametrize("edit", [
    lambda o: o["modules"]["acme:a@1.0.0"].update(state="quarantined"),  # any field of any module
    lambda o: o["modules"]["acme:a@1.0.0"].update(since=1),
    lambda o: o["modules"].pop("acme:a@1.0.0"),  # a module dropped
    lambda o: o["modules"].update({"acme:c": dict(o["modules"]["acme:a@1.0.0"], ref="acme:c")}),  # one added
    lambda o: o.update(mac="0" * 64),
    lambda o: o.update(version=1),
    lambda o: o.pop("mac"),
    lambda o: o.update(extra=True),
])
def test_an_edited_state_json_is_refused(tmp_path: pathlib.Path, edit) -> None:  # type: ignore[no-untyped-def]
    f = StateFile(tmp_path, state_key(load_or_create_key(tmp_path / "artifact.key")))
    f.save(states("acme:a@1.0.0", "acme:b"))
    obj = json.loads(f.path.read_text())
    edit(obj)
    f.path.write_text(json.dumps(obj))
    with pytest.raises(StateError):
        f.load()


@pytest.mark.parametrize("body", [b"", b"{not json", b"[]", b'{"version": 2, "modules": {}, "mac": "x", "mac": "y"}', b"\xff"])
def test_a_malformed_state_json_is_refused(tmp_path: pathlib.Path, body: bytes) -> None:
    f = StateFile(tmp_path, state_key(load_or_create_key(tmp_path / "artifact.key")))
    f.path.write_bytes(body)
    with pytest.raises(StateError):
        f.load()
    f.path.unlink()
    plant(f.path, "fifo")  # never blocks the start
    with pytest.raises(StateError):
        f.load()


def _signed(f: StateFile, version: int, modules: dict[str, dict[str, object]]) -> None:
    """Write a state.json of version under f's key, as that version of the agent wrote it."""
    content: dict[str, object] = {"version": version, "modules": modules}
    f.path.write_text(json.dumps({**content, "mac": f._mac(content)}))


def test_a_version_2_state_json_is_read_without_status_times(tmp_path: pathlib.Path) -> None:
    f = StateFile(tmp_path, state_key(load_or_create_key(tmp_path / "artifact.key")))
    v3 = {ref: s.as_json() for ref, s in states("acme:a@1.0.0").items()}
    v2 = {ref: {k: v for k, v in m.items() if k != "status_as_of"} for ref, m in v3.items()}
    _signed(f, 2, v2)
    assert f.load() == states("acme:a@1.0.0")  # status_as_of None: with require_status, the next sweep decides
    f.save({ref: dataclasses.replace(s, status_as_of=1_700_000_000) for ref, s in states("acme:a@1.0.0").items()})
    assert json.loads(f.path.read_text())["version"] == 3
    loaded = f.load()
    assert loaded is not None and loaded["acme:a@1.0.0"].status_as_of == 1_700_000_000
    for version, modules in ((2, v3), (3, v2), (3, {"acme:a@1.0.0": {**v3["acme:a@1.0.0"], "status_as_of": "1"}}), (True, v2)):
        _signed(f, version, modules)
        with pytest.raises(StateError):
            f.load()
