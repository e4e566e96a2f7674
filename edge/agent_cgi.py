"""WAGI: a request as CGI variables, a module's stdout as a response. Pure.

stdout may start with a CGI header block (RFC 3875 section 6): header lines, then a blank line, then
the body. `Status: 404 Not Found` sets the status, `Location:` without a Status is a 302, any other
header is passed on except the hop-by-hop ones, Content-Length (the agent frames the body) and Set-Cookie.
Output that does not start with a well-formed header block is all body, text/plain.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from tlog.errors import MalformedError, TlogError

MAX_HEADER_BLOCK = 64 << 10
MAX_HEADERS = 100
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_STATUS = re.compile(rb"([2-5][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")  # no 1xx: an interim response is not an answer
# Never passed on: what the agent frames itself, hop-by-hop headers, and cookies: a cookie ignores ports, so one
# a module set would reach every other service of the agent's host (its admin listener, a registry), and no
# module ever sees a Cookie header to read one back (NOT_FORWARDED).
DROPPED = frozenset({"status", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "trailer", "te",
                     "proxy-connection", "proxy-authenticate", "set-cookie", "set-cookie2"})
_ENV_HEADER = re.compile(r"[A-Za-z0-9-]{1,128}")
# Request headers a module never sees: credentials (RFC 3875 section 4.1.18 leaves them out), hop-by-hop
# headers (RFC 9110 section 7.6.1) and Proxy (it would become HTTP_PROXY, a proxy setting: "httpoxy").
NOT_FORWARDED = frozenset({"authorization", "proxy-authorization", "cookie", "proxy", "connection", "keep-alive",
                           "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})


class CgiError(TlogError):
    """The module's output is a header block with a bad Status (502)."""


def parse_cgi(stdout: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) for a module's stdout. Raises CgiError for a Status that is not a 3-digit code."""
    ends = [i for i in (stdout.find(b"\r\n\r\n", 0, MAX_HEADER_BLOCK + 4), stdout.find(b"\n\n", 0, MAX_HEADER_BLOCK + 2)) if i >= 0]
    if ends:
        end = min(ends)
        sep = 4 if stdout.startswith(b"\r\n\r\n", end) else 2
        lines = stdout[:end].split(b"\n")
        matches = [_HEADER.fullmatch(line.removesuffix(b"\r")) for line in lines]
        if end > 0 and len(lines) <= MAX_HEADERS and all(matches):
            return _response([(m[1].decode("ascii"), m[2].decode("latin-1")) for m in matches if m], stdout[end + sep:])
    return 200, [("Content-Type", "text/plain; charset=utf-8")], stdout


def _response(fields: list[tuple[str, str]], body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    status = None
    headers: list[tuple[str, str]] = []
    for name, value in fields:
        lower = name.lower()
        if lower == "status":
            m = _STATUS.fullmatch(value.encode("latin-1"))
            if m is None:
                raise CgiError(f"the module's CGI Status {value[:40]!r} is not a status code")
            status = int(m[1])
        elif lower not in DROPPED:
            headers.append((name, value))
    if status is None:
        status = 302 if any(n.lower() == "location" for n, _ in headers) else 200
    if not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", "text/plain; charset=utf-8"))
    return status, headers, body


def cgi_environment(*, method: str, script_name: str, path_info: str, query_string: str, protocol: str,
                    headers: Iterable[tuple[str, str]], content_length: int, server_name: str, server_port: str) -> dict[str, str]:
    """The CGI/1.1 meta-variables for a request (RFC 3875 section 4.1): HTTP_* from each header
    (a repeated header joined with ", "; names other than letters, digits and '-' left out, and
    so are NOT_FORWARDED and the headers a Connection header names).
    Raises MalformedError for a path or query holding a NUL (no environment can carry it)."""
    if "\x00" in path_info or "\x00" in query_string:
        raise MalformedError("the request path or query holds a NUL byte")
    env = {
        "GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path_info,
        "QUERY_STRING": query_string, "SERVER_PROTOCOL": protocol, "SERVER_NAME": server_name, "SERVER_PORT": server_port,
        "SERVER_SOFTWARE": "wasmlog-agent", "CONTENT_TYPE": "", "CONTENT_LENGTH": str(content_length) if content_length else "",
    }
    headers = list(headers)
    hop_by_hop = NOT_FORWARDED | {token.strip().lower() for name, value in headers if name.lower() == "connection"
                                  for token in value.split(",")}
    http: dict[str, list[str]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower == "content-type":
            env["CONTENT_TYPE"] = value
        elif lower != "content-length" and lower not in hop_by_hop and _ENV_HEADER.fullmatch(name) and "\x00" not in value:
            http.setdefault("HTTP_" + name.upper().replace("-", "_"), []).append(value)
    env.update({k: ", ".join(v) for k, v in http.items()})
    return env


def server_name_and_port(host: str) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT from a Host header: "name[:port]", an IPv6 address in brackets kept in them."""
    name, colon, port = host.rpartition(":")
    if not colon or name.startswith("[") != name.endswith("]") or (not name.startswith("[") and ":" in name):
        return host, ""  # no port (a bracketed IPv6 address alone, or a name without one)
    return name, port


def merged_environment(cgi: Mapping[str, str], profile_env: Mapping[str, str]) -> dict[str, str]:
    """What the module sees: the CGI variables, then the profile's environment (the operator's word wins)."""
    return {**cgi, **profile_env}
