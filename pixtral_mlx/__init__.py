"""pixtral-mlx: Mistral's Pixtral-12B vision-language model on MLX.

    import pixtral_mlx
    model = pixtral_mlx.load("mlx-community/pixtral-12b-4bit")
    reply = model.generate([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "photo.jpg"}},
        {"type": "text", "text": "Describe this image."}]}])

Importing this package does not import MLX (so `--help` is instant); it does preload an optimized
BLAS on Linux, which must happen before MLX is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import backend as _backend
from ._version import __version__
from .errors import PixtralError

_backend.preload_blas()

if TYPE_CHECKING:
    from .pipeline import Pixtral

__all__ = ["PixtralError", "__version__", "load"]


def load(path: str, progress: Callable[[str], None] | None = None) -> Pixtral:
    """Load an MLX-format Pixtral checkpoint from a folder or a Hugging Face repo id.

    Official Mistral repos (consolidated.safetensors) are converted to 4-bit once, into
    ~/.cache/pixtral-mlx. Load and generate on the same thread: MLX streams are per thread.
    """
    from .loading import load_model, resolve
    from .pipeline import Pixtral

    folder = resolve(path, progress=progress)
    model, encoder = load_model(folder)
    return Pixtral(model, encoder, folder)
