"""The auditor against a static tlog-tiles log written by a naive writer, not by our tlog code.

The writer below follows the definitions only: RFC 6962 MTH (recursive, memoised on [lo, hi)),
c2sp.org/tlog-tiles tiles of height 8 (tile n at level l holds MTH(D[(n*256+i)*256**l :
(n*256+i+1)*256**l])), entry bundles of uint16 big-endian length-prefixed entries, and the
partial tile at level l of width floor(s / 256**l) mod 256. Its directory holds only the full
tiles and the partial tiles of the latest checkpoint, as a tlog-tiles server may; it is checked
against the published vectors. The server is aiohttp's static file handler on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import pathlib
import struct
import sys
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from conftest import load_vectors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.audit import AuditState, make_auditor
from registry.follow import FollowState
from tlog.note import Ed25519Signer, Ed25519Verifier, sign_note

SIZES = [1, 255, 256, 257, 65_535, 65_536, 70_000]
ORIGIN = "example.com/static"
KEY = Ed25519Signer.generate(ORIGIN)
VERIFIER = Ed25519Verifier(KEY.name, KEY.public_key)
KEY_ALICE = Ed25519Signer.generate("alice")


def entry(i: int) -> bytes:
    """Entries of varied length, every fifth one empty."""
    return (b"entry %d|" % i) * (i % 5)


class Tree:
    """MTH (RFC 6962 §2.1) of any [lo, hi) of a list of entries, straight from the recursive definition."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        self.leaves = [hashlib.sha256(b"\x00" + e).digest() for e in entries]
        self.memo: dict[tuple[int, int], bytes] = {}

    def mth(self, lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return hashlib.sha256(b"").digest()
        if hi - lo == 1:
            return self.leaves[lo]
        h = self.memo.get((lo, hi))
        if h is None:
            k = 1
            while k * 2 < hi - lo:  # the largest power of two smaller than n
                k *= 2
            h = self.memo[(lo, hi)] = hashlib.sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi)).digest()
        return h


def index_path(n: int) -> str:
    """tlog-tiles: zero-padded 3-digit elements, all but the last prefixed with x."""
    digits = str(n)
    digits = "0" * (-len(digits) % 3) + digits
    elements = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join(["x" + e for e in elements[:-1]] + [elements[-1]])


def tile_path(level: int | str, n: int, width: int) -> str:
    return f"tile/{level}/{index_path(n)}" + ("" if width == 256 else f".p/{width}")


def static_files(tree: Tree, size: int) -> Iterator[tuple[str, bytes]]:
    """Every resource a tlog-tiles log of this size serves, as (path, bytes); full tiles first."""
    level = 0
    while size // 256**level:
        count = size // 256**level  # hashes at this level
        span = 256**level
        for n in range((count + 255) // 256):
            width = min(256, count - n * 256)
            tile = b"".join(tree.mth((n * 256 + i) * span, (n * 256 + i + 1) * span) for i in range(width))
            yield tile_path(level, n, width), tile
            if level == 0:
                bundle = b"".join(struct.pack(">H", len(e)) + e for e in tree.entries[n * 256 : n * 256 + width])
                yield tile_path("entries", n, width), bundle
        level += 1


class StaticLog:
    """A directory a static file server serves: full tiles, the latest partial tiles, the checkpoint."""

    def __init__(self, root: pathlib.Path, tree: Tree) -> None:
        self.root = root
        self.tree = tree

    def publish(self, size: int) -> None:
        """Write the tiles of size (full ones only if new), delete every older partial tile, then sign."""
        keep = set()
        for path, data in static_files(self.tree, size):
            file = self.root / path
            keep.add(file)
            if ".p/" in path or not file.exists():
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(data)
        for file in self.root.glob("tile/**/*.p/*"):
            if file not in keep:
                file.unlink()
        self.sign(size)

    def sign(self, size: int) -> None:
        root = base64.b64encode(self.tree.mth(0, size)).decode()
        (self.root / "checkpoint").write_bytes(sign_note(f"{ORIGIN}\n{size}\n{root}\n", [KEY]))

    def state(self, size: int) -> AuditState:
        """An audit state at size as the definitions give it: MTH of each perfect subtree of [0, size), left to right."""
        compact, lo = [], 0
        for bit in reversed(range(size.bit_length())):
            if size >> bit & 1:
                compact.append(self.tree.mth(lo, lo + (1 << bit)))
                lo += 1 << bit
        return AuditState(FollowState(size, tuple(compact)), registry_log=False)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob("tile/**/*") if p.is_file())


