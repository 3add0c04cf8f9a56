"""Image input: paths, file:// / data: / http(s) URLs and PIL images -> a validated RGB image.

Everything a user can hand us goes through `load_image`, which turns every failure into an
`ImageError` with one sentence that names the input. EXIF orientation is applied (a phone photo is
seen upright); transparency is composited onto white exactly as mistral_common does.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

MAX_PIXELS = 100_000_000  # decompression-bomb guard: 10000 x 10000, far beyond any useful input
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT = 30
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
    path = path.expanduser()
    if not path.exists():
        raise ImageError(f"{name}: no such file.")
    if path.is_dir():
        raise ImageError(f"{name} is a directory, not an image.")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{name} cannot be read ({e.strerror or e}).") from e


def _download(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "pixtral-mlx"})
    try:
        with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except Exception as e:  # URLError, HTTPError, timeouts, SSL errors
        reason = getattr(e, "reason", None) or e
        raise ImageError(f"could not download {url} ({reason}).") from e
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise ImageError(f"{url} is larger than {MAX_DOWNLOAD_BYTES // 2**20} MB.")
    return data


def read_source(source: Any) -> tuple[Image.Image, str]:
    """Decode any supported source into a PIL image, without any conversion yet."""
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
        return _open_bytes(_download(source), source), name
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
