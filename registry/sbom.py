"""SBOM checks: a cheap strict pre-pass with limits, then the maintained library of each format.

check_sbom is linear in the document: size, strict JSON (UTF-8, no duplicate keys), the
format's marker, and limits on nesting depth, JSON values, components and dependencies.
validate_sbom runs check_sbom and then the libraries, whose cost is not linear (CycloneDX JSON schema
validation via cyclonedx-python-lib, SPDX parsing and validation via spdx-tools); the registry
runs it in worker processes with a time budget (registry/sbom_pool.py). Every problem with the
document is a RecordError (HTTP 422); only the size is a TooLargeError (413).
"""

from __future__ import annotations

import importlib.util

from tlog.errors import MalformedError, MissingDependencyError, TooLargeError

from .dsse import strict_json
from .record import RecordError

CYCLONEDX = "application/vnd.cyclonedx+json"
SPDX = "application/spdx+json"
MAX_SBOM_BYTES = 16 << 20
MAX_SBOM_DEPTH = 32  # nested arrays and objects
MAX_SBOM_VALUES = 200_000  # JSON values of every kind
MAX_SBOM_COMPONENTS = 1_000  # CycloneDX components and services, at any depth; SPDX packages, files, snippets
MAX_SBOM_DEPENDENCIES = 2_000  # CycloneDX dependency entries; SPDX relationships

# Arrays whose items count as components or as dependencies, by format.
_COMPONENT_ARRAYS = {CYCLONEDX: frozenset({"components", "services"}), SPDX: frozenset({"packages", "files", "snippets"})}
_DEPENDENCY_ARRAYS = {CYCLONEDX: frozenset({"dependencies"}), SPDX: frozenset({"relationships"})}


def check_sbom(media_type: str, data: bytes) -> dict:  # type: ignore[type-arg]
    """The pre-pass: return the parsed document, or raise RecordError (TooLargeError for the size)."""
    if len(data) > MAX_SBOM_BYTES:
        raise TooLargeError(f"SBOM of {len(data)} bytes is over {MAX_SBOM_BYTES}")
    if media_type not in _COMPONENT_ARRAYS:
        raise RecordError(f"unsupported SBOM media type {media_type[:80]!r}")
    try:
        obj = strict_json(data, "SBOM")  # the C parser: a RecursionError on absurd nesting is refused in there
    except MalformedError as e:
        raise RecordError(str(e)) from None
    if not isinstance(obj, dict):
        raise RecordError("an SBOM is a JSON object")
    if media_type == CYCLONEDX and obj.get("bomFormat") != "CycloneDX":
        raise RecordError('a CycloneDX SBOM has "bomFormat": "CycloneDX"')
    if media_type == SPDX and not isinstance(obj.get("spdxVersion"), str):
        raise RecordError('an SPDX SBOM has "spdxVersion" (a string)')
    _check_limits(obj, _COMPONENT_ARRAYS[media_type], _DEPENDENCY_ARRAYS[media_type])
    return obj


def _check_limits(obj: dict, component_keys: frozenset[str], dependency_keys: frozenset[str]) -> None:  # type: ignore[type-arg]
    """Walk the document once (no recursion) and refuse it at the first limit it passes."""
    values = components = dependencies = 0
    stack: list[tuple[object, int, object]] = [(obj, 1, None)]  # (value, depth, the key it is under)
    while stack:
        value, depth, key = stack.pop()
        values += 1
        if values > MAX_SBOM_VALUES:
            raise RecordError(f"the SBOM has more than {MAX_SBOM_VALUES} JSON values (the limit)")
        if isinstance(value, dict):
            if depth > MAX_SBOM_DEPTH:
                raise RecordError(f"the SBOM nests arrays and objects deeper than {MAX_SBOM_DEPTH} (the limit)")
            stack.extend((v, depth + 1, k) for k, v in reversed(value.items()))  # visited in document order
        elif isinstance(value, list):
            if depth > MAX_SBOM_DEPTH:
                raise RecordError(f"the SBOM nests arrays and objects deeper than {MAX_SBOM_DEPTH} (the limit)")
            if key in component_keys:
                components += len(value)
                if components > MAX_SBOM_COMPONENTS:
                    raise RecordError(f"the SBOM lists more than {MAX_SBOM_COMPONENTS} components (the limit)")
            elif key in dependency_keys:
                dependencies += len(value)
                if dependencies > MAX_SBOM_DEPENDENCIES:
                    raise RecordError(f"the SBOM lists more than {MAX_SBOM_DEPENDENCIES} dependencies (the limit)")
            stack.extend((v, depth + 1, None) for v in reversed(value))


