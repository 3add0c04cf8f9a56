"""CPU-only module classes and helpers; `backend.prepare()` swaps them in on the CPU backend.

The model files (`model.py`, `vision.py`) know nothing about devices. On MLX's CPU backend:
- quantized layers send prefill (many tokens) through a dequantized BLAS GEMM, ~10x faster than
  `quantized_matmul` there; decode (a few tokens) keeps the quantized kernel, which reads 4x fewer bytes,
  with its output rows split over one CPU stream per core;
- vision attention splits its heads over the same streams (the CPU softmax runs on one thread).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import cpu_kernel
from .models.pixtral.vision import Attention

# Below this many tokens a quantized matmul keeps the quantized kernel (decode, short prefills).
DEQUANT_MIN_TOKENS = 16
_local = threading.local()


def cpu_streams() -> list[Any]:
    """One CPU stream per core for this thread, or [] on one core.

    MLX runs each CPU stream on its own thread, while single kernels (quantized matmul, the
    attention softmax) run on one: splitting independent rows or heads over these streams uses
    every core. Streams are per thread in MLX, so each thread gets its own set.
    """
    streams = getattr(_local, "streams", None)
    if streams is None:
        n = min(os.cpu_count() or 1, 8)
        streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []
        _local.streams = streams
    return streams


def splits(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges cutting n items into at most `parts` nearly equal pieces."""
    b = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]


def dequantize_affine(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """`mx.dequantize` for affine 2/4/8-bit weights as shifts, masks and one multiply-add: the same values,
    ~2x faster on the CPU backend."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, cols*bits/32, 32/bits)
    # In float32 whatever the scales' dtype (the CPU keeps the checkpoint's bf16 scales): the same
    # values as casting the scales first.
    q = q.reshape(w.shape[0], -1, group_size).astype(mx.float32)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(w.shape[0], -1)


class DequantizingQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that sends many-token inputs through a dequantized BLAS GEMM (CPU only).

    On the CPU backend `quantized_matmul` runs at ~2 GFLOP/s while the BLAS GEMM runs at ~100:
    for prefill, dequantizing the layer's weights first is ~10x faster. One-token decode keeps
    the quantized kernel, which reads 4x fewer bytes. `backend.prepare` installs this class.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < DEQUANT_MIN_TOKENS:
            return self._few_tokens(x, cpu_streams())
        y = x @ self._dequantized().astype(x.dtype).T
        if "bias" in self:
            y = y + self["bias"]
        return y

    def _dequantized(self) -> mx.array:
        w, scales, biases = self["weight"], self["scales"], self.get("biases")
        if self.mode != "affine" or self.bits not in (2, 4, 8) or biases is None:
            if self.mode == "affine" and scales.dtype != mx.float32:  # bf16 scales: dequantize in float32
                scales = scales.astype(mx.float32)
                biases = None if biases is None else biases.astype(mx.float32)
            return mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)
        return dequantize_affine(w, scales, biases, self.group_size, self.bits)

    def _few_tokens(self, x: mx.array, streams: list[Any]) -> mx.array:
        """The quantized kernel: the C++ CPU matvec when built (`cpu_kernel`), else mx.quantized_matmul with
        its output rows split over the CPU streams (one thread each)."""
        if self.mode == "affine" and "biases" in self and cpu_kernel.available():
            y = cpu_kernel.quantized_matvec(
                x, self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
            )
            return y + self["bias"] if "bias" in self else y
        w, s, b = self["weight"], self["scales"], self.get("biases")
        if self.mode == "affine" and s.dtype != x.dtype:  # the checkpoint's bf16 scales (`backend.prepare`), float32 x
            s = s.astype(x.dtype)
            b = None if b is None else b.astype(x.dtype)
        if len(streams) < 2:
            y = mx.quantized_matmul(
                x, w, s, b, transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode
            )
            return y + self["bias"] if "bias" in self else y
        parts = []
        for st, (lo, hi) in zip(streams, splits(w.shape[0], len(streams))):
            with mx.stream(st):
                parts.append(
                    mx.quantized_matmul(
                        x,
                        w[lo:hi],
                        s[lo:hi],
                        None if b is None else b[lo:hi],
                        transpose=True,
                        group_size=self.group_size,
                        bits=self.bits,
                        mode=self.mode,
                    )
                )
        y = mx.concatenate(parts, axis=-1)
        if "bias" in self:
            y = y + self["bias"]
        return y


class StreamSplitAttention(Attention):
    """Vision attention with its heads split over the CPU streams (one thread each)."""

    def _attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        streams = cpu_streams()
        if len(streams) < 2:
            return super()._attend(q, k, v)
        parts = []
        for st, (a, b) in zip(streams, splits(self.n_heads, len(streams))):
            with mx.stream(st):
                parts.append(mx.fast.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=self.scale))
        return mx.concatenate(parts, axis=1)


# Model classes and their CPU replacements (same parameters, so a class swap is enough).
REPLACEMENTS: dict[type, type] = {nn.QuantizedLinear: DequantizingQuantizedLinear, Attention: StreamSplitAttention}
