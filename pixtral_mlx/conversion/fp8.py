"""FP8 (float8_e4m3fn) weights with per-tensor scales, dequantized exactly while streaming.

Ministral 3 Instruct ships its decoder matrices as float8_e4m3fn plus a scalar multiplier per tensor
(/work/shared/FAMILY.md §3.2 "FP8 checkpoints"): `<module>.qscale_weight` in Mistral's `consolidated.safetensors`
(and `<module>.qscale_act`, an activation scale we do not use), `<module>.weight_scale_inv` and
`<module>.activation_scale` in the Hugging Face layout. The weight is `fp8.astype(float32) * scale`.
Neither numpy nor the safetensors header reader knows float8, so the bytes are decoded through a
256-entry table, which is exact (every e4m3fn value is a float32).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
WEIGHT_SCALES = (".qscale_weight", ".weight_scale_inv")  # official, Hugging Face
UNUSED = (".qscale_act", ".activation_scale", ".input_scale")  # static activation scales: not needed in float


def _table() -> np.ndarray:
    """float32 value of each e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
    S.1111.111 is NaN."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    value = sign * value
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


TABLE = _table()


def decode(raw: np.ndarray) -> mx.array:
    """uint8 e4m3fn codes -> float32, exactly."""
    return mx.array(TABLE[raw])


def scaled_weight(name: str) -> str | None:
    """The weight a scale tensor multiplies (`x.qscale_weight` -> `x.weight`); None if `name` is no weight scale."""
    for suffix in WEIGHT_SCALES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


def is_unused(name: str) -> bool:
    """Activation scales: static FP8 inference needs them, a float or affine-quantized model does not."""
    return name.endswith(UNUSED)


def dequantize(w: mx.array, scale: mx.array) -> mx.array:
    """`w.astype(float32) * scale` for a per-tensor (one-element) scale."""
    return w.astype(mx.float32) * scale.astype(mx.float32).reshape(())
