"""The documented HTTP routes and error statuses are the real ones, both ways.

Route tables are read from the documents themselves: spec/registry-api.md (the registry),
README.md's "HTTP API of the log", "Witnesses" and the edge agent's two listeners' tables. Each documented route, with sample
values for its placeholders, must resolve to a route of the real aiohttp app (the registry's
`/log/` sub-app included) for its method; and every route of the app must be reached by some
documented one. A route added or removed in code without its document (or the reverse) fails here.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from registry_helpers import build_registry

from registry.server import make_app as make_registry_app
from tlog.log import Log
from tlog.note import ALG_COSIGNATURE_V1, Ed25519Signer, Ed25519Verifier
from tlog.sequencer import Sequencer
from tlog.server import make_app as make_log_app
from tlog.storage.memory import MemoryLogStore
from witness.loglist import KnownLog
from witness.server import make_app as make_witness_app
from witness.state import WitnessState
from witness.witness import Witness

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
# A sample value for every placeholder the documents use; a new placeholder needs one here.
SAMPLES = {
    "{ns}": "acme", "{name}": "hello", "{version}": "1.0.0",
    "<L>": "0", "<N>": "000", "<W>": "7", "<hex sha256(origin)>": "0" * 64,
}
ROW = re.compile(r"^\|\s*`(" + "|".join(METHODS) + r") ([^`]+)`")


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level."""
    m = re.search(r"^(#+) " + re.escape(heading) + r"\n", text, re.MULTILINE)
    assert m is not None, f"no heading {heading!r}"
    rest = text[m.end() :]
    end = re.search(r"^#{1,%d} " % len(m.group(1)), rest, re.MULTILINE)  # noqa: UP031 - braces are the regex's
    return rest[: end.start() if end else len(rest)]


def documented(text: str) -> list[tuple[str, str]]:
    """(method, path template) of each table row that starts with `METHOD /path`; queries dropped."""
    return [(m.group(1), m.group(2).split("?", 1)[0]) for line in text.splitlines() if (m := ROW.match(line))]


def concrete(template: str) -> list[str]:
    """Sample paths for a template: placeholders filled, an optional [part] both left out and put in."""
    paths = [template]
    if (opt := re.search(r"\[([^\]]+)\]", template)) is not None:
        paths = [template.replace(opt.group(0), ""), template.replace(opt.group(0), opt.group(1))]
    out = []
    for p in paths:
        for placeholder, value in SAMPLES.items():
            p = p.replace(placeholder, value)
        assert not re.search(r"[{}<>\[\]]", p), f"{template}: a placeholder without a sample value"
        out.append(p)
    return out


def app_routes(app: web.Application) -> Iterator[tuple[str, str, web.AbstractRoute]]:
    """(method, path pattern, route) of every route of app and its sub-apps; HEAD twins of GET left out."""
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:
            yield from app_routes(info["app"])  # its routes carry the prefix already
            continue
        for route in resource:
            if route.method != "HEAD":
                yield route.method, info.get("path") or info.get("formatter") or "?", route


async def resolve(app: web.Application, method: str, path: str) -> web.AbstractRoute | None:
    match = await app.router.resolve(make_mocked_request(method, path, app=app))
    return None if match.http_exception is not None else match.route


async def check_both_ways(app: web.Application, routes: list[tuple[str, str]]) -> None:
    assert routes, "no routes documented"
    reached: set[int] = set()
    for method, template in routes:
        for path in concrete(template):
            route = await resolve(app, method, path)
            assert route is not None, f"documented {method} {template} ({path}) is not a route of the app"
            reached.add(id(route))
    undocumented = [f"{method} {pattern}" for method, pattern, route in app_routes(app) if id(route) not in reached]
    assert not undocumented, f"routes of the app missing from the documents: {undocumented}"


README = (ROOT / "README.md").read_text()
LOG_ROUTES = documented(section(README, "HTTP API of the log"))
WITNESS_ROUTES = documented(section(README, "Witnesses"))
REGISTRY_ROUTES = documented((ROOT / "spec" / "registry-api.md").read_text())
AGENT_MODULE_ROUTES = documented(section(README, "Agent module listener"))
AGENT_ADMIN_ROUTES = documented(section(README, "Agent admin listener"))


