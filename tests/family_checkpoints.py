"""Tiny random Mistral3 checkpoints (`Mistral3ForConditionalGeneration`) in the Hugging Face layout.

The variants are /work/shared/FAMILY.md §9's, with the real patch size (14) and vocabulary (131072) so that a
real tekken tokenizer drives them: "A" is Mistral Small 3.x (a `mistral` decoder, untied), "B" Ministral 3
(a `ministral3` decoder: YaRN and llama-4 query scaling with original_max_position_embeddings 16, so a prompt of
a few dozen tokens crosses several scaling steps; tied embeddings), "B_scaled" Ministral 3 with a YaRN attention
factor != 1 (mscale_all_dim 0) and a ramp over interior dimensions (beta_fast 4), untied.
"""

from __future__ import annotations

import json
from pathlib import Path

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": 1540,
    "patch_size": 14,
    "hidden_act": "silu",  # transformers defaults to gelu; every real checkpoint is SiLU (FAMILY.md §1.2)
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TEXT = {
    "vocab_size": 131072,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "rms_norm_eps": 1e-5,
}
YARN = {
    "type": "yarn",
    "rope_type": "yarn",
    "rope_theta": 1e6,
    "factor": 16.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
VARIANTS = {
    "A": {
        "model_type": "mistral",
        "max_position_embeddings": 512,
        "rope_theta": 1e9,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    "B": {
        "model_type": "ministral3",
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "rope_parameters": YARN,
    },
    "B_scaled": {
        "model_type": "ministral3",
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "rope_parameters": {**YARN, "mscale_all_dim": 0.0, "beta_fast": 4.0},
    },
}
IMAGE = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}


def hf_model(variant: str, seed: int = 0):
    """A float32 eager transformers `Mistral3ForConditionalGeneration` with every weight random."""
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    text = {**TEXT, **VARIANTS[variant]}
    config = Mistral3Config(
        vision_config=dict(VISION),
        text_config=text,
        image_token_index=10,
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        vision_feature_layer=-1,
        tie_word_embeddings=text["tie_word_embeddings"],  # set at both levels (FAMILY.md §7's pitfall)
    )
    config._attn_implementation = "eager"
    model = Mistral3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "ln_pre" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 1.0))
    embed = model.get_input_embeddings().weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert tied == text["tie_word_embeddings"], (variant, tied)
    return model


def tekken(path: Path) -> Path:
    """mistral_common's Pixtral-12B tekken (the only bundled one with an image config) as a v7 tokenizer (Mistral
    Small 3.1's version, FAMILY.md §5.1: [SYSTEM_PROMPT] layout) with Mistral3's image settings."""
    from pixtral_mlx.config import bundled_tekken

    data = json.loads(Path(bundled_tekken()).read_text(encoding="utf-8"))
    data["config"]["version"] = "v7"
    data["image"] = dict(IMAGE)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_checkpoint(model, path: Path) -> Path:
    """`save_pretrained` (config.json + model.safetensors, as on the Hub) plus tekken.json."""
    path = Path(path)
    model.save_pretrained(path)
    tekken(path / "tekken.json")
    return path
