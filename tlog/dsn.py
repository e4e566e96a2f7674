"""Keeping a PostgreSQL DSN's password out of messages.

libpq quotes the DSN, or pieces of it, in its errors (a URI that does not parse is quoted whole; an
unescaped '@' in a password makes the rest of it a host name it reports it cannot resolve), and
our errors carry libpq's text. redact() takes out every password the DSN holds, in URI userinfo,
as a URI query parameter or as a key=value pair, and the '@'-separated pieces of each.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://([^?#]*)@")  # greedy: up to the last '@' before the query
_QUERY_PASSWORD = re.compile(r"[?&]password=([^&#]*)")
_KEYWORD_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")
MIN_PIECE = 3  # shorter pieces of a password are not taken out of messages on their own (the whole one always is)
MASK = "***"


def passwords(dsn: str) -> set[str]:
    """Every password (and '@'- or space-separated piece of one, of MIN_PIECE or more characters) in dsn."""
    found: list[str] = []
    userinfo = _USERINFO.match(dsn)
    if userinfo is not None and ":" in userinfo[1]:
        found.append(userinfo[1].partition(":")[2])
    found += _QUERY_PASSWORD.findall(dsn)
    found += [value[1:-1] if value.startswith("'") and value.endswith("'") and len(value) > 1 else value.lstrip("'")
              for value in _KEYWORD_PASSWORD.findall(dsn)]
    secrets = {p for p in found if p}
    secrets |= {piece for p in secrets for piece in re.split(r"[@\s]", p) if len(piece) >= MIN_PIECE}
    return secrets


def redact(message: str, dsn: str) -> str:
    """message with every password of dsn (passwords()) replaced by ***."""
    for secret in sorted(passwords(dsn), key=len, reverse=True):
        message = message.replace(secret, MASK)
    return message
