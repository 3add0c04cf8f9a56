"""Which tensors are quantized and how: mlx-lm's affine format, decided per tensor while streaming.

The output is what `nn.quantize` would leave in a model: `<module>.weight` (uint32, packed),
`<module>.scales` and `<module>.biases`. The loader rebuilds the quantized layers with
`class_predicate=lambda p, m: f"{p}.scales" in weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from pixtral_mlx.models.pixtral.weights import is_language_linear


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    vision: bool = False  # also quantize the vision tower and adapter linears

    def wants(self, key: str) -> bool:
        """By default only the decoder matrices; the vision side stays dense (as in mlx-vlm)."""
        if is_language_linear(key):
            return True
        vision_linear = "_proj." in key or key.startswith("multi_modal_projector.")
        return self.vision and key.endswith(".weight") and vision_linear

    def fits(self, shape: tuple[int, ...]) -> bool:
        # mx.quantize groups along the input (last) dimension, as mlx-lm's predicate checks.
        return len(shape) == 2 and shape[-1] % self.group_size == 0

    def shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of the packed uint32 weight and of the scales (= biases)."""
        rows, cols = shape
        return (rows, cols * self.bits // 32), (rows, cols // self.group_size)

    def config(self, skipped: list[str]) -> dict[str, Any]:
        """The `quantization` entry of config.json, with mlx-lm style per-module overrides."""
        entry: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        entry.update({module: False for module in skipped})
        return entry


def quantize(w: mx.array, spec: QuantSpec, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """Quantize a (rows, cols) block; rows are independent, so row blocks give the same bytes."""
    # float32 in, scales cast after: the same bytes as mx.quantize on a bfloat16 weight.
    w32 = w.astype(mx.float32)
    wq, scales, biases = mx.quantize(w32, spec.group_size, spec.bits)
    return wq, scales.astype(dtype), biases.astype(dtype)
