"""What changed between two releases: SBOM components and imports. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .dsse import strict_json
from .record import RecordError
from .sbom import CYCLONEDX, SPDX


def sbom_components(media_type: str | None, data: bytes | None) -> dict[str, str]:
    """Component name (purl when there is one) -> version, from a CycloneDX or SPDX JSON SBOM."""
    if data is None:
        return {}
    obj = strict_json(data, "SBOM")
    if not isinstance(obj, dict):
        raise RecordError("an SBOM is a JSON object")
    out: dict[str, str] = {}
    if media_type == CYCLONEDX:
        stack = list(obj.get("components") or [])
        while stack:
            c = stack.pop()
            if isinstance(c, dict):
                name = str(c.get("purl", "").split("@")[0] or c.get("name", "?"))
                out[name] = str(c.get("version", ""))
                stack.extend(c.get("components") or [])
    elif media_type == SPDX:
        for p in obj.get("packages") or []:
            if isinstance(p, dict):
                out[str(p.get("name", "?"))] = str(p.get("versionInfo", ""))
    return out


def component_changes(old: dict[str, str], new: dict[str, str]) -> dict[str, Any]:
    """Components (sbom_components' maps) that new adds, removes or changes the version of, over old."""
    return {
        "added": {k: new[k] for k in sorted(new.keys() - old.keys())},
        "removed": {k: old[k] for k in sorted(old.keys() - new.keys())},
        "changed": {k: {"from": old[k], "to": new[k]} for k in sorted(old.keys() & new.keys()) if old[k] != new[k]},
    }


def _imports(meta: dict[str, Any]) -> set[str]:
    return {f"{i['module']}.{i['name']}" if i["module"] else i["name"] for i in meta["imports"]}


def diff_releases(meta1: dict[str, Any], meta2: dict[str, Any], sbom1: bytes | None, sbom2: bytes | None) -> dict[str, Any]:
    """A JSON-ready difference: components added/removed/changed and imports added/removed."""
    c1 = sbom_components(meta1["sbom"]["mediaType"] if meta1["sbom"] else None, sbom1)
    c2 = sbom_components(meta2["sbom"]["mediaType"] if meta2["sbom"] else None, sbom2)
    i1, i2 = _imports(meta1), _imports(meta2)
    return {
        "from": meta1["package"],
        "to": meta2["package"],
        "components": component_changes(c1, c2),
        "imports": {"added": sorted(i2 - i1), "removed": sorted(i1 - i2)},
    }


def format_diff(d: dict[str, Any]) -> str:
    lines = [f"{d['from']} -> {d['to']}"]

    def section(title: str, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            lines.append(f"  {title}:")
            lines.extend(f"    {x}" for x in items)

    section("components added", (f"+ {k} {v}" for k, v in d["components"]["added"].items()))
    section("components removed", (f"- {k} {v}" for k, v in d["components"]["removed"].items()))
    section("components changed", (f"~ {k} {v['from']} -> {v['to']}" for k, v in d["components"]["changed"].items()))
    section("imports added (new capabilities)", (f"+ {x}" for x in d["imports"]["added"]))
    section("imports removed", (f"- {x}" for x in d["imports"]["removed"]))
    if len(lines) == 1:
        lines.append("  no differences in components or imports")
    return "\n".join(lines)