EXTRA = "registry"  # the pyproject extra that installs the validation libraries
_LIBRARIES = {CYCLONEDX: ("CycloneDX SBOM validation", "cyclonedx"), SPDX: ("SPDX SBOM validation", "spdx_tools")}


def require_validator(media_type: str) -> None:
    """Raise MissingDependencyError if media_type's validation library is not installed (nothing is imported)."""
    feature, package = _LIBRARIES.get(media_type, ("", ""))
    if not package:
        return
    try:
        found = importlib.util.find_spec(package) is not None
    except ImportError as e:
        raise MissingDependencyError(feature, EXTRA, e) from None
    if not found:
        raise MissingDependencyError(feature, EXTRA, ModuleNotFoundError(name=package))


def preload() -> None:
    """Import the installed validation libraries now (they take about half a second)."""
    try:
        import cyclonedx.validation.json  # noqa: F401
        import spdx_tools.spdx.validation.document_validator  # noqa: F401
    except ImportError:
        pass  # validate_sbom names the missing extra for the document that needs it


def validate_sbom(media_type: str, data: bytes) -> None:
    """check_sbom, then the format's library. Raises RecordError (TooLargeError for the size) only:
    whatever a library raises on a document it cannot read is the document's problem."""
    obj = check_sbom(media_type, data)
    try:
        if media_type == CYCLONEDX:
            _cyclonedx(obj, data)
        else:
            _spdx(obj)
    except (RecordError, MissingDependencyError):
        raise
    except RecursionError:
        raise RecordError("the SBOM is nested too deeply for its validator") from None
    except Exception as e:  # noqa: BLE001 -- a third-party parser's failure on hostile input
        kind = "CycloneDX" if media_type == CYCLONEDX else "SPDX"
        raise RecordError(f"invalid {kind} SBOM: its validator could not read it ({type(e).__name__}: {str(e)[:200]})") from None


def _cyclonedx(obj: dict, data: bytes) -> None:  # type: ignore[type-arg]
    # Imported on first use: the schema libraries take about half a second to import, and are optional.
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError as e:
        raise MissingDependencyError("CycloneDX SBOM validation", EXTRA, e) from None

    try:
        version = SchemaVersion.from_version(str(obj.get("specVersion")))
    except (ValueError, KeyError):
        raise RecordError(f"unsupported CycloneDX specVersion {str(obj.get('specVersion'))[:20]!r}") from None
    error = JsonStrictValidator(version).validate_str(data.decode("utf-8"))
    if error is not None:
        raise RecordError(f"invalid CycloneDX {version.to_version()} SBOM: {str(error).splitlines()[0][:300]}")


def _spdx(obj: dict) -> None:  # type: ignore[type-arg]
    try:
        from spdx_tools.spdx.parser.error import SPDXParsingError
        from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import (
            JsonLikeDictParser,
        )
        from spdx_tools.spdx.validation.document_validator import (
            validate_full_spdx_document,
        )
    except ImportError as e:
        raise MissingDependencyError("SPDX SBOM validation", EXTRA, e) from None

    try:
        document = JsonLikeDictParser().parse(obj)
    except SPDXParsingError as e:
        raise RecordError(f"invalid SPDX SBOM: {'; '.join(e.get_messages())[:300]}") from None
    messages = validate_full_spdx_document(document)
    if messages:
        raise RecordError(f"invalid SPDX SBOM: {messages[0].validation_message[:300]}")
