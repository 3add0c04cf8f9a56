"""Tiny random Pixtral checkpoints in both source layouts, built with transformers.

The architecture is Pixtral's (SiLU-gated ViT with RoPE-2D, GELU adapter, Mistral decoder with
head_dim != hidden/heads, GQA, untied output); only the widths and depths are small. The vocabulary
is the real 131072 so that the real tekken tokenizer can be used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "vocab_size": 131072,
    "rope_theta": 1e9,
}
VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "image_size": 1024,
    "patch_size": 16,
    "rope_theta": 10000.0,
}


def tekken_path() -> Path:
    from pixtral_mlx.config import bundled_tekken

    return bundled_tekken()


def hf_model(seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """A float32 transformers `LlavaForConditionalGeneration` with Pixtral's architecture."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    t = {**TEXT, **(text or {})}
    v = {**VISION, **(vision or {})}
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(
            **{
                k: v[k]
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "image_size",
                    "patch_size",
                )
            },
            head_dim=v["hidden_size"] // v["num_attention_heads"],
            rope_theta=v["rope_theta"],
            hidden_act="silu",
        ),
        text_config=MistralConfig(
            **{
                k: t[k]
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "rms_norm_eps",
                    "vocab_size",
                )
            },
            rope_theta=t["rope_theta"],
            sliding_window=None,
            tie_word_embeddings=False,
            max_position_embeddings=131072,
        ),
        image_token_index=10,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).float().eval()
    # Default init leaves norms at 1 and biases at 0: randomize them so a mixed-up weight shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_pre" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 1.0))
    return model


def legacy_hf_state_dict(model) -> dict[str, np.ndarray]:
    """The state dict under the on-disk names of the Hub repo (legacy LLaVA layout)."""
    out = {}
    for k, v in model.state_dict().items():
        for new, old in (
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ):
            if k.startswith(new):
                k = old + k[len(new) :]
                break
        out[k] = v.detach().float().numpy().copy()
    return out


def sparse_hf_config(model) -> dict:
    """A config.json like the real Hub file: only non-default fields, rope_theta spelled the old way."""
    t = model.config.text_config
    v = model.config.vision_config
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 10,
        "projector_hidden_act": "gelu",
        "text_config": {
            "model_type": "mistral",
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_hidden_layers,
            "intermediate_size": t.intermediate_size,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rope_theta": TEXT["rope_theta"],
            "sliding_window": None,
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": "silu",
            "rope_parameters": {"rope_theta": VISION["rope_theta"], "rope_type": "axial"},
        },
    }


def write_hf_checkpoint(model, path: Path, dtype: str = "float32") -> Path:
    """HF Llava layout: config.json + model-*.safetensors (legacy names), as on the Hub."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = legacy_hf_state_dict(model)
    if dtype != "float32":
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(sparse_hf_config(model), indent=2))
    return path


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> official interleaved pairs (inverse of the HF converter's permute)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_official_checkpoint(model, path: Path) -> Path:
    """The same weights in Mistral's layout: consolidated.safetensors + params.json + tekken.json."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    t = model.config.text_config
    v = model.config.vision_config
    sd = legacy_hf_state_dict(model)
    out: dict[str, np.ndarray] = {}
    lm, vt = "language_model.model.", "vision_tower."
    out["tok_embeddings.weight"] = sd[lm + "embed_tokens.weight"]
    out["norm.weight"] = sd[lm + "norm.weight"]
    out["output.weight"] = sd["language_model.lm_head.weight"]
    for i in range(t.num_hidden_layers):
        p = f"{lm}layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = _interleave(sd[p + "self_attn.q_proj.weight"], t.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = _interleave(sd[p + "self_attn.k_proj.weight"], t.num_key_value_heads)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out["vision_encoder.patch_conv.weight"] = sd[vt + "patch_conv.weight"]
    out["vision_encoder.ln_pre.weight"] = sd[vt + "ln_pre.weight"]
    for i in range(v.num_hidden_layers):
        p, q = f"{vt}transformer.layers.{i}.", f"vision_encoder.transformer.layers.{i}."
        out[q + "attention.wq.weight"] = _interleave(sd[p + "attention.q_proj.weight"], v.num_attention_heads)
        out[q + "attention.wk.weight"] = _interleave(sd[p + "attention.k_proj.weight"], v.num_attention_heads)
        out[q + "attention.wv.weight"] = sd[p + "attention.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "attention.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "feed_forward.gate_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "feed_forward.down_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "feed_forward.up_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "ffn_norm.weight"]
    for a, b in (("w_in", "linear_1"), ("w_out", "linear_2")):
        for s in ("weight", "bias"):
            out[f"vision_language_adapter.{a}.{s}"] = sd[f"multi_modal_projector.{b}.{s}"]
    save_file(out, str(path / "consolidated.safetensors"))
    params = {
        "dim": t.hidden_size,
        "n_layers": t.num_hidden_layers,
        "head_dim": t.head_dim,
        "hidden_dim": t.intermediate_size,
        "n_heads": t.num_attention_heads,
        "n_kv_heads": t.num_key_value_heads,
        "rope_theta": TEXT["rope_theta"],
        "norm_eps": t.rms_norm_eps,
        "vocab_size": t.vocab_size,
        "vision_encoder": {
            "hidden_size": v.hidden_size,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "rope_theta": VISION["rope_theta"],
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_token_id": 10,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
        },
    }
    (path / "params.json").write_text(json.dumps(params, indent=2))
    shutil.copy(tekken_path(), path / "tekken.json")
    return path


def transformers_image_inputs(prompt) -> dict:
    """`pixel_values` (padded to the largest image) and `image_sizes` of a prompt's images, as transformers'
    Pixtral-family models take them; {} without images."""
    import torch

    if not prompt.images:
        return {}
    H = max(i.pixels.shape[1] for i in prompt.images)
    W = max(i.pixels.shape[2] for i in prompt.images)
    pv = np.zeros((len(prompt.images), 3, H, W), np.float32)
    for k, img in enumerate(prompt.images):
        pv[k, :, : img.pixels.shape[1], : img.pixels.shape[2]] = img.pixels
    return {
        "pixel_values": torch.from_numpy(pv),
        "image_sizes": torch.tensor([i.pixels.shape[1:] for i in prompt.images]),
    }
