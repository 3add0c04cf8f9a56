"""FP8 (float8_e4m3fn) weights with their scales, dequantized exactly while converting or loading.

Ministral 3 Instruct ships its decoder matrices as float8_e4m3fn plus a multiplier (/work/shared/FAMILY.md §3.2
"FP8 checkpoints"): `<module>.qscale_weight` in Mistral's `consolidated.safetensors` (and `<module>.qscale_act`, an
activation scale we do not use), `<module>.weight_scale_inv` and `<module>.activation_scale` in the Hugging Face
layout, whose config.json says `quantization_config: {"quant_method": "fp8", ...}`. The scale is one number per
tensor, or, with `weight_block_size` [128, 128] (transformers' fine-grained FP8), one per 128x128 tile of the
matrix. The weight is `fp8.astype(float32) * scale`. Neither numpy nor the safetensors header reader knows float8
(and `mx.load` reads it as uint8 codes), so the bytes are decoded through a 256-entry table, which is exact
(every e4m3fn value is a float32).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from pixtral_mlx.errors import ModelError, PixtralError

DTYPE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
WEIGHT_SCALES = (".qscale_weight", ".weight_scale_inv")  # official, Hugging Face
UNUSED = (".qscale_act", ".activation_scale", ".input_scale")  # static activation scales: not needed in float
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default, when a config gives block scales no size


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


def decode(raw: np.ndarray | mx.array) -> mx.array:
    """uint8 e4m3fn codes (numpy, or the uint8 array `mx.load` returns for F8_E4M3) -> float32, exactly."""
    if isinstance(raw, mx.array):
        return mx.array(TABLE)[raw]
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


def block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """The tile size of block scales from a Hugging Face config's `quantization_config` (None: per-tensor)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
        return None
    block = quant["weight_block_size"]
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelError(f"quantization_config.weight_block_size must be two positive whole numbers, got {block!r}")
    return block[0], block[1]


def check_scale(
    name: str,
    scale_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    block: tuple[int, int] | None,
    error: type[PixtralError] = ModelError,
) -> None:
    """A scale must be one number, or one per `block` tile of a 2-D weight (`block` None: 128x128)."""
    if math.prod(scale_shape) == 1:
        return
    b0, b1 = block or DEFAULT_BLOCK
    tiles = (math.ceil(weight_shape[0] / b0), math.ceil(weight_shape[1] / b1)) if len(weight_shape) == 2 else None
    if tuple(scale_shape) != tiles:
        raise error(
            f"FP8 scale {name!r} has shape {list(scale_shape)}: expected one number, or one per {b0}x{b1} block of "
            f"its weight {list(weight_shape)}"
        )


def dequantize(w: mx.array, scale: mx.array, block: tuple[int, int] | None = None, first_row: int = 0) -> mx.array:
    """`w.astype(float32) * scale` in float32: a one-element scale, or block scales (one per `block` tile, default
    128x128) where `w` is rows [first_row, first_row + len(w)) of the weight."""
    w = w.astype(mx.float32)
    scale = scale.astype(mx.float32)
    if scale.size == 1:
        return w * scale.reshape(())
    b0, b1 = block or DEFAULT_BLOCK
    rows = scale[mx.arange(first_row, first_row + w.shape[0]) // b0]  # each row's tile row
    return w * mx.repeat(rows, b1, axis=1)[:, : w.shape[1]]


def dequantize_weights(
    weights: dict[str, mx.array], block: tuple[int, int] | None, dtype: mx.Dtype = mx.bfloat16
) -> dict[str, mx.array]:
    """A state dict with its FP8 weights (uint8 codes, as `mx.load` reads F8_E4M3) times their scales, in `dtype`;
    scale and activation-scale tensors removed. Weights without a scale are left as they are."""
    out = {k: v for k, v in weights.items() if not is_unused(k) and scaled_weight(k) is None}
    for name, scale in weights.items():
        weight = scaled_weight(name)
        if weight is None:
            continue
        if weight not in weights:
            raise ModelError(f"FP8 scale {name!r} has no weight {weight!r} to scale")
        w = weights[weight]
        check_scale(name, tuple(scale.shape), tuple(w.shape), block)
        codes = decode(w) if w.dtype == mx.uint8 else w
        out[weight] = dequantize(codes, scale, block).astype(dtype)
    return out
