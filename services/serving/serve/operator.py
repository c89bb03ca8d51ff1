"""The operator's token: `serve`'s control endpoints (`/status`, `/drain`) answer only to it.

A random token is made at the first start into a 0600 file (`--operator-token-file`, default
`$XDG_CONFIG_HOME/voicebus/operator-token`) and printed once; `VOICEBUS_OPERATOR_TOKEN` overrides
both. It is presented as `Authorization: Bearer TOKEN`, or as the password of HTTP basic auth so a
browser can open `/status` (it asks). Compared in constant time.

A control request is also refused when its `Host` is a name this server was not given (DNS rebinding
points an attacker's name at us; an IP literal cannot be rebound), when it carries an `Origin` other
than its own (a page elsewhere), and, for a POST, unless it is `application/json` (a cross-site "simple"
form post cannot be). Refused: 401 or 403, and nothing is done.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

TOKEN_ENV = "VOICEBUS_OPERATOR_TOKEN"
CONTROL_PATHS = ("/status", "/drain")
MIN_TOKEN_CHARS = 16


class OperatorTokenError(RuntimeError):
    pass


def default_token_file() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "voicebus" / "operator-token"


def load_or_create(path: Path | None) -> tuple[str, Path | None, bool]:
    """(token, the file it is in (None: from the environment), whether it was made just now)."""
    from_env = os.environ.get(TOKEN_ENV)
    if from_env:
        if len(from_env) < MIN_TOKEN_CHARS:
            raise OperatorTokenError(f"{TOKEN_ENV} is too short ({len(from_env)} characters; at least "
                                     f"{MIN_TOKEN_CHARS}): anyone could guess it")
        return from_env, None, False
    path = path or default_token_file()
    if path.exists():
        return read_token(path), path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:  # another serve made it a moment ago: use theirs
        return read_token(path), path, False
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path, True


def read_token(path: Path) -> str:
    """The token in `path`, which must be ours and readable by nobody else (refused otherwise, saying why)."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise OperatorTokenError(f"cannot read the operator token {path}: {exc.strerror}") from exc
    if path.is_symlink():
        raise OperatorTokenError(f"{path} is a symlink: refusing it as the operator token file")
    if info.st_uid != os.geteuid():
        raise OperatorTokenError(f"{path} belongs to uid {info.st_uid}, not to this user: refusing it")
    if info.st_mode & 0o077:
        raise OperatorTokenError(f"{path} is readable by others (mode {info.st_mode & 0o777:04o}): "
                                 f"chmod 600 {path}")
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise OperatorTokenError(f"{path} holds no usable token (at least {MIN_TOKEN_CHARS} characters)")
    return token


def _presented(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


def _hostname(host_header: str) -> str:
    return (urlsplit(f"//{host_header}").hostname or "").lower()


class HostPolicy:
    """Which names a request may use to reach us: IP literals, this machine's names, the served host,
    and what the operator allows (`--allow-host`, for a proxy's name)."""

    def __init__(self, served_host: str, allowed: list[str]) -> None:
        names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower(), served_host.lower()}
        self.names = names | {name.lower() for name in allowed}

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        name = _hostname(host_header)
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.names


def guard(token: str, hosts: HostPolicy) -> Callable:
    """aiohttp middleware: the control endpoints answer only the operator (see the module's docstring)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path not in CONTROL_PATHS:
            return await handler(request)
        if not hosts.allows(request.headers.get("Host")):
            return web.json_response({"error": "this host name is not served here (--allow-host adds one)"},
                                     status=403)
        origin = request.headers.get("Origin")
        if origin is not None and (urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower()):
            return web.json_response({"error": "cross-origin control requests are refused"}, status=403)
        if not hmac.compare_digest(_presented(request).encode(), token.encode()):
            return web.json_response({"error": "the operator token is required (Authorization: Bearer TOKEN; "
                                               "`voicebus serve` printed where it is)"}, status=401,
                                     headers={"WWW-Authenticate": 'Basic realm="voicebus serve operator"'})
        if request.method == "POST" and request.content_type != "application/json":
            return web.json_response({"error": "control requests are application/json"}, status=415)
        return await handler(request)

    return middleware
