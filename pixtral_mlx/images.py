"""Image input: paths, file:// / data: / http(s) URLs and PIL images -> a validated RGB image.

Everything a user can hand us goes through `load_image`, which turns every failure into an
`ImageError` with one sentence that names the input. EXIF orientation is applied (a phone photo is
seen upright); transparency is composited onto white exactly as mistral_common does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 100_000_000  # decompression-bomb guard: 10000 x 10000, far beyond any useful input
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
MAX_FILE_BYTES = 1 << 30  # a local file: a 100 MP 16-bit RGBA TIFF is 800 MB
DOWNLOAD_TIMEOUT = 60  # seconds for the whole download, redirects included (50 MB at ~7 Mbit/s)
MAX_REDIRECTS = 5
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def describe_source(source: Any) -> str:
    if isinstance(source, Image.Image):
        return "<PIL image>"
    s = str(source)
    return s[:40] + "…" if s.startswith("data:") else s


def _open_bytes(data: bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above; _check_size decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(img, name)  # reads only the header: nothing large is decoded yet
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name} is too large to decode safely: over the {MAX_PIXELS / 1e6:.0f} MP limit "
            "that protects against decompression bombs; downscale it first."
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image file PIL can read.") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is truncated or corrupt ({e}).") from e
    return img


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

    def __init__(self, seconds: float):
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
        sock = socket.create_connection(address, timeout, *args, **kwargs)
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


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
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

    return urllib.request.build_opener(HTTP, HTTPS, Redirects)


def _download(url: str, timeout: float | None = None) -> bytes:
    """At most MAX_DOWNLOAD_BYTES, all of it within `timeout` (default DOWNLOAD_TIMEOUT) seconds, over http(s)."""
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    deadline = _Deadline(timeout)
    req = urllib.request.Request(url, headers={"User-Agent": "pixtral-mlx"})
    try:
        with _opener(deadline).open(req, timeout=timeout) as resp:
            size = resp.headers.get("Content-Length", "")
            if size.isdigit() and int(size) > MAX_DOWNLOAD_BYTES:
                raise ImageError(f"{url} is {int(size):,} bytes, over the {MAX_DOWNLOAD_BYTES >> 20} MB limit.")
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except ImageError:
        raise
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


def read_source(source: Any, *, download_timeout: float | None = None) -> tuple[Image.Image, str]:
    """Decode any supported source into a PIL image, without any conversion yet (an http(s) download must
    arrive whole within `download_timeout` seconds, default DOWNLOAD_TIMEOUT)."""
    if isinstance(source, Image.Image):
        _check_size(source, "the image")
        return source, "<PIL image>"
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
        return _open_bytes(data, "the data: URL image"), name
    if source.startswith(("http://", "https://")):
        return _open_bytes(_download(source, download_timeout), source), name
    if source.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
        return _open_bytes(_read_path(path, str(path)), str(path)), str(path)
    return _open_bytes(_read_path(Path(source), name), name), name


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