@pytest.fixture(scope="module")
def tree() -> Tree:
    return Tree([entry(i) for i in range(max(SIZES))])


@pytest.fixture
async def served(aiohttp_server, tmp_path):  # type: ignore[no-untyped-def]
    """A static file server over tmp_path/log; yields (url, directory, requests seen as (path, status))."""
    directory = tmp_path / "log"
    directory.mkdir()
    seen: list[tuple[str, int]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.path, response.status))  # as sent: a missing file turns 404 in prepare

    app = web.Application()
    app.on_response_prepare.append(record)
    app.router.add_static("/", directory)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), directory, seen


async def audit(url: str, session, state: AuditState | None = None):  # type: ignore[no-untyped-def]
    auditor = make_auditor(log_url=url, session=session, verifiers=[VERIFIER], state=state or AuditState())
    await auditor.run()
    return auditor


def flip(path: pathlib.Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


# The writer against the published vectors.


def test_the_writer_gives_the_rfc6962_roots_and_leaf_hashes() -> None:
    v = load_vectors("rfc6962-8-leaves.json")
    t = Tree([base64.b64decode(leaf) for leaf in v["leaves_b64"]])
    assert [base64.b64encode(h).decode() for h in t.leaves] == v["leaf_hashes"]
    assert [base64.b64encode(t.mth(0, n)).decode() for n in range(9)] == v["roots"]


def test_the_writer_writes_the_tiles_tlog_tiles_names(tree: Tree, tmp_path: pathlib.Path) -> None:
    v = load_vectors("tiles.json")
    assert {str(n): index_path(n) for n in map(int, v["index_path"])} == v["index_path"]
    for size, names in v["tiles_for_size"].items():
        want = []
        for name in names:
            if name.endswith(" full"):  # "tile/0/000 .. tile/0/272 full"
                first, last = name.removesuffix(" full").split(" .. ")
                level = int(first.split("/")[1])
                want += [tile_path(level, n, 256) for n in range(int(first[-3:]), int(last[-3:]) + 1)]
            else:
                want.append(name)
        log = StaticLog(tmp_path / size, tree)
        log.publish(int(size))
        assert [f for f in log.files() if not f.startswith("tile/entries/")] == sorted(want)


# The audit of every size: clean, and only tiles that exist are asked for.


@pytest.mark.parametrize("size", SIZES)
async def test_audit_of_a_static_log_reads_only_the_tiles_it_has(size: int, tree: Tree, served, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    url, directory, seen = served
    log = StaticLog(directory, tree)
    log.publish(size)
    client = await aiohttp_client(web.Application())
    auditor = await audit(url, client.session)
    report = auditor.report(url)
    assert report["findings"] == [] and report["tree_size"] == size and report["registry_log"] is False
    assert all(status == 200 for _, status in seen), [s for s in seen if s[1] != 200]
    assert reads(seen) == log.files() == tiles_with_new_hashes(0, size)  # each once


async def test_the_audit_cli_is_clean_then_names_a_flipped_tile(tree: Tree, served) -> None:  # type: ignore[no-untyped-def]
    url, directory, _ = served
    StaticLog(directory, tree).publish(600)

    async def cli() -> tuple[int, dict]:  # type: ignore[type-arg]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wasmlog", "audit", "--vkey", KEY.vkey, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None and out, err.decode()
        return proc.returncode, json.loads(out)

    code, report = await cli()
    assert (code, report["findings"], report["tree_size"]) == (0, [], 600)
    flip(directory / "tile/1/000.p/2", 32 + 7)
    code, report = await cli()
    assert code == 1
    assert [(f["kind"], f["where"]) for f in report["findings"]] == [("tile-mismatch", "tile/1/000.p/2")]


# One flipped byte anywhere: a finding that names the resource.


def expected_kind(path: str) -> set[str]:
    return {"bundle-mismatch", "malformed-tile"} if path.startswith("tile/entries/") else {"tile-mismatch"}


@pytest.mark.parametrize("size", [1, 255, 256, 257, 600])
async def test_every_flipped_byte_of_a_small_log_is_named(size: int, tree: Tree, served) -> None:  # type: ignore[no-untyped-def]
    url, directory, _ = served
    log = StaticLog(directory, tree)
    log.publish(size)

    async def findings() -> list:  # type: ignore[type-arg]
        async with aiohttp.ClientSession() as session:
            return (await audit(url, session)).findings

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.sampled_from(log.files()), offset=st.integers(0, 1 << 16), bit=st.integers(0, 7))
    def one_flip(which: str, offset: int, bit: int) -> None:
        original = (directory / which).read_bytes()
        flip(directory / which, offset, bit)
        try:
            found = asyncio.run(findings())  # the server keeps serving on the test's loop meanwhile
        finally:
            (directory / which).write_bytes(original)
        named = [f for f in found if which in f.where.split()]
        assert named and named[0].kind in expected_kind(which), found
        # Nothing else is blamed (a wrong bundle also gives a wrong root).
        assert {f.where for f in found} <= {which, "checkpoint"}, found

    await asyncio.to_thread(one_flip)


@pytest.mark.parametrize(("which", "offset", "resume_at"), [
    # Resumed from the definitions' state at 65,535: tile/1/000 is read for its last hash, and
    # its 255 hashes below that size must fold into the saved compact range.
    ("tile/1/000", 40 * 32 + 9, 65_535), ("tile/1/000", 255 * 32 + 9, 65_535), ("tile/2/000.p/1", 9, 65_535),
    ("tile/0/256", 40 * 32 + 9, 65_536), ("tile/entries/256", 1000, 65_536), ("tile/0/273.p/112", 40 * 32 + 9, 65_536),
    ("tile/entries/273.p/112", 1000, 65_536), ("tile/1/001.p/17", 9 * 32 + 9, 65_536),
])
async def test_a_flipped_byte_of_a_70000_entry_log_is_named(which: str, offset: int, resume_at: int, tree: Tree, served, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    url, directory, _ = served
    log = StaticLog(directory, tree)
    log.publish(70_000)
    flip(directory / which, offset)
    client = await aiohttp_client(web.Application())
    auditor = await audit(url, client.session, log.state(resume_at))
    findings = auditor.findings
    assert findings and findings[0].where == which and findings[0].kind in expected_kind(which), findings
    assert {f.where for f in findings} <= {which, "checkpoint"}, findings
    assert auditor.state.follow.size == (70_000 if findings[0].kind == "tile-mismatch" else resume_at)


# Resumption: the log grows and deletes its old partial tiles; the audit goes on from its state.


def tiles_with_new_hashes(old: int, new: int) -> list[str]:
    """The tiles (as they are at new) that hold a hash the tree of size old does not have, and their bundles."""
    paths = []
    level = 0
    while new // 256**level:
        before, after = old // 256**level, new // 256**level  # hashes at this level
        for n in range(before // 256, (after + 255) // 256 if after > before else 0):
            width = min(256, after - n * 256)
            paths += [tile_path(level, n, width)] + ([tile_path("entries", n, width)] if level == 0 else [])
        level += 1
    return sorted(paths)


def reads(seen: list[tuple[str, int]]) -> list[str]:
    return sorted(path.removeprefix("/") for path, _ in seen if path != "/checkpoint")



async def test_an_audit_resumes_as_the_log_grows(tree: Tree, served, aiohttp_client, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    url, directory, seen = served
    log = StaticLog(directory, tree)
    client = await aiohttp_client(web.Application())
    state, audited = AuditState(), 0
    for size in [1, 300, 300, 511, 513, 1000, 4096, 4097]:
        log.publish(size)
        state.save(tmp_path / "state")
        state = AuditState.load(tmp_path / "state")
        seen.clear()
        auditor = await audit(url, client.session, state)
        assert auditor.findings == [] and state.follow.size == size
        assert all(status == 200 for _, status in seen), seen
        assert reads(seen) == tiles_with_new_hashes(audited, size)
        audited = size


async def test_a_resumed_audit_checks_the_hashes_below_its_size(tree: Tree, served, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """Hashes the tiles hold below the audited size must fold into the saved compact range."""
    url, directory, _ = served
    log = StaticLog(directory, tree)
    log.publish(1000)
    client = await aiohttp_client(web.Application())
    for which, offset in [("tile/0/001", 10 * 32), ("tile/entries/001", 5), ("tile/1/000.p/3", 0)]:
        flip(directory / which, offset)
        auditor = await audit(url, client.session, log.state(300))  # 300: tile 1 holds 44 old hashes, tile/1 one
        assert [(f.kind, f.where) for f in auditor.findings] == [(expected_kind(which).pop() if "entries" not in which else "bundle-mismatch", which)]
        assert "before 300" in auditor.findings[0].message
        log.publish(1000)  # rewrites the partial tile; restore the full ones by hand
        if ".p/" not in which:
            flip(directory / which, offset)


async def test_the_large_boundaries_resume_from_the_definitions(tree: Tree, served, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    url, directory, seen = served
    log = StaticLog(directory, tree)
    client = await aiohttp_client(web.Application())
    state, audited = log.state(65_535), 65_535
    for size in [65_536, 65_537, 70_000]:
        log.publish(size)
        seen.clear()
        auditor = await audit(url, client.session, state)
        assert auditor.findings == [] and state.follow.size == size
        assert all(status == 200 for _, status in seen), seen
        assert reads(seen) == tiles_with_new_hashes(audited, size)
        audited = size


async def test_a_checkpoint_whose_partial_tiles_are_gone_is_read_from_the_full_ones(tree: Tree, served, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """tlog-tiles lets a log delete a partial tile once the full one exists; the client falls back to it."""
    url, directory, seen = served
    log = StaticLog(directory, tree)
    client = await aiohttp_client(web.Application())
    # A partial tile that is gone while its full tile is not there yet: said, and the state stays.
    log.publish(512)
    log.sign(300)
    auditor = await audit(url, client.session, log.state(200))
    assert [(f.kind, f.where) for f in auditor.findings] == [("fetch-failed", "tile/1/000.p/1")]
    assert auditor.state.follow.size == 200
    # Once the full tiles exist, the same checkpoint audits clean.
    log.publish(65_536)
    log.sign(300)
    seen.clear()
    auditor = await audit(url, client.session, log.state(200))
    assert auditor.findings == [] and auditor.state.follow.size == 300
    assert sorted(path for path, status in seen if status == 404) == ["/tile/0/001.p/44", "/tile/1/000.p/1", "/tile/entries/001.p/44"]
    assert {"/tile/entries/001", "/tile/0/001", "/tile/1/000"} <= {path for path, status in seen if status == 200}


async def test_an_audit_that_stops_short_replays_the_same_records_next_time(aiohttp_client, served, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    """A registry log served statically; an audit that cannot verify its entries keeps its registry state too."""
    from registry_helpers import REGISTRY_KEY, start_registry, wat_module

    from registry.record import parse_package_ref

    url, directory, _ = served
    api, client, _, _ = await start_registry(aiohttp_client, tmp_path)
    base = wat_module("no_imports", tmp_path)
    await api.publish(KEY_ALICE, parse_package_ref("acme:a@1.0.0"), base)
    await api.publish(KEY_ALICE, parse_package_ref("acme:a@1.0.1"), base + b"\x00\x02\x01x")
    async with client.get("/log/checkpoint") as r:
        checkpoint = await r.read()
    size = int(checkpoint.split(b"\n")[1])
    for path in ["checkpoint", tile_path(0, 0, size), tile_path("entries", 0, size)]:
        async with client.get("/log/" + path) as r:
            assert r.status == 200
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            (directory / path).write_bytes(await r.read())
    bundle = directory / tile_path("entries", 0, size)
    original = bundle.read_bytes()
    flip(bundle, len(original) - 5)  # inside the last record
    verifiers = [Ed25519Verifier(REGISTRY_KEY.name, REGISTRY_KEY.public_key)]
    state = AuditState()
    auditor = make_auditor(log_url=url, session=client.session, verifiers=verifiers, state=state)
    await auditor.run()
    assert {(f.kind, f.where) for f in auditor.findings} >= {("bundle-mismatch", tile_path("entries", 0, size)), ("root-mismatch", "checkpoint")}
    assert state.follow.size == 0 and len(state.registry.namespaces) == 0 and state.previous == {}
    bundle.write_bytes(original)
    auditor = make_auditor(log_url=url, session=client.session, verifiers=verifiers, state=state)
    await auditor.run()
    report = auditor.report(url)
    assert report["findings"] == [] and report["tree_size"] == size and report["releases"] == 2
