"""Pixtral-12B: Pixtral-ViT + GELU adapter + the Mistral-NeMo decoder from mlx-lm.

Module names follow the MLX layout mlx-vlm publishes (`vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}`, `language_model.model.*`, `language_model.lm_head`), so the
checkpoint keys are the attribute paths. The decoder is mlx-lm's `llama.Model` (head_dim 128,
GQA, theta 1e9, untied output), fed through its `input_embeddings` argument.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from . import backend
from .config import PixtralArgs
from .vision import VisionModel


class MultiModalProjector(nn.Module):
    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.linear_1 = nn.Linear(args.vision.hidden_size, args.text.hidden_size, bias=True)
        self.gelu = nn.GELU()  # exact erf GELU, as in mistral-inference and transformers
        self.linear_2 = nn.Linear(args.text.hidden_size, args.text.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.gelu(self.linear_1(x)))


class Model(nn.Module):
    def __init__(self, args: PixtralArgs):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.multi_modal_projector = MultiModalProjector(args)
        self.language_model = llama.Model(llama.ModelArgs.from_dict(args.text.to_mlx_lm()))

    def encode_image(self, pixels: np.ndarray | mx.array) -> mx.array:
        """One image (3, H, W) normalized -> (rows*cols, text hidden) features for its [IMG] tokens."""
        img = mx.array(pixels).transpose(1, 2, 0)  # CHW -> HWC for MLX's NHWC conv
        return self.multi_modal_projector(self.vision_tower([img]))

    def embed(self, tokens: list[int] | np.ndarray, features: mx.array | None) -> mx.array:
        """Token embeddings with image features written into the [IMG] positions only, in order.

        [IMG_BREAK] and [IMG_END] keep their learned text embeddings (REFERENCE §8).
        """
        ids = np.asarray(tokens, dtype=np.int32)
        is_img = ids == self.args.image_token_id
        n_img = int(is_img.sum())
        n_feat = 0 if features is None else features.shape[0]
        if n_img != n_feat:
            raise ValueError(f"the prompt has {n_img} [IMG] tokens but {n_feat} image features")
        h = self.language_model.model.embed_tokens(mx.array(ids)[None])
        if n_img == 0:
            return h
        # Row k of `features` goes to the k-th [IMG] position.
        rows = np.cumsum(is_img) - 1
        rows[~is_img] = 0
        gathered = features[mx.array(rows)].astype(h.dtype)
        return mx.where(mx.array(is_img)[None, :, None], gathered[None], h)

    def __call__(self, inputs: mx.array, cache: Any = None, input_embeddings: mx.array | None = None) -> mx.array:
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    @property
    def layers(self) -> list[nn.Module]:
        return self.language_model.model.layers

    def make_cache(self) -> list[Any]:
        return self.language_model.make_cache()


class DequantizingQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that sends many-token inputs through a dequantized BLAS GEMM (CPU only).

    On the CPU backend `quantized_matmul` runs at ~2 GFLOP/s while the BLAS GEMM runs at ~100:
    for prefill, dequantizing the layer's weights first is ~10x faster. One-token decode keeps
    the quantized kernel, which reads 4x fewer bytes. `backend.prepare` installs this class.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < backend.DEQUANT_MIN_TOKENS:
            return self._few_tokens(x, backend.cpu_streams())
        y = x @ self._dequantized().astype(x.dtype).T
        if "bias" in self:
            y = y + self["bias"]
        return y

    def _dequantized(self) -> mx.array:
        w, scales, biases = self["weight"], self["scales"], self.get("biases")
        if self.mode != "affine" or self.bits not in (2, 4, 8) or biases is None:
            return mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)
        # The same values as mx.dequantize with shifts, masks and one multiply-add: ~2x faster on CPU.
        shifts = mx.arange(0, 32, self.bits, dtype=mx.uint32)
        q = (w[..., None] >> shifts) & ((1 << self.bits) - 1)  # (rows, cols*bits/32, 32/bits)
        q = q.reshape(w.shape[0], -1, self.group_size).astype(scales.dtype)
        return (q * scales[..., None] + biases[..., None]).reshape(w.shape[0], -1)

    def _few_tokens(self, x: mx.array, streams: list[Any]) -> mx.array:
        """The quantized kernel: the C++ CPU matvec when built (pixtral_mlx.cpu_kernel), else
        mx.quantized_matmul with its output rows split over the CPU streams (one thread each)."""
        from . import cpu_kernel

        if self.mode == "affine" and "biases" in self and cpu_kernel.available():
            y = cpu_kernel.quantized_matvec(
                x, self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
            )
            return y + self["bias"] if "bias" in self else y
        if len(streams) < 2:
            return super().__call__(x)
        w, s, b = self["weight"], self["scales"], self.get("biases")
        parts = []
        for st, (lo, hi) in zip(streams, backend.splits(w.shape[0], len(streams))):
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
