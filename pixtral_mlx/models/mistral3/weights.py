"""Mistral3's weight map, Hugging Face layout (`Mistral3ForConditionalGeneration`, /work/shared/FAMILY.md §6.2).

transformers' names equal ours but for the prefixes Pixtral's map already normalizes (`model.language_model.`,
top-level `lm_head.`, `model.vision_tower.`, `model.multi_modal_projector.`, and the `vision_model` level under
`vision_tower`), so `canonical_key` and `torch_layout` are Pixtral's. The new tensors keep transformers' names:
`multi_modal_projector.norm.weight`, `multi_modal_projector.patch_merger.merging_layer.weight`, and
`multi_modal_projector.linear_{1,2}.weight` without biases.

The official layout (`consolidated.safetensors`, FAMILY.md §6.1) is Pixtral's plus `pre_mm_projector_norm.weight`
and `patch_merger.merging_layer.weight`; its q/k rows (decoder and vision) are interleaved RoPE pairs, permuted
to the rotate-half order by Pixtral's `transform`. `target` maps either layout for the converter.
"""

from __future__ import annotations

import re
from typing import Any

from pixtral_mlx.models.mistral3.args import Mistral3Args
from pixtral_mlx.models.pixtral import weights as pixtral_weights
from pixtral_mlx.models.pixtral.weights import (
    KEY_RULES,
    Target,
    canonical_key,
    is_language_linear,
    torch_layout,
    transform,
)

__all__ = [
    "KEY_RULES",
    "Target",
    "canonical_key",
    "expected_shapes",
    "is_language_linear",
    "sanitize",
    "target",
    "torch_layout",
    "transform",
]

LM_HEAD = "language_model.lm_head.weight"
NORM = "multi_modal_projector.norm.weight"
MERGER = "multi_modal_projector.patch_merger.merging_layer.weight"
# (official regex, HF regex after `canonical_key`, ours): the tensors Pixtral's table does not have.
_EXTRA = [
    (re.compile(r"pre_mm_projector_norm\.weight$"), re.compile(re.escape(NORM) + "$"), NORM),
    (re.compile(r"patch_merger\.merging_layer\.weight$"), re.compile(re.escape(MERGER) + "$"), MERGER),
]


def target(src_key: str, source_format: str, args: Mistral3Args) -> Target | None:
    """Map one source tensor name (official or Hugging Face) to ours; None for names the maps do not know."""
    key = src_key if source_format == "official" else canonical_key(src_key) or ""
    for official, hf, ours in _EXTRA:
        if (official if source_format == "official" else hf).match(key):
            return Target(ours)
    return pixtral_weights.target(src_key, source_format, args)  # type: ignore[arg-type]  # same text/vision


def sanitize(weights: dict[str, Any], args: Mistral3Args) -> dict[str, Any]:
    """Drop what the model does not hold: an output layer saved alongside tied embeddings."""
    if args.text.tie_word_embeddings:
        weights.pop(LM_HEAD, None)
    return weights


def expected_shapes(args: Mistral3Args) -> dict[str, tuple[int, ...]]:
    """Every parameter name with its unquantized shape."""
    shapes = pixtral_weights.expected_shapes(args)  # type: ignore[arg-type]  # same text/vision fields
    v, s = args.vision, args.spatial_merge_size
    if args.text.tie_word_embeddings:
        del shapes[LM_HEAD]
    if not args.projector_bias:
        del shapes["multi_modal_projector.linear_1.bias"], shapes["multi_modal_projector.linear_2.bias"]
    shapes["multi_modal_projector.norm.weight"] = (v.hidden_size,)
    shapes["multi_modal_projector.patch_merger.merging_layer.weight"] = (v.hidden_size, v.hidden_size * s * s)
    return shapes
