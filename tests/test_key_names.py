"""Our key-name policy (issue 12): the keys we create are named in printable ASCII without space or '+'."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlog.errors import MalformedError
from tlog.keys import load_or_create_signer, read_signer
from tlog.note import MAX_KEY_NAME, is_own_key_name, is_valid_key_name


def keygen(name: str, prefix) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "wasmlog", "keygen", name, "--out", str(prefix)], check=False, capture_output=True, text=True)


@pytest.mark.parametrize("name", ["ali\u200bce", "caf\u00e9", "\u0430lice", "a b", "a+b", "", "x" * 256])
def test_keygen_refuses_names_that_are_not_printable_ascii(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = keygen(name, tmp_path / "k")
    assert run.returncode == 2 and "printable ASCII" in run.stderr
    assert not (tmp_path / "k.key").exists()
    with pytest.raises(MalformedError):
        load_or_create_signer(tmp_path / "k", name)
    assert not (tmp_path / "k.key").exists()


def test_keygen_accepts_printable_ascii(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = keygen("example.com/log-1~", tmp_path / "k")
    assert run.returncode == 0, run.stderr
    assert read_signer(tmp_path / "k.key").name == "example.com/log-1~"


@given(st.text(max_size=300))
def test_own_key_names_are_the_printable_ascii_subset_of_signed_note_names(name: str) -> None:
    want = 0 < len(name) <= MAX_KEY_NAME and all(0x21 <= ord(c) <= 0x7E and c != "+" for c in name)
    assert is_own_key_name(name) == want
    if want:
        assert is_valid_key_name(name)  # never stricter than C2SP in the other direction
