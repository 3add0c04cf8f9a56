"""Convert Pixtral-12B and Mistral3 checkpoints (Mistral Small 3.x, Ministral 3, FP8 with per-tensor scales
included; official Mistral or Hugging Face layout) to the MLX format.

    from pixtral_mlx.convert import convert
    convert("mistralai/Pixtral-12B-2409", "pixtral-4bit", quantize=True)

Tensors are streamed: memory stays far below the size of the checkpoint, and everything is checked
before the first byte is written. `convert` is imported lazily so that `--help` does not load MLX.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixtral_mlx.errors import ConversionError

if TYPE_CHECKING:
    from pixtral_mlx.conversion.stream import convert

__all__ = ["ConversionError", "convert"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from pixtral_mlx.conversion.stream import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
