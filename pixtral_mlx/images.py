"""Image input: paths, file:// / data: / http(s) URLs and PIL images -> a validated RGB image.

Everything a user can hand us goes through `load_image`, which turns every failure into an
`ImageError` with one sentence that names the input. EXIF orientation is applied (a phone photo is
seen upright); transparency is composited onto white exactly as mistral_common does.

A `FetchPolicy` decides which http(s) URLs may be fetched: the CLI and the chat app fetch anything their own
user asks for; the server (`FetchPolicy.server()`) only public addresses, every address a name resolves to and
every redirect hop checked, the connection made to the address that was checked. A `PixelBudget` bounds the
decoded pixels of a whole request, charged from each image's header before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import logging
import math
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 100_000_000  # decompression-bomb guard: 10000 x 10000, far beyond any useful input
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
MAX_FILE_BYTES = 1 << 30  # a local file: a 100 MP 16-bit RGBA TIFF is 800 MB
DOWNLOAD_TIMEOUT = 60  # seconds for the whole download, redirects included (50 MB at ~7 Mbit/s)
MAX_REDIRECTS = 5
MAX_REQUEST_PIXELS = 100_000_000  # the server's default per request: eight 12 MP photos, or one image at MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

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


class PixelBudget:
    """The decoded pixels a request may use in all; each image is charged from its header, before it is decoded."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def charge(self, img: Image.Image, name: str) -> None:
        w, h = img.size
        total = self.used + w * h
        if total > self.limit:
            shown = math.ceil(total / 1e5) / 10  # rounded up: never shown as equal to the limit
            raise ImageError(
                f"the images of this request add up to {shown:g} megapixels with {name} ({w}x{h}), over the "
                f"limit of {self.limit / 1e6:g} MP per request; send fewer or smaller images."
            )
        self.used = total


def describe_source(source: Any) -> str:
    if isinstance(source, Image.Image):
        return "<PIL image>"
    s = str(source)
    return s[:40] + "…" if s.startswith("data:") else s


def _open_bytes(data: bytes, name: str, budget: PixelBudget | None = None) -> Image.Image:
    return _decode(_charge(_open_header(data, name), name, budget), name)


def _open_header(data: bytes, name: str) -> Image.Image:
    """The image with only its header read (nothing large is decoded yet), checked against MAX_PIXELS."""
    with _pil_errors(name):
        img = Image.open(io.BytesIO(data))
    _check_size(img, name)
    return img


def _charge(img: Image.Image, name: str, budget: PixelBudget | None) -> Image.Image:
    if budget is not None:
        budget.charge(img, name)
    return img


def _decode(img: Image.Image, name: str) -> Image.Image:
    with _pil_errors(name):
        img.load()
    return img


@contextlib.contextmanager
def _pil_errors(name: str) -> Any:
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above; _check_size decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name} is too large to decode safely: over the {MAX_PIXELS / 1e6:.0f} MP limit "
            "that protects against decompression bombs; downscale it first."
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image file PIL can read.") from e
    except MemoryError as e:  # its message is empty: say what happened
        raise ImageError(f"{name} is too large to decode in the memory this machine has free.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is truncated or corrupt ({_first_line(e)}).") from e


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} has no pixels ({w}x{h}).")
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{name} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP limit "
            "that protects against decompression bombs; downscale it first."
        )


def _read_path(path: Path, name: str) -> bytes:
    """The bytes of a regular file no larger than MAX_FILE_BYTES; pipes and devices are never opened."""
    if "\0" in str(path):  # os.stat would raise ValueError ("embedded null byte")
        shown = name.replace("\0", "\\0")
        raise ImageError(f"{shown} is not a valid path: it contains a NUL byte.")
    path = path.expanduser()
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{name} is a directory, not an image.")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{name} is {_kind(st.st_mode)}, not an image file.")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError(f"{name} is {st.st_size:,} bytes, over the {MAX_FILE_BYTES >> 20} MB limit for images.")
        # O_NONBLOCK: if the path became a pipe since the stat, opening it must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ImageError(f"{name} is {_kind(mode)}, not an image file.")
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such file.") from e
    except OSError as e:
        raise ImageError(f"{name} cannot be read ({e.strerror or e}).") from e
    if len(data) > MAX_FILE_BYTES:  # it grew after the stat
        raise ImageError(f"{name} is over the {MAX_FILE_BYTES >> 20} MB limit for images.")
    return data


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


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


