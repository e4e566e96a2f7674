"""SBOM validation with the maintained libraries of each format (not hand-written checks).

CycloneDX JSON is validated against the official JSON schema of its specVersion
(cyclonedx-python-lib); SPDX JSON is parsed and validated by spdx-tools.
"""

from __future__ import annotations

import json

from tlog.errors import MissingDependencyError, TooLargeError

from .dsse import strict_json
from .record import RecordError

CYCLONEDX = "application/vnd.cyclonedx+json"
SPDX = "application/spdx+json"
MAX_SBOM_BYTES = 16 << 20
EXTRA = "registry"  # the pyproject extra that installs the validation libraries


def validate_sbom(media_type: str, data: bytes) -> None:
    """Raise RecordError unless data is a valid SBOM of media_type.

    Raises MissingDependencyError when the validation libraries (the registry extra) are not installed.
    """
    if len(data) > MAX_SBOM_BYTES:
        raise TooLargeError(f"SBOM of {len(data)} bytes is over {MAX_SBOM_BYTES}")
    obj = strict_json(data, "SBOM")
    if not isinstance(obj, dict):
        raise RecordError("an SBOM is a JSON object")
    if media_type == CYCLONEDX:
        _cyclonedx(obj, data)
    elif media_type == SPDX:
        _spdx(obj)
    else:
        raise RecordError(f"unsupported SBOM media type {media_type[:80]!r}")


def _cyclonedx(obj: dict, data: bytes) -> None:  # type: ignore[type-arg]
    # Imported on first use: the schema libraries take about half a second to import, and are optional.
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError as e:
        raise MissingDependencyError("CycloneDX SBOM validation", EXTRA, e) from None

    if obj.get("bomFormat") != "CycloneDX":
        raise RecordError('a CycloneDX SBOM has "bomFormat": "CycloneDX"')
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
        from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
        from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    except ImportError as e:
        raise MissingDependencyError("SPDX SBOM validation", EXTRA, e) from None

    try:
        document = JsonLikeDictParser().parse(json.loads(json.dumps(obj)))
    except SPDXParsingError as e:
        raise RecordError(f"invalid SPDX SBOM: {'; '.join(e.get_messages())[:300]}") from None
    messages = validate_full_spdx_document(document)
    if messages:
        raise RecordError(f"invalid SPDX SBOM: {messages[0].validation_message[:300]}")
