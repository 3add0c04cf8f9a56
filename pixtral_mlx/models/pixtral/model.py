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

from .args import PixtralArgs
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

    def encode_images(self, images: list[np.ndarray | mx.array]) -> list[mx.array]:
        """Images (3, H, W), normalized -> for each, its (rows*cols, text hidden) features for its [IMG] tokens.

        All images go through the encoder in one call: their patches are concatenated (so the linear
        layers run as one matrix product) while attention stays within each image.
        """
        hwc = [mx.array(p).transpose(1, 2, 0) for p in images]  # CHW -> HWC for MLX's NHWC conv
        feats = self.multi_modal_projector(self.vision_tower(hwc))
        p = self.args.vision.patch_size
        ends = np.cumsum([(img.shape[0] // p) * (img.shape[1] // p) for img in hwc]).tolist()
        return mx.split(feats, ends[:-1], axis=0) if len(ends) > 1 else [feats]

    def embed(self, tokens: list[int] | np.ndarray, features: mx.array | None) -> mx.array:
        """Token embeddings with image features written into the [IMG] positions only, in order.

        [IMG_BREAK] and [IMG_END] keep their learned text embeddings (docs/MODEL.md §8).
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
