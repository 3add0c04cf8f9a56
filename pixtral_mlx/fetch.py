"""Image downloads over http(s): which URLs may be fetched, and fetching them safely.

A `FetchPolicy` decides which http(s) URLs may be fetched: the CLI and the chat app fetch anything their own
user asks for; the server (`FetchPolicy.server()`) only public addresses, every address a name resolves to and
every redirect hop checked, the connection made to the address that was checked (no proxy from the
environment), and one sentence (`unreachable`) for every failed fetch, the reason going to the log. Every
download is bounded in size (`MAX_DOWNLOAD_BYTES`), redirects (`MAX_REDIRECTS`, http(s) only) and time: one
deadline for the whole of it (`DOWNLOAD_TIMEOUT`). `images.read_source` is the one caller: it decodes the bytes.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ImageError, first_line

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT = 60  # seconds for the whole download, redirects included (50 MB at ~7 Mbit/s)
MAX_REDIRECTS = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchPolicy:
    """Which http(s) image URLs may be fetched, and how a failed fetch is reported.

    The default fetches anything (the CLI and the chat app, for their own user). `FetchPolicy.server()` is what
    a server must use: public addresses only and one sentence for every failed fetch, the reason going to the log.
    """

    remote: bool = True  # fetch http(s) URLs at all (data: URLs and files are not affected)
    allow_private: bool = True  # also loopback, private, link-local, multicast, reserved, unspecified addresses
    allowed_domains: tuple[str, ...] = ()  # when set, only these hosts and their subdomains
    uniform_errors: bool = False  # every failed fetch gives the same sentence (no port scanning through us)

    @classmethod
    def server(
        cls, *, remote: bool = True, allow_private: bool = False, allowed_domains: tuple[str, ...] = ()
    ) -> FetchPolicy:
        domains = tuple(d.strip().lower().strip(".").removeprefix("*.") for d in allowed_domains if d.strip())
        return cls(remote=remote, allow_private=allow_private, allowed_domains=domains, uniform_errors=True)

    @property
    def guarded(self) -> bool:
        """Whether connections must go through the checked, pinned connector (and never a proxy)."""
        return not self.allow_private or bool(self.allowed_domains)

    def allows_host(self, host: str) -> bool:
        if not self.allowed_domains:
            return True
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


class _Deadline:
    """One clock for a whole download (connects, redirects, TLS, headers, body).

    Socket timeouts bound each read, not the total: a server sending a byte every few seconds would
    never trip them. At the deadline a timer shuts every socket the download opened, so whatever read
    is waiting returns at once.
    """

    def __init__(self, seconds: float, connect: Callable[..., socket.socket] = socket.create_connection):
        self.connect = connect
        self.end = time.monotonic() + seconds
        self.fired = False  # the sockets were shut: whatever was read may be cut short
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def create_connection(self, address: Any, timeout: Any = None, *args: Any, **kwargs: Any) -> socket.socket:
        left = max(0.001, self.end - time.monotonic())
        timeout = left if not isinstance(timeout, (int, float)) else min(timeout, left)
        sock = self.connect(address, timeout, *args, **kwargs)
        with self._lock:  # a duplicate descriptor: ssl's wrap_socket() detaches the original object
            self._socks.append(socket.socket(fileno=os.dup(sock.fileno())))
        if time.monotonic() >= self.end:
            self._expire()
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.fired = True
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


class _Refused(Exception):
    """A host or address the fetch policy does not allow (not an OSError: urllib lets it through unwrapped)."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: the last 32 bits are the IPv4 address


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a public unicast address (IPv6 forms that carry an IPv4 address are judged by it)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _public(embedded)
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def _pinned_connector(policy: FetchPolicy) -> Callable[..., socket.socket]:
    """A `socket.create_connection` that checks the host against `policy` and every address it resolves to,
    then connects to those very addresses (one look-up: a second could answer differently)."""

    def connect(address: tuple[str, int], timeout: float, source_address: Any = None) -> socket.socket:
        host, port = address
        if not policy.allows_host(host):
            raise _Refused(f"{host} is not on the allowed list of image domains")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not policy.allow_private:
            for *_, sockaddr in infos:
                ip = ipaddress.ip_address(sockaddr[0].partition("%")[0])
                if not _public(ip):
                    named = f"{host} is {ip}, which is" if host != str(ip) else f"{ip} is"
                    raise _Refused(f"{named} not a public address")
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error or OSError(f"{host} has no address")

    return connect


