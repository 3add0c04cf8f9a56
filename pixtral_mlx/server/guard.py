"""What the server refuses before a route looks at a request: what a web page in the user's browser could send
(`Guard`: a foreign `Host` or `Origin`), and a /v1 request without the API key (`authorize`)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import urllib.parse

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .replies import json_error
from .schema import APIError
from .settings import Settings

log = logging.getLogger("pixtral_mlx.server")


class Guard:
    """Refuses, before anything else runs and API key or not, what a web page in the user's browser could send
    to this server: a `Host` that does not name it (DNS rebinding: a page on a name its owner points at this
    machine) and an `Origin` that is neither this server's own nor an --allowed-origins one (a page posting
    across sites). Requests without these headers come from programs, not pages, and pass.

    The names a server answers to: the address it listens on and, listening on loopback, `localhost` (with
    its port); listening on all addresses (0.0.0.0 or ::), any IP address, `localhost`, this machine's name
    and `host.docker.internal`, on any port (Docker maps ports); always the --allowed-hosts names."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.names = {name.lower() for name in settings.allowed_hosts}
        ip = _ip(settings.listen_host or "127.0.0.1")
        self.everywhere = settings.listen_host == "" or (ip is not None and ip.is_unspecified)  # 0.0.0.0, ::
        machine = socket.gethostname().lower()
        self.machine = {"localhost", machine, machine.split(".")[0], machine.split(".")[0] + ".local"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                log.warning("refused %s %s: %s", scope["method"], scope["path"], error.message)
                await json_error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        if host is not None and not self.host_allowed(host, scope.get("server")):
            return APIError(
                403,
                f"this server does not answer to the name {host!r} (Host); start it with --allowed-hosts "
                "NAME to accept a name.",
                code="host_not_allowed",
            )
        allowed = self.settings.allowed_origins
        if origin is not None and origin not in allowed and "*" not in allowed and not _same(origin, host):
            return APIError(
                403,
                f"requests from web pages at {origin} are refused; start the server with --allowed-origins "
                f"{origin} to allow them.",
                code="origin_not_allowed",
            )
        return None

    def host_allowed(self, host: str, server: tuple[str, int] | None) -> bool:
        try:
            url = urllib.parse.urlsplit(f"//{host}")
            name, port = (url.hostname or ""), url.port
        except ValueError:  # a port that is not a number
            return False
        if name in self.names or "*" in self.names:
            return True
        ip = _ip(name)
        if self.everywhere:
            return ip is not None or name in self.machine or name == "host.docker.internal"
        if server is None or (port or 80) != server[1]:
            return False
        here = _ip(server[0])
        loopback = here is not None and here.is_loopback
        if ip is not None:
            return ip == here or (loopback and ip.is_loopback)
        return name == (self.settings.listen_host or "").lower() or name in (
            {"localhost"} if loopback else self.machine
        )


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _same(origin: str, host: str | None) -> bool:
    """Whether a page at `origin` is this server's own (the same scheme-less address as the request's Host)."""
    url = urllib.parse.urlsplit(origin)
    return url.scheme in ("http", "https") and host is not None and url.netloc.lower() == host.lower()


def authorize(request: Request, settings: Settings) -> None:
    """Nothing, or a 401 when the server has an API key and the request does not carry it."""
    if settings.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
        message = "a wrong API key was given" if key else "no API key was given (Authorization: Bearer KEY)"
        raise APIError(
            401, f"{message}; this server needs the key it was started with.", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
