"""pixtral-mlx: Mistral's Pixtral-12B vision-language model on MLX.

    import pixtral_mlx
    model = pixtral_mlx.load("mlx-community/pixtral-12b-4bit")
    reply = model.generate([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "photo.jpg"}},
        {"type": "text", "text": "Describe this image."}]}])

Importing this package does not import MLX (so `--help` is instant); it does preload an optimized
BLAS on Linux, which must happen before MLX is loaded. The layers and the path of a request through them:
docs/ARCHITECTURE.md; the model facts the code cites as §N: docs/MODEL.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import backend as _backend
from ._version import __version__
from .errors import ModelError, PixtralError

_backend.preload_blas()
_backend.private_tmpdir()

if TYPE_CHECKING:
    from .pipeline import Pixtral

__all__ = ["PixtralError", "__version__", "load"]


def load(
    path: str,
    progress: Callable[[str], None] | None = None,
    *,
    context_length: int | None = None,
    default_system_prompt: bool = True,
) -> Pixtral:
    """Load an MLX-format Pixtral checkpoint from a folder or a Hugging Face repo id.

    Official Mistral repos (consolidated.safetensors) are converted to 4-bit once, into
    ~/.cache/pixtral-mlx. Load and generate on the same thread: MLX streams are per thread.
    `context_length` lowers the window the model was trained on (or raises it, with a
    `ContextLengthWarning`). `default_system_prompt`: a model folder's SYSTEM_PROMPT.txt (Mistral Small
    3.1/3.2, Magistral, Ministral 3) is the system prompt of every conversation that has none, its `{today}`
    and `{yesterday}` filled in when a prompt is encoded; False turns it off. Settings from the environment
    (PIXTRAL_MLX_MEMORY_LIMIT) and the arguments are checked before anything is read.
    """
    from .config import check_context_length
    from .loading import load_model, model_name, resolve
    from .memory import limit_setting
    from .pipeline import Pixtral

    check_context_length(context_length)  # the value's type and floor, before the (slow) load
    limit_setting()
    try:
        folder = resolve(path, progress=progress)
        model, encoder = load_model(folder, system_prompt=default_system_prompt, name=model_name(path, folder))
    except OSError as e:  # a folder or file this user may not read, a disk error: one sentence, whichever file
        raise ModelError(f"{e.filename or path} cannot be read ({e.strerror or e}).") from e
    return Pixtral(model, encoder, folder, context_length=context_length)
