"""Attached images: what the model will see (resized size, token count) before anything is sent.

The size rule is mistral_common's `ImageEncoder._image_to_num_tokens` (downscale with `round()` so
the longest edge fits, never upscale, then whole cells; one extra token per row of cells), so chips are right
before the model has loaded. A cell is what one `[IMG]` token covers: a 16-px patch for Pixtral-12B (images up to
1024 px, the defaults here), 2x2 14-px patches for the Mistral3 models (1540 px); once a model is loaded the chat
plans with its own values (`Engine.geometry`). No MLX here: this runs in a Textual thread worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixtral_mlx.config import MAX_EDGE  # Pixtral-12B's vision image_size

PATCH = 16  # Pixtral-12B's pixels per [IMG] token along each side


def plan(
    width: int, height: int, max_edge: int | None = None, patch: int = PATCH, image_size: int = MAX_EDGE
) -> tuple[int, int, int]:
    """(new width, new height, image tokens) for a width x height image: `patch` pixels per token along each side,
    the longest edge at most `max_edge` or else the model's `image_size`."""
    limit = max_edge or image_size
    w: float = width
    h: float = height
    ratio = max(w / limit, h / limit)
    if ratio > 1:
        w, h = max(round(w / ratio), 1), max(round(h / ratio), 1)
    cols, rows = (int(w) - 1) // patch + 1, (int(h) - 1) // patch + 1
    return cols * patch, rows * patch, rows * (cols + 1)


@dataclass
class Attachment:
    path: Path  # the file sent to the model (the stored copy once a turn is sent)
    name: str
    original_size: tuple[int, int]
    size: tuple[int, int]
    tokens: int
    digest: str = ""

    def label(self) -> str:
        (w0, h0), (w, h) = self.original_size, self.size
        return f"{self.name} {w0}×{h0} → {w}×{h} · {self.tokens:,} tokens"

    def part(self) -> dict[str, Any]:
        """The OpenAI content part the engine receives."""
        return {"type": "image_url", "image_url": {"url": str(self.path)}}

    def to_json(self, url: str) -> dict[str, Any]:
        return {
            **self.part(),
            "image_url": {"url": url},
            "name": self.name,
            "original_size": list(self.original_size),
            "size": list(self.size),
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, part: dict[str, Any], root: Path) -> Attachment:
        url = part["image_url"]["url"]
        path = Path(url) if Path(url).is_absolute() else root / url
        return cls(
            path=path,
            name=part.get("name", path.name),
            original_size=tuple(part.get("original_size", (0, 0))),
            size=tuple(part.get("size", (0, 0))),
            tokens=int(part.get("tokens", 0)),
            digest=path.stem if path.parent.name == "images" else "",
        )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def inspect(
    path: Path, max_edge: int | None = None, name: str | None = None, geometry: tuple[int, int] = (MAX_EDGE, PATCH)
) -> Attachment:
    """Decode and validate `path` as the library will; raises `ImageError` with one sentence. `geometry` is the
    model's (image size, pixels per token)."""
    from pixtral_mlx.images import load_image

    img, _ = load_image(str(path))
    w, h, tokens = plan(*img.size, max_edge=max_edge, patch=geometry[1], image_size=geometry[0])
    return Attachment(
        path=Path(path),
        name=name or Path(path).name,
        original_size=img.size,
        size=(w, h),
        tokens=tokens,
        digest=file_digest(path),
    )
