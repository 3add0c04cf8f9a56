"""Mistral3: Pixtral's vision encoder (patch 14), RMSNorm, 2x2 patch merger, bias-free GELU adapter, then
mlx-lm's decoder: `llama.Model` for Mistral Small 3.x, `ministral3.Model` (YaRN + llama-4 query scaling) for
Ministral 3.

Module names: `vision_tower.vision_model.*` (Pixtral's, shared), `multi_modal_projector.{norm, patch_merger.
merging_layer, linear_1, linear_2}` (transformers' names), `language_model.model.*` and `language_model.lm_head`
(absent when the embeddings are tied). The order of operations is transformers' `Mistral3MultiModalProjector`
(/work/shared/FAMILY.md §2.1).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, ministral3

from pixtral_mlx.models.mistral3.args import Mistral3Args
from pixtral_mlx.models.pixtral import model as pixtral_model
from pixtral_mlx.models.pixtral.vision import VisionModel


class PatchMerger(nn.Module):
    """Each s x s block of an image's patches -> one row: the block's features, channel-major (torch's
    `F.unfold` order, FAMILY.md §2.1), through `merging_layer` (no bias)."""

    def __init__(self, hidden: int, s: int):
        super().__init__()
        self.s = s
        self.merging_layer = nn.Linear(hidden * s * s, hidden, bias=False)

    def __call__(self, x: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        s, d = self.s, x.shape[-1]
        blocks, start = [], 0
        for h, w in grids:
            img = x[start : start + h * w].reshape(h, w, d)
            start += h * w
            hs, ws = h // s, w // s  # unfold floors odd sides; mistral_common's sizes are multiples of s
            img = img[: hs * s, : ws * s].reshape(hs, s, ws, s, d)
            blocks.append(img.transpose(0, 2, 4, 1, 3).reshape(hs * ws, d * s * s))
        return self.merging_layer(mx.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0])


class MultiModalProjector(nn.Module):
    def __init__(self, args: Mistral3Args):
        super().__init__()
        dv, dt = args.vision.hidden_size, args.text.hidden_size
        self.norm = nn.RMSNorm(dv, eps=args.text.rms_norm_eps)  # transformers: text_config.rms_norm_eps
        self.patch_merger = PatchMerger(dv, args.spatial_merge_size)
        self.linear_1 = nn.Linear(dv, dt, bias=args.projector_bias)
        self.gelu = nn.GELU()  # exact erf GELU
        self.linear_2 = nn.Linear(dt, dt, bias=args.projector_bias)

    def __call__(self, x: mx.array, grids: list[tuple[int, int]]) -> mx.array:
        return self.linear_2(self.gelu(self.linear_1(self.patch_merger(self.norm(x), grids))))


class Model(pixtral_model.Model):
    """Pixtral's `Model` (embed, the decoder call, caches) with Mistral3's projector and decoder."""

    def __init__(self, args: Mistral3Args):
        nn.Module.__init__(self)  # Pixtral's __init__ builds Pixtral's modules; these are ours
        self.args = args
        self.vision_tower = VisionModel(args.vision)
        self.multi_modal_projector = MultiModalProjector(args)
        text = args.text.to_mlx_lm()
        if args.text.model_type == "ministral3":
            self.language_model = ministral3.Model(ministral3.ModelArgs.from_dict(text))
        else:
            self.language_model = llama.Model(llama.ModelArgs.from_dict(text))

    def encode_images(self, images: list[np.ndarray | mx.array]) -> list[mx.array]:
        """Images (3, H, W), normalized -> for each, its (rows*cols, text hidden) features, one row per [IMG]
        token (one per s x s block of patches)."""
        hwc = [mx.array(p).transpose(1, 2, 0) for p in images]
        p, s = self.args.vision.patch_size, self.args.spatial_merge_size
        grids = [(img.shape[0] // p, img.shape[1] // p) for img in hwc]
        feats = self.multi_modal_projector(self.vision_tower(hwc), grids)
        ends = np.cumsum([(h // s) * (w // s) for h, w in grids]).tolist()
        return mx.split(feats, ends[:-1], axis=0) if len(ends) > 1 else [feats]
