"""SBOM checks: the strict pre-pass and its limits, the libraries' failures as 422s, and the
validator processes with their time budget (real worker processes)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from registry_helpers import CYCLONEDX

from registry.record import RecordError
from registry.sbom import CYCLONEDX as CDX
from registry.sbom import (
    MAX_SBOM_COMPONENTS,
    MAX_SBOM_DEPENDENCIES,
    MAX_SBOM_DEPTH,
    MAX_SBOM_VALUES,
    SPDX,
    validate_sbom,
)
from registry.sbom_pool import SbomPool, SbomTooSlow, SbomValidatorsBusy

SPDX_DOC = {
    "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": "hello",
    "documentNamespace": "https://example.com/hello-1.0.0",
    "creationInfo": {"created": "2024-01-01T00:00:00Z", "creators": ["Tool: wasmlog-test"]},
    "packages": [{"SPDXID": "SPDXRef-serde", "name": "serde", "downloadLocation": "NOASSERTION"}],
}


def cyclonedx(components: int = 1, dependencies: int = 0, **extra: object) -> bytes:
    doc = {"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
           "components": [{"type": "library", "name": f"c{i}", "version": "1.0.0", "bom-ref": f"r{i}"} for i in range(components)],
           "dependencies": [{"ref": f"r{i}", "dependsOn": []} for i in range(dependencies)], **extra}
    return json.dumps(doc).encode()


def refusal(media_type: str, data: bytes) -> str:
    with pytest.raises(RecordError) as e:
        validate_sbom(media_type, data)
    return str(e.value)


def test_valid_documents_pass() -> None:
    validate_sbom(CDX, CYCLONEDX)
    validate_sbom(SPDX, json.dumps(SPDX_DOC).encode())
    validate_sbom(CDX, cyclonedx(MAX_SBOM_COMPONENTS, MAX_SBOM_DEPENDENCIES // 2))


def test_the_pre_pass_refuses_past_each_limit_and_names_it() -> None:
    assert f"more than {MAX_SBOM_COMPONENTS} components" in refusal(CDX, cyclonedx(MAX_SBOM_COMPONENTS + 1))
    assert f"more than {MAX_SBOM_COMPONENTS} components" in refusal(CDX, cyclonedx(4000, 4000))  # the first limit in document order
    nested = cyclonedx(600, metadata={"component": {"type": "application", "name": "app", "components": [
        {"type": "library", "name": f"n{i}"} for i in range(MAX_SBOM_COMPONENTS - 600 + 1)]}})
    assert "components" in refusal(CDX, nested)  # counted at any depth
    assert f"more than {MAX_SBOM_DEPENDENCIES} dependencies" in refusal(CDX, cyclonedx(1, MAX_SBOM_DEPENDENCIES + 1))
    relationships = {**SPDX_DOC, "relationships": [
        {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-serde"}
    ] * (MAX_SBOM_DEPENDENCIES + 1)}
    assert "dependencies" in refusal(SPDX, json.dumps(relationships).encode())
    deep: object = "x"
    for _ in range(MAX_SBOM_DEPTH):
        deep = {"a": deep}
    assert f"deeper than {MAX_SBOM_DEPTH}" in refusal(CDX, cyclonedx(properties=[{"name": "p", "value": "v", "x": deep}]))
    assert f"{MAX_SBOM_VALUES} JSON values" in refusal(CDX, cyclonedx(properties=[{"name": "p", "value": "v"}] * (MAX_SBOM_VALUES // 3)))
    assert "not valid JSON" in refusal(CDX, b"[" * 100_000)  # refused by the parser, no RecursionError escapes


def test_strict_json_and_the_format_marker() -> None:
    assert "duplicate JSON key" in refusal(CDX, b'{"bomFormat":"CycloneDX","bomFormat":"CycloneDX","specVersion":"1.5"}')
    assert "not valid JSON" in refusal(CDX, b'{"bomFormat":"CycloneDX","specVersion":"1.5","version":NaN}')
    assert "bomFormat" in refusal(CDX, json.dumps(SPDX_DOC).encode())
    assert "spdxVersion" in refusal(SPDX, CYCLONEDX)
    assert "JSON object" in refusal(CDX, b"[]")
    assert "media type" in refusal("application/json", CYCLONEDX)


def test_spdx_with_wrong_field_types_is_a_record_error() -> None:
    """These used to escape spdx-tools as AttributeError / TypeError (a 500)."""
    for wrong in ({"packages": {"a": 1}}, {"name": 5}, {"creationInfo": {"created": 5, "creators": ["Tool: x"]}},
                  {"packages": [5]}, {"relationships": "x"}, {"creationInfo": []}):
        assert "SPDX" in refusal(SPDX, json.dumps({**SPDX_DOC, **wrong}).encode()), wrong


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
SPDX_KEYS = [*SPDX_DOC, "relationships", "files", "snippets", "hasExtractedLicensingInfos", "annotations", "documentDescribes",
             "externalDocumentRefs", "comment"]
SPDX_PACKAGE_KEYS = ["SPDXID", "name", "downloadLocation", "versionInfo", "checksums", "licenseConcluded", "externalRefs",
                     "filesAnalyzed", "supplier", "originator", "primaryPackagePurpose", "verificationCode"]
CDX_KEYS = ["bomFormat", "specVersion", "version", "serialNumber", "metadata", "components", "dependencies", "services",
            "externalReferences", "compositions", "vulnerabilities", "properties"]
CDX_COMPONENT_KEYS = ["type", "name", "version", "bom-ref", "purl", "hashes", "licenses", "components", "supplier", "scope"]


@st.composite
def sbom_like(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid document with some fields (top level or in its first component) replaced by random JSON."""
    spdx = draw(st.booleans())
    doc: dict = json.loads(json.dumps(SPDX_DOC)) if spdx else json.loads(CYCLONEDX)  # type: ignore[type-arg]
    inner = doc["packages"][0] if spdx else doc["components"][0]
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from([doc, inner]))
        keys = (SPDX_KEYS if target is doc else SPDX_PACKAGE_KEYS) if spdx else (CDX_KEYS if target is doc else CDX_COMPONENT_KEYS)
        key = draw(st.sampled_from(keys))
        if draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = draw(json_values)
    return (SPDX if spdx else CDX), json.dumps(doc).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sbom_like())
