"""Image input: paths, file:// / data: / http(s) URLs and PIL images -> a validated RGB image.

Everything a user can hand us goes through `load_image` (or `read_source`, the one entry point for every
source), which turns every failure into an `ImageError` with one sentence that names the input. Files are read
only if they are regular and at most `MAX_FILE_BYTES`; every image is checked against `MAX_PIXELS` from its
header before it is decoded. EXIF orientation is applied (a phone photo is seen upright); transparency is
composited onto white exactly as mistral_common does. A `PixelBudget` bounds the decoded pixels of a whole
request, charged from each image's header before anything is decoded.

http(s) URLs are downloaded by `fetch.py`, under a `FetchPolicy` (which URLs may be fetched; the server's
allows only public addresses); the bytes are decoded here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
import stat
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, first_line
from .fetch import FetchPolicy, check_url, download, fetch_errors

MAX_PIXELS = 100_000_000  # decompression-bomb guard: 10000 x 10000, far beyond any useful input
MAX_FILE_BYTES = 1 << 30  # a local file: a 100 MP 16-bit RGBA TIFF is 800 MB
MAX_REQUEST_PIXELS = 100_000_000  # the server's default per request: eight 12 MP photos, or one image at MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


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
        raise ImageError(f"{name} is truncated or corrupt ({first_line(e)}).") from e


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


def _fetch(url: str, timeout: float | None, policy: FetchPolicy, budget: PixelBudget | None) -> Image.Image:
    check_url(url, policy)
    with fetch_errors(url, policy):
        img = _open_header(download(url, timeout, policy), url)
    _charge(img, url, budget)  # its own sentence: the request's images, not the fetch, are the problem
    with fetch_errors(url, policy):
        return _decode(img, url)


def read_source(
    source: Any,
    *,
    download_timeout: float | None = None,
    policy: FetchPolicy | None = None,
    pixel_budget: PixelBudget | None = None,
) -> tuple[Image.Image, str]:
    """Decode any supported source into a PIL image, without any conversion yet.

    An http(s) download (`fetch.download`) must arrive whole within `download_timeout` seconds (default
    `fetch.DOWNLOAD_TIMEOUT`), from where `policy` allows (default: anywhere, for the user's own tools; a server
    passes `FetchPolicy.server()`).
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