def registry_routes() -> list[tuple[str, str]]:
    """The registry's table, with `GET /log/...` standing for every GET route of the log's table."""
    routes = []
    for method, path in REGISTRY_ROUTES:
        if path == "/log/...":
            routes += [(m, "/log" + p) for m, p in LOG_ROUTES if m == "GET"]
        else:
            routes.append((method, path))
    return routes


def test_the_tables_are_found() -> None:
    assert ("POST", "/add") in LOG_ROUTES and ("GET", "/checkpoint") in LOG_ROUTES
    assert ("POST", "/add-checkpoint") in WITNESS_ROUTES
    assert ("POST", "/api/v1/publish") in REGISTRY_ROUTES and ("GET", "/log/...") in REGISTRY_ROUTES


async def test_log_routes_are_documented_both_ways() -> None:
    app = make_log_app(Sequencer(Log(MemoryLogStore(), Ed25519Signer.generate("example.com/routes"))))
    await check_both_ways(app, LOG_ROUTES)


async def test_registry_routes_are_documented_both_ways(tmp_path: pathlib.Path) -> None:
    registry, seq, store = build_registry(tmp_path)
    try:
        await check_both_ways(make_registry_app(registry, seq), registry_routes())
    finally:
        store.close()


async def test_witness_routes_are_documented_both_ways(tmp_path: pathlib.Path) -> None:
    log_key = Ed25519Signer.generate("example.com/routes")
    witness = Witness(
        signer=Ed25519Signer.generate("w.example", ALG_COSIGNATURE_V1),
        logs={log_key.name: KnownLog(log_key.name, Ed25519Verifier(log_key.name, log_key.public_key), 86400)},
        state=WitnessState(str(tmp_path / "w")),
    )
    await check_both_ways(make_witness_app(witness), WITNESS_ROUTES)


async def test_the_agents_listeners_are_documented_both_ways(tmp_path: pathlib.Path) -> None:
    """The module listener serves /run/... and nothing else; the admin listener the agent's own API."""
    from agent_helpers import write_config

    from edge.agent import Agent
    from edge.agent_config import parse_config
    from edge.agent_server import make_apps, new_sandbox

    cfg = write_config(tmp_path, ["http://127.0.0.1:9"], {})
    config = parse_config(cfg.read_text(), cfg.parent)
    modules, admin = make_apps(Agent(config, new_sandbox(config, workers=1)), periodic_sweeps=False)  # no worker started
    assert all(path.startswith("/run/") for _, path in AGENT_MODULE_ROUTES)
    await check_both_ways(modules, AGENT_MODULE_ROUTES)
    await check_both_ways(admin, AGENT_ADMIN_ROUTES)


async def test_an_undocumented_route_is_caught(tmp_path: pathlib.Path) -> None:
    """The check itself can fail: a route the table does not list, and a listed route the app lacks."""
    app = make_log_app(Sequencer(Log(MemoryLogStore(), Ed25519Signer.generate("example.com/routes"))))
    async def secret(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/secret", secret)
    with pytest.raises(AssertionError, match="GET /secret"):
        await check_both_ways(app, LOG_ROUTES)
    with pytest.raises(AssertionError, match="GET /nowhere"):
        await check_both_ways(make_log_app(Sequencer(Log(MemoryLogStore(), Ed25519Signer.generate("example.com/r2")))),
                              [*LOG_ROUTES, ("GET", "/nowhere")])


def subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]


def test_registry_statuses_are_documented_both_ways() -> None:
    """Every status of the registry's error table (500 aside) is in the spec's status table, and only those."""
    from registry.server import STATUS
    from registry.state import ValidationError

    assert {cls for cls, _ in STATUS} >= {ValidationError, *subclasses(ValidationError)}, "a namespace rule error without a status"
    in_code = {status for _, status in STATUS}
    table = section((ROOT / "spec" / "registry-api.md").read_text(), "wasmlog registry HTTP API (v1)")
    documented_statuses = {int(m) for m in re.findall(r"^\| (\d{3}) \|", table, re.MULTILINE)}
    assert documented_statuses == in_code - {500}


def test_log_statuses_are_documented_both_ways() -> None:
    from tlog.server import STATUS

    errors = re.search(r"^Errors: (.*?)\n\n", section(README, "HTTP API of the log"), re.MULTILINE | re.DOTALL)
    assert errors is not None
    documented_statuses = {int(s) for s in re.findall(r"(?<![\d,])([45]\d\d)(?![\d,])", errors.group(1))}
    assert documented_statuses - {500} == {status for _, status in STATUS} - {500}