def test_random_sbom_like_documents_are_accepted_or_a_record_error(case: tuple[str, bytes]) -> None:
    """Never anything but RecordError (HTTP 422): no library exception escapes as a 500."""
    media_type, data = case
    try:
        validate_sbom(media_type, data)
    except RecordError as e:
        assert str(e)


def running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pids_of(pool: SbomPool) -> list[int]:
    return [w.process.pid for w in pool._idle]


async def test_the_pool_validates_in_worker_processes_and_kills_one_past_its_budget() -> None:
    pool = SbomPool(workers=1, budget=30.0)
    try:
        await pool.validate(CDX, CYCLONEDX)
        with pytest.raises(RecordError) as invalid:
            await pool.validate(CDX, b'{"bomFormat":"CycloneDX","specVersion":"1.5","version":"x"}')
        assert "invalid CycloneDX" in str(invalid.value)
        with pytest.raises(RecordError) as wrong_type:
            await pool.validate(SPDX, json.dumps({**SPDX_DOC, "packages": {"a": 1}}).encode())
        assert "SPDX" in str(wrong_type.value)
        assert pool.validations == 3
        (first,) = _pids_of(pool)  # one worker did all three
        assert first != os.getpid() and running(first)

        pool.budget = 1e-9  # nothing validates this fast: the worker is killed
        with pytest.raises(SbomTooSlow) as slow:
            await pool.validate(CDX, cyclonedx(MAX_SBOM_COMPONENTS))
        assert "budget" in str(slow.value)
        assert not _pids_of(pool)
        assert not running(first)

        pool.budget = 30.0  # a new worker takes over
        await pool.validate(CDX, CYCLONEDX)
        (second,) = _pids_of(pool)
        assert second != first and pool.validations == 5
    finally:
        pool.close()
    assert not _pids_of(pool)


async def test_the_pool_refuses_with_503_when_too_many_wait() -> None:
    pool = SbomPool(workers=1, max_waiting=0)
    try:
        results = await asyncio.gather(pool.validate(CDX, CYCLONEDX), pool.validate(CDX, CYCLONEDX), return_exceptions=True)
        assert results[0] is None and isinstance(results[1], SbomValidatorsBusy)
    finally:
        pool.close()
