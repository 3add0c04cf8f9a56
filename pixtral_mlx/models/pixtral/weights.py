"""The one key-mapping table: official Mistral and Hugging Face tensor names -> MLX names.

MLX names follow the layout mlx-vlm publishes for Pixtral (`mlx-community/pixtral-12b-*`), so those
repos load here and our output loads there. At runtime there is one RoPE layout, the HF
"rotate-half" order: official q/k rows are interleaved pairs and are permuted here, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from .args import PixtralArgs

LM = "language_model.model"
VT = "vision_tower.vision_model"

# (official regex, HF regex, MLX template). HF keys are matched after prefix normalization.
_TABLE: list[tuple[str, str, str]] = [
    (r"tok_embeddings\.weight", r"language_model\.model\.embed_tokens\.weight", f"{LM}.embed_tokens.weight"),
    (r"norm\.weight", r"language_model\.model\.norm\.weight", f"{LM}.norm.weight"),
    (r"output\.weight", r"language_model\.lm_head\.weight", "language_model.lm_head.weight"),
    (
        r"layers\.(\d+)\.attention\.wq\.weight",
        r"language_model\.model\.layers\.(\d+)\.self_attn\.q_proj\.weight",
        LM + ".layers.{0}.self_attn.q_proj.weight",
    ),
    (
        r"layers\.(\d+)\.attention\.wk\.weight",
        r"language_model\.model\.layers\.(\d+)\.self_attn\.k_proj\.weight",
        LM + ".layers.{0}.self_attn.k_proj.weight",
    ),
    (
        r"layers\.(\d+)\.attention\.wv\.weight",
        r"language_model\.model\.layers\.(\d+)\.self_attn\.v_proj\.weight",
        LM + ".layers.{0}.self_attn.v_proj.weight",
    ),
    (
        r"layers\.(\d+)\.attention\.wo\.weight",
        r"language_model\.model\.layers\.(\d+)\.self_attn\.o_proj\.weight",
        LM + ".layers.{0}.self_attn.o_proj.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.w1\.weight",
        r"language_model\.model\.layers\.(\d+)\.mlp\.gate_proj\.weight",
        LM + ".layers.{0}.mlp.gate_proj.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.w2\.weight",
        r"language_model\.model\.layers\.(\d+)\.mlp\.down_proj\.weight",
        LM + ".layers.{0}.mlp.down_proj.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.w3\.weight",
        r"language_model\.model\.layers\.(\d+)\.mlp\.up_proj\.weight",
        LM + ".layers.{0}.mlp.up_proj.weight",
    ),
    (
        r"layers\.(\d+)\.attention_norm\.weight",
        r"language_model\.model\.layers\.(\d+)\.input_layernorm\.weight",
        LM + ".layers.{0}.input_layernorm.weight",
    ),
    (
        r"layers\.(\d+)\.ffn_norm\.weight",
        r"language_model\.model\.layers\.(\d+)\.post_attention_layernorm\.weight",
        LM + ".layers.{0}.post_attention_layernorm.weight",
    ),
    (r"vision_encoder\.patch_conv\.weight", r"vision_tower\.patch_conv\.weight", f"{VT}.patch_conv.weight"),
    (r"vision_encoder\.ln_pre\.weight", r"vision_tower\.ln_pre\.weight", f"{VT}.ln_pre.weight"),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wq\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.attention\.q_proj\.weight",
        VT + ".transformer.layers.{0}.attention.q_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wk\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.attention\.k_proj\.weight",
        VT + ".transformer.layers.{0}.attention.k_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wv\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.attention\.v_proj\.weight",
        VT + ".transformer.layers.{0}.attention.v_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wo\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.attention\.o_proj\.weight",
        VT + ".transformer.layers.{0}.attention.o_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight",
        VT + ".transformer.layers.{0}.feed_forward.gate_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight",
        VT + ".transformer.layers.{0}.feed_forward.down_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight",
        VT + ".transformer.layers.{0}.feed_forward.up_proj.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.attention_norm\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.attention_norm\.weight",
        VT + ".transformer.layers.{0}.attention_norm.weight",
    ),
    (
        r"vision_encoder\.transformer\.layers\.(\d+)\.ffn_norm\.weight",
        r"vision_tower\.transformer\.layers\.(\d+)\.ffn_norm\.weight",
        VT + ".transformer.layers.{0}.ffn_norm.weight",
    ),
    (
        r"vision_language_adapter\.w_in\.(weight|bias)",
        r"multi_modal_projector\.linear_1\.(weight|bias)",
        "multi_modal_projector.linear_1.{0}",
    ),
    (
        r"vision_language_adapter\.w_out\.(weight|bias)",
        r"multi_modal_projector\.linear_2\.(weight|bias)",
        "multi_modal_projector.linear_2.{0}",
    ),
]
_OFFICIAL = [(re.compile(o + "$"), m) for o, _, m in _TABLE]
# HF names are matched after `canonical_key`, which adds the `vision_model` level.
_HF = [(re.compile(h.replace(r"vision_tower\.", r"vision_tower\.vision_model\.") + "$"), m) for _, h, m in _TABLE]


@dataclass(frozen=True)
class KeyRule:
    """One peer naming convention: names starting with `old` are renamed to start with `new`."""

    name: str
    old: str
    new: str
    unless: str = ""  # names that already start with this are left alone

    def apply(self, key: str) -> str:
        if key.startswith(self.old) and not (self.unless and key.startswith(self.unless)):
            return self.new + key[len(self.old) :]
        return key


# Hugging Face and MLX-peer tensor names -> ours, applied in order. The legacy LLaVA names (the Hub repo,
# transformers < 5, mlx-vlm) equal ours but for the `vision_model` level.
KEY_RULES = (
    KeyRule("transformers 5: decoder under model.", "model.language_model.", "language_model.model."),
    KeyRule("transformers 5: lm_head at the top", "lm_head.", "language_model.lm_head."),
    KeyRule("transformers 5: vision tower under model.", "model.vision_tower.", "vision_tower."),
    KeyRule("transformers 5: projector under model.", "model.multi_modal_projector.", "multi_modal_projector."),
    KeyRule(
        "transformers and older mlx-vlm: no vision_model level",
        "vision_tower.",
        "vision_tower.vision_model.",
        unless="vision_tower.vision_model.",
    ),
)
BUFFERS = ("rotary_emb.", "position_ids")  # non-parameters that older transformers files carry


def canonical_key(key: str) -> str | None:
    """A Hugging Face or MLX-peer tensor name in our layout; None for buffers that are not parameters."""
    if any(b in key for b in BUFFERS):
        return None
    for rule in KEY_RULES:
        key = rule.apply(key)
    return key


def torch_layout(metadata: dict[str, str]) -> bool:
    """Whether a safetensors file was written by PyTorch (transformers' `save_pretrained` records
    `format: pt`), so its patch conv is [O, I, kH, kW] rather than MLX's [O, kH, kW, I]. Our converter
    and mlx-vlm write `format: mlx`."""
    return metadata.get("format") == "pt"


@dataclass(frozen=True)
class Target:
    """Where a source tensor goes and what happens to it on the way."""

    key: str
    permute_heads: int = 0  # >0: official interleaved RoPE rows -> HF rotate-half order
    conv: bool = False  # PyTorch conv [O, I, kH, kW] -> MLX [O, kH, kW, I]


def target(src_key: str, source_format: str, args: PixtralArgs) -> Target | None:
    """Map one source tensor name to its MLX name; None for names the table does not know."""
    if source_format == "official":
        table = _OFFICIAL
    else:
        table = _HF
        src_key = canonical_key(src_key) or ""
    for pattern, template in table:
        m = pattern.match(src_key)
        if m is None:
            continue
        key = template.format(*m.groups())
        heads = 0
        if source_format == "official":
            if key.endswith("self_attn.q_proj.weight"):
                heads = args.text.num_attention_heads
            elif key.endswith("self_attn.k_proj.weight"):
                heads = args.text.num_key_value_heads
            elif key.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
                heads = args.vision.num_attention_heads
        return Target(key, permute_heads=heads, conv=key.endswith("patch_conv.weight"))
    return None


def permute_for_rope(w: mx.array, n_heads: int) -> mx.array:
    """Official (interleaved pairs 2j, 2j+1) -> HF rotate-half (j, j + hd/2) row order."""
    rows, cols = w.shape
    # (n_heads, hd/2, 2, in) -> (n_heads, 2, hd/2, in)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def transform(w: mx.array, t: Target) -> mx.array:
    if t.permute_heads:
        w = permute_for_rope(w, t.permute_heads)
    if t.conv:
        w = w.transpose(0, 2, 3, 1)
    return w


def expected_shapes(args: PixtralArgs) -> dict[str, tuple[int, ...]]:
    """Every MLX parameter name with its unquantized shape: the strict contract of a checkpoint."""
    t, v = args.text, args.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        f"{LM}.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        f"{LM}.norm.weight": (t.hidden_size,),
        "language_model.lm_head.weight": (t.vocab_size, t.hidden_size),
        f"{VT}.patch_conv.weight": (v.hidden_size, v.patch_size, v.patch_size, v.num_channels),
        f"{VT}.ln_pre.weight": (v.hidden_size,),
        "multi_modal_projector.linear_1.weight": (t.hidden_size, v.hidden_size),
        "multi_modal_projector.linear_1.bias": (t.hidden_size,),
        "multi_modal_projector.linear_2.weight": (t.hidden_size, t.hidden_size),
        "multi_modal_projector.linear_2.bias": (t.hidden_size,),
    }
    for i in range(t.num_hidden_layers):
        p = f"{LM}.layers.{i}"
        shapes.update(
            {
                f"{p}.self_attn.q_proj.weight": (q, t.hidden_size),
                f"{p}.self_attn.k_proj.weight": (kv, t.hidden_size),
                f"{p}.self_attn.v_proj.weight": (kv, t.hidden_size),
                f"{p}.self_attn.o_proj.weight": (t.hidden_size, q),
                f"{p}.mlp.gate_proj.weight": (t.intermediate_size, t.hidden_size),
                f"{p}.mlp.down_proj.weight": (t.hidden_size, t.intermediate_size),
                f"{p}.mlp.up_proj.weight": (t.intermediate_size, t.hidden_size),
                f"{p}.input_layernorm.weight": (t.hidden_size,),
                f"{p}.post_attention_layernorm.weight": (t.hidden_size,),
            }
        )
    for i in range(v.num_hidden_layers):
        p = f"{VT}.transformer.layers.{i}"
        d = v.hidden_size
        shapes.update(
            {
                **{f"{p}.attention.{n}_proj.weight": (d, d) for n in "qkvo"},
                f"{p}.feed_forward.gate_proj.weight": (v.intermediate_size, d),
                f"{p}.feed_forward.down_proj.weight": (d, v.intermediate_size),
                f"{p}.feed_forward.up_proj.weight": (v.intermediate_size, d),
                f"{p}.attention_norm.weight": (d,),
                f"{p}.ffn_norm.weight": (d,),
            }
        )
    return shapes


def is_language_linear(key: str) -> bool:
    """Decoder matrices that are quantized by default (vision tower and adapter stay dense)."""
    return (
        key.startswith("language_model.")
        and key.endswith(".weight")
        and ("_proj." in key or key.endswith(("lm_head.weight", "embed_tokens.weight")))
    )