def _download(url: str, timeout: float | None = None, policy: FetchPolicy | None = None) -> bytes:
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
        raise ImageError(f"could not download {url} (HTTP {e.code} {_first_line(e.reason)}).") from e
    except Exception as e:  # URLError, timeouts, SSL errors, a connection the deadline shut
        if deadline.fired:
            raise _timeout(url, timeout) from e
        reason = getattr(e, "reason", None) or e
        raise ImageError(f"could not download {url} ({_first_line(reason)}).") from e
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


def _first_line(reason: object) -> str:
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else type(reason).__name__


def unreachable(url: str) -> str:
    """The one sentence for any failed fetch under a policy with `uniform_errors`."""
    return f"could not download an image from {url}: it is not reachable from this server, or not an image."


@contextlib.contextmanager
def _fetch_errors(url: str, policy: FetchPolicy) -> Any:
    """Under `uniform_errors`, every ImageError becomes `unreachable(url)`; the real reason goes to the log."""
    try:
        yield
    except ImageError as e:
        if not policy.uniform_errors:
            raise
        log.warning("image fetch failed: %s", e)
        raise ImageError(unreachable(url)) from e


def _fetch(url: str, timeout: float | None, policy: FetchPolicy, budget: PixelBudget | None) -> Image.Image:
    if not policy.remote:
        raise ImageError(f"{url} is refused: image URLs are turned off here; send the image as a data: URL.")
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:  # a malformed [IPv6] host
        host = ""
    if host and not policy.allows_host(host):
        raise ImageError(f"{url} is refused: {host} is not one of the domains images may come from.")
    with _fetch_errors(url, policy):
        img = _open_header(_download(url, timeout, policy), url)
    _charge(img, url, budget)  # its own sentence: the request's images, not the fetch, are the problem
    with _fetch_errors(url, policy):
        return _decode(img, url)


def read_source(
    source: Any,
    *,
    download_timeout: float | None = None,
    policy: FetchPolicy | None = None,
    pixel_budget: PixelBudget | None = None,
) -> tuple[Image.Image, str]:
    """Decode any supported source into a PIL image, without any conversion yet.

    An http(s) download must arrive whole within `download_timeout` seconds (default DOWNLOAD_TIMEOUT), from
    where `policy` allows (default: anywhere, for the user's own tools; a server passes `FetchPolicy.server()`).
    Each image is charged to `pixel_budget` from its header, before it is decoded.
    """
    policy = policy or FetchPolicy()
    if isinstance(source, Image.Image):
        _check_size(source, "the image")
        return _charge(source, "the image", pixel_budget), "<PIL image>"
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise ImageError(f"unsupported image reference {source!r}.")
    name = describe_source(source)
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header or not payload:
            raise ImageError("a data: URL must be base64-encoded (data:image/png;base64,...).")
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"{name} does not hold valid base64.") from e
        return _open_bytes(data, "the data: URL image", pixel_budget), name
    if source.startswith(("http://", "https://")):
        return _fetch(source, download_timeout, policy, pixel_budget), name
    if source.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
        return _open_bytes(_read_path(path, str(path)), str(path), pixel_budget), str(path)
    return _open_bytes(_read_path(Path(source), name), name, pixel_budget), name


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation, then mistral_common's conversion (transparent areas become white)."""
    from mistral_common.tokens.tokenizers.image import _convert_to_rgb

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make a viewable image unusable
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit images: PIL's convert() clips at 255, so scale to 8 bits first.
        img = img.point(lambda v: v / 257).convert("L")
    return _convert_to_rgb(img)


def load_image(source: Any) -> tuple[Image.Image, str]:
    """A validated RGB image and a short name for messages."""
    img, name = read_source(source)
    try:
        return to_rgb(img), name
    except (OSError, ValueError) as e:
        raise ImageError(f"{name} cannot be converted to RGB ({e}).") from e
