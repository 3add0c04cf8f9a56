"""Loading is strict, reads quantization from config.json, and accepts the layout MLX peers publish."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import pixtral_mlx
from pixtral_mlx.loading import ModelError

MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]


def copy_checkpoint(src, dst, edit, metadata=None):
    """Copy an MLX checkpoint, passing its weights through `edit(dict) -> dict`, as one shard."""
    dst.mkdir()
    weights = {}
    for f in src.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    mx.save_safetensors(str(dst / "model.safetensors"), edit(weights), metadata=metadata)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_peer_layout_loads_the_same(mlx_dir, pixtral, tmp_path):
    """mlx-community repos: no `vision_model` level, llava config with only some fields, no tekken.json."""

    def older_names(w):
        return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in w.items()}

    peer = copy_checkpoint(mlx_dir, tmp_path / "peer", older_names)
    config = json.loads((mlx_dir / "config.json").read_text())
    config["model_type"] = "llava"
    for key in ("image_break_token_id", "image_end_token_id", "projector_hidden_act"):
        config.pop(key, None)
    config["text_config"].pop("rope_theta")
    config["text_config"]["rope_parameters"] = {"rope_theta": 1e9, "rope_type": "default"}
    (peer / "config.json").write_text(json.dumps(config))
    (peer / "tokenizer.json").write_text("{}")  # peers ship the HF tokenizer; ours comes from mistral_common
    np.testing.assert_array_equal(pixtral_mlx.load(str(peer)).logits(MESSAGES), pixtral.logits(MESSAGES))


def test_torch_conv_layout_is_accepted_once(mlx_dir, pixtral, tmp_path):
    """Files PyTorch wrote (transformers records `format: pt`) hold the conv as [O, I, kH, kW]: the named rule
    `models.pixtral.weights.torch_layout`, not a guess from the shape. Files without that mark are MLX layout."""

    def torch_conv(w):
        key = "vision_tower.vision_model.patch_conv.weight"
        return {**w, key: w[key].transpose(0, 3, 1, 2)}

    peer = copy_checkpoint(mlx_dir, tmp_path / "torchconv", torch_conv, metadata={"format": "pt"})
    got = pixtral_mlx.load(str(peer)).model.vision_tower.vision_model.patch_conv.weight
    np.testing.assert_array_equal(np.array(got), np.array(pixtral.model.vision_tower.vision_model.patch_conv.weight))
    unmarked = copy_checkpoint(mlx_dir, tmp_path / "unmarked", torch_conv)
    with pytest.raises(ModelError, match=r"patch_conv.weight has shape \(32, 3, 16, 16\), expected \(32, 16, 16, 3\)"):
        pixtral_mlx.load(str(unmarked))


@pytest.mark.parametrize(
    "name,ours",
    [
        ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("model.vision_tower.ln_pre.weight", "vision_tower.vision_model.ln_pre.weight"),
        ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
        (
            "vision_tower.transformer.layers.1.ffn_norm.weight",
            "vision_tower.vision_model.transformer.layers.1.ffn_norm.weight",
        ),
        ("vision_tower.vision_model.ln_pre.weight", "vision_tower.vision_model.ln_pre.weight"),
        ("language_model.model.norm.weight", "language_model.model.norm.weight"),
        ("vision_tower.transformer.layers.0.attention.rotary_emb.inv_freq", None),
        ("language_model.model.embed_tokens.position_ids", None),
    ],
)
def test_each_peer_naming_rule(name, ours):
    """`canonical_key` is the one renaming for the loader and the converter: one case per rule in KEY_RULES."""
    from pixtral_mlx.models.pixtral.weights import canonical_key

    assert canonical_key(name) == ours


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k}, "missing language_model"),
        (lambda w: {**w, "vision_tower.vision_model.extra.weight": mx.zeros((2,))}, "unexpected vision_tower"),
        (lambda w: {**w, "language_model.model.norm.weight": mx.zeros((3,))}, r"has shape \(3,\), expected \(64,\)"),
    ],
)
def test_strict_loading(edit, message, mlx_dir, tmp_path):
    bad = copy_checkpoint(mlx_dir, tmp_path / "bad", edit)
    with pytest.raises(ModelError, match=message):
        pixtral_mlx.load(str(bad))


def test_not_a_model_folder(tmp_path, official_dir):
    with pytest.raises(ModelError, match="holds no model"):
        pixtral_mlx.load(str(tmp_path))
    with pytest.raises(ModelError, match="convert it first"):
        pixtral_mlx.load(str(official_dir))
    with pytest.raises(ModelError, match="not a Hugging Face repo id"):
        pixtral_mlx.load("no/such/thing")


def test_offline_repo_id_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="check the network"):
        pixtral_mlx.load("mistralai/Pixtral-12B-2409")


def test_quantization_read_from_config(hf_dir, tmp_path):
    import mlx.nn as nn

    from pixtral_mlx.convert import convert

    out = convert(hf_dir, tmp_path / "q4", quantize=True, bits=4, group_size=32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model = pixtral_mlx.load(str(out)).model
    q = model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 32


def test_official_repo_id_is_converted_once_into_the_cache(official_dir, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo, local_files_only))
        assert "consolidated.safetensors" in allow_patterns and "*.bin" not in allow_patterns
        return str(official_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "cache"))
    messages = []
    px = pixtral_mlx.load("mistralai/Pixtral-12B-2409", progress=messages.append)
    assert px.path == tmp_path / "cache" / "models" / "mistralai--Pixtral-12B-2409-4bit"
    assert json.loads((px.path / "config.json").read_text())["quantization"]["bits"] == 4
    assert any("Converting" in m for m in messages)
    n = len(calls)
    again = pixtral_mlx.load("mistralai/Pixtral-12B-2409")
    assert again.path == px.path and len(calls) == n  # reused, nothing downloaded or converted again
