"""Key files: PREFIX.key (the private key text, mode 0600) and PREFIX.vkey."""

from __future__ import annotations

import os
import pathlib

from .errors import MalformedError
from .note import (
    ALG_ED25519,
    OWN_KEY_NAME_RULE,
    Ed25519Signer,
    is_own_key_name,
    parse_private_key,
)


def write_key_pair(signer: Ed25519Signer, prefix: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write PREFIX.key (mode 0600, never overwritten: raises FileExistsError) and PREFIX.vkey."""
    key_path, vkey_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".vkey")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signer.private_key + "\n")
    vkey_path.write_text(signer.vkey + "\n")
    return key_path, vkey_path


def read_signer(path: pathlib.Path, *, alg: int = ALG_ED25519) -> Ed25519Signer:
    """Read a private key file: the key text and at most one newline. Raises MalformedError."""
    text = path.read_text()
    text = text.removesuffix("\n")
    return parse_private_key(text, alg=alg)


def load_or_create_signer(prefix: pathlib.Path, name: str, *, alg: int = ALG_ED25519) -> Ed25519Signer:
    """Read PREFIX.key, or generate and write a new key pair if there is none."""
    key_path = prefix.with_name(prefix.name + ".key")
    if key_path.exists():
        return read_signer(key_path, alg=alg)
    if not is_own_key_name(name):
        raise MalformedError(f"{OWN_KEY_NAME_RULE}: {name!r}")
    signer = Ed25519Signer.generate(name, alg)
    write_key_pair(signer, prefix)
    return signer