def _opener(deadline: _Deadline, policy: FetchPolicy) -> urllib.request.OpenerDirector:
    def connection(base: type[http.client.HTTPConnection]) -> Any:
        class Connection(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                self._create_connection = deadline.create_connection

        return Connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(connection(http.client.HTTPSConnection), req, context=self._context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
            location = headers.get("location") or headers.get("uri") or ""
            scheme = urllib.parse.urlparse(urllib.parse.urljoin(req.full_url, location)).scheme
            if scheme not in ("http", "https"):
                raise _BadRedirect(f"{scheme}:")
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    # A guarded fetch never goes through a proxy from the environment: the proxy's address would be the one checked.
    proxies = [urllib.request.ProxyHandler({})] if policy.guarded else []
    return urllib.request.build_opener(*proxies, HTTP, HTTPS, Redirects)


def download(url: str, timeout: float | None = None, policy: FetchPolicy | None = None) -> bytes:
    """At most MAX_DOWNLOAD_BYTES, all of it within `timeout` (default DOWNLOAD_TIMEOUT) seconds, over http(s),
    from the hosts and addresses `policy` allows."""
    policy = policy or FetchPolicy()
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    deadline = _Deadline(timeout, _pinned_connector(policy) if policy.guarded else socket.create_connection)
    req = urllib.request.Request(url, headers={"User-Agent": "pixtral-mlx"})
    try:
        with _opener(deadline, policy).open(req, timeout=timeout) as resp:
            size = resp.headers.get("Content-Length", "")
            if size.isdigit() and int(size) > MAX_DOWNLOAD_BYTES:
                raise ImageError(f"{url} is {int(size):,} bytes, over the {MAX_DOWNLOAD_BYTES >> 20} MB limit.")
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except ImageError:
        raise
    except _Refused as e:
        raise ImageError(f"could not download {url}: {e}.") from e
    except _BadRedirect as e:
        raise ImageError(f"could not download {url}: it redirects to a {e} URL, and only http(s) is followed.") from e
    except urllib.error.HTTPError as e:
        if deadline.fired:
            raise _timeout(url, timeout) from e
        if str(e.msg).startswith(urllib.request.HTTPRedirectHandler.inf_msg):  # urllib's is three lines long
            raise ImageError(
                f"could not download {url}: it redirects in a loop or more than {MAX_REDIRECTS} times."
            ) from e
        raise ImageError(f"could not download {url} (HTTP {e.code} {first_line(e.reason)}).") from e
    except Exception as e:  # URLError, timeouts, SSL errors, a connection the deadline shut
        if deadline.fired:
            raise _timeout(url, timeout) from e
        reason = getattr(e, "reason", None) or e
        raise ImageError(f"could not download {url} ({first_line(reason)}).") from e
    finally:
        deadline.close()
    if deadline.fired:  # a body without a length ends quietly when its socket is shut
        raise _timeout(url, timeout)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageError(f"{url} is larger than {MAX_DOWNLOAD_BYTES >> 20} MB.")
    return data


class _BadRedirect(Exception):
    """A redirect to a scheme other than http(s) (file:, ftp:, ...): never followed."""


def _timeout(url: str, seconds: float) -> ImageError:
    return ImageError(f"could not download {url}: it did not arrive within {seconds:g} seconds.")


def unreachable(url: str) -> str:
    """The one sentence for any failed fetch under a policy with `uniform_errors`."""
    return f"could not download an image from {url}: it is not reachable from this server, or not an image."


@contextlib.contextmanager
def fetch_errors(url: str, policy: FetchPolicy) -> Any:
    """Under `uniform_errors`, every ImageError becomes `unreachable(url)`; the real reason goes to the log."""
    try:
        yield
    except ImageError as e:
        if not policy.uniform_errors:
            raise
        log.warning("image fetch failed: %s", e)
        raise ImageError(unreachable(url)) from e


def check_url(url: str, policy: FetchPolicy) -> None:
    """Refuse, before any connection, a URL `policy` does not fetch at all: remote images off, or a host
    that is not an allowed domain (said as it is, even under `uniform_errors`)."""
    if not policy.remote:
        raise ImageError(f"{url} is refused: image URLs are turned off here; send the image as a data: URL.")
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:  # a malformed [IPv6] host
        host = ""
    if host and not policy.allows_host(host):
        raise ImageError(f"{url} is refused: {host} is not one of the domains images may come from.")
