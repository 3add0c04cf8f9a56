"""Mistral3 checkpoints in Mistral's official layout (`consolidated.safetensors` + `params.json` + `tekken.json`,
/work/shared/FAMILY.md §6.1 and §9.3), bf16/float32 or FP8 with per-tensor scales (Ministral 3 Instruct, §3.2):
converted by `pixtral_mlx.convert.convert`, loaded by `pixtral_mlx.load`, equal to transformers."""

from __future__ import annotations

import json
from pathlib import Path

import family_checkpoints
import numpy as np
import pytest
from test_family import CASES, transformers_logits

import pixtral_mlx
from pixtral_mlx.conversion import fp8
from pixtral_mlx.conversion.stream import convert
from pixtral_mlx.models.mistral3.args import Mistral3Args
from pixtral_mlx.models.pixtral.weights import canonical_key

torch = pytest.importorskip("torch")

LM, VT = "language_model.model.", "vision_tower.vision_model."


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> Mistral's interleaved RoPE pairs (the inverse of `permute_for_rope`, FAMILY.md §9.3)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's tensors under our (HF legacy + `vision_model`) names, float32 numpy."""
    out = {}
    for k, v in model.state_dict().items():
        key = canonical_key(k)
        if key is not None:
            out[key] = v.detach().float().numpy()
    return out


def official_tensors(model) -> dict[str, np.ndarray]:
    """The HF tiny model's weights under the official names (FAMILY.md §6.1), q/k interleaved."""
    t, v = model.config.text_config, model.config.vision_config
    sd = hf_state_dict(model)
    out = {"tok_embeddings.weight": sd[LM + "embed_tokens.weight"], "norm.weight": sd[LM + "norm.weight"]}
    if not t.tie_word_embeddings:
        out["output.weight"] = sd["language_model.lm_head.weight"]
    heads = {"q": t.num_attention_heads, "k": t.num_key_value_heads}
    for i in range(t.num_hidden_layers):
        p, q = f"{LM}layers.{i}.", f"layers.{i}."
        for n in "qkvo":
            w = sd[f"{p}self_attn.{n}_proj.weight"]
            out[f"{q}attention.w{n}.weight"] = _interleave(w, heads[n]) if n in heads else w
        for a, b in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            out[f"{q}feed_forward.{a}.weight"] = sd[f"{p}mlp.{b}_proj.weight"]
        out[f"{q}attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"{q}ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out["vision_encoder.patch_conv.weight"] = sd[VT + "patch_conv.weight"]
    out["vision_encoder.ln_pre.weight"] = sd[VT + "ln_pre.weight"]
    for i in range(v.num_hidden_layers):
        p, q = f"{VT}transformer.layers.{i}.", f"vision_encoder.transformer.layers.{i}."
        for n in "qkvo":
            w = sd[f"{p}attention.{n}_proj.weight"]
            out[f"{q}attention.w{n}.weight"] = _interleave(w, v.num_attention_heads) if n in "qk" else w
        for a, b in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            out[f"{q}feed_forward.{a}.weight"] = sd[f"{p}feed_forward.{b}_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "ffn_norm.weight"]
    out["pre_mm_projector_norm.weight"] = sd["multi_modal_projector.norm.weight"]
    out["patch_merger.merging_layer.weight"] = sd["multi_modal_projector.patch_merger.merging_layer.weight"]
    out["vision_language_adapter.w_in.weight"] = sd["multi_modal_projector.linear_1.weight"]
    out["vision_language_adapter.w_out.weight"] = sd["multi_modal_projector.linear_2.weight"]
    return out


def params_json(model) -> dict:
    """params.json as FAMILY.md §6.1 / §3.2 write it (yarn and llama_4_scaling blocks for ministral3)."""
    t, v = model.config.text_config, model.config.vision_config
    params = {
        "dim": t.hidden_size,
        "n_layers": t.num_hidden_layers,
        "head_dim": t.head_dim,
        "hidden_dim": t.intermediate_size,
        "n_heads": t.num_attention_heads,
        "n_kv_heads": t.num_key_value_heads,
        "rope_theta": t.rope_parameters["rope_theta"],
        "norm_eps": t.rms_norm_eps,
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "tied_embeddings": bool(t.tie_word_embeddings),
        "vision_encoder": {
            "hidden_size": v.hidden_size,
            "num_channels": 3,
            "max_image_size": v.image_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "rope_theta": v.rope_parameters["rope_theta"],
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "adapter_bias": False,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": 2,
            "add_pre_mm_projector_layer_norm": True,
            "image_token_id": 10,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
        },
    }
    if t.model_type == "ministral3":
        r = t.rope_parameters
        params["yarn"] = {
            "original_max_position_embeddings": r["original_max_position_embeddings"],
            "factor": r["factor"],
            "apply_scale": not r.get("mscale_all_dim"),
            "beta": r["beta_fast"],
            "alpha": r["beta_slow"],
        }
        params["llama_4_scaling"] = {
            "original_max_position_embeddings": r["original_max_position_embeddings"],
            "beta": r["llama_4_scaling_beta"],
        }
    return params


def write_official(model, path: Path, tensors: dict | None = None) -> Path:
    """consolidated.safetensors (numpy or torch tensors, FP8 included) + params.json + tekken.json."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = tensors if tensors is not None else official_tensors(model)
    out = {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()
    }
    save_file(out, str(path / "consolidated.safetensors"))
    (path / "params.json").write_text(json.dumps(params_json(model)), encoding="utf-8")
    family_checkpoints.tekken(path / "tekken.json")
    return path


def fp8_quantize(model) -> dict:
    """Emulate Ministral 3 Instruct: every decoder matrix to float8_e4m3fn with a per-tensor `qscale_weight`
    (and an unused `qscale_act`), the model's own weights replaced by the dequantized values (the reference)."""
    t = model.config.text_config
    tensors = official_tensors(model)
    heads = {"wq": t.num_attention_heads, "wk": t.num_key_value_heads}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if not ("language_model" in name and "layers" in name and name.endswith("proj.weight")):
                continue
            scale = p.abs().max() / 448.0
            codes = (p / scale).to(torch.float8_e4m3fn)
            p.copy_(codes.float() * scale)
            i = int(name.split("layers.")[1].split(".")[0])
            leaf = name.split(".")[-2]
            official = {
                "q_proj": "attention.wq",
                "k_proj": "attention.wk",
                "v_proj": "attention.wv",
                "o_proj": "attention.wo",
                "gate_proj": "feed_forward.w1",
                "down_proj": "feed_forward.w2",
                "up_proj": "feed_forward.w3",
            }[leaf]
            raw = codes.view(torch.uint8).numpy()
            if official.split(".")[-1] in heads:
                raw = _interleave(raw, heads[official.split(".")[-1]])
            key = f"layers.{i}.{official}"
            tensors[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float8_e4m3fn)
            tensors[f"{key}.qscale_weight"] = scale.reshape(()).clone()
            tensors[f"{key}.qscale_act"] = torch.tensor(1.0)
    return tensors


@pytest.fixture(scope="module", params=["A", "B"])
def variant(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("official") / request.param
    model = family_checkpoints.hf_model(request.param)
    hf = family_checkpoints.write_checkpoint(model, root / "hf")
    official = write_official(model, root / "official")
    out = convert(official, root / "mlx", dtype="float32", progress=False)
    return request.param, model, hf, out, pixtral_mlx.load(str(out))


def test_params_json_reads_as_the_hf_config(variant):
    name, model, hf, *_ = variant
    ours = Mistral3Args.from_params(params_json(model))
    theirs = Mistral3Args.from_hf_config(json.loads((hf / "config.json").read_text()))
    assert ours.text == theirs.text and ours.vision == theirs.vision
    assert ours.spatial_merge_size == 2 and ours.projector_bias is False
    assert ours.text.model_type == ("mistral" if name == "A" else "ministral3")
    assert Mistral3Args.from_hf_config(ours.to_config()) == ours


def test_converted_tensors_equal_transformers(variant):
    import mlx.core as mx

    _, model, _, out, _ = variant
    ref = hf_state_dict(model)
    got: dict = {}
    for f in sorted(out.glob("model-*.safetensors")):
        got.update(mx.load(str(f)))
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral3"
    for key, w in got.items():
        r = ref[key]
        if key.endswith("patch_conv.weight"):
            r = r.transpose(0, 2, 3, 1)
        assert np.array_equal(np.array(w), r), key  # bit-exact, RoPE permutation included
    assert set(got) == set(ref) - (
        {"language_model.lm_head.weight"} if model.config.text_config.tie_word_embeddings else set()
    )


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_logits_match_transformers_and_the_hf_layout(case, variant):
    _, model, hf, _, px = variant
    ours = px.logits(CASES[case])
    ref, _ = transformers_logits(model, px.encode(CASES[case]))
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, pixtral_mlx.load(str(hf)).logits(CASES[case]), atol=1e-4, rtol=0)


def test_fp8_table_equals_torch():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(fp8.TABLE, ref, equal_nan=True)
    assert np.isnan(fp8.TABLE).sum() == 2
    x = (torch.randn(37, 53) * 40).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    import mlx.core as mx

    ours = fp8.dequantize(fp8.decode(x.view(torch.uint8).numpy()), mx.array(scale.numpy()))
    assert np.array_equal(np.array(ours), (x.float() * scale).numpy())


def test_fp8_official_checkpoint_converts_exactly(tmp_path):
    import mlx.core as mx

    model = family_checkpoints.hf_model("B", seed=1)
    tensors = fp8_quantize(model)  # `model` now holds the dequantized weights: the reference
    src = write_official(model, tmp_path / "official", tensors)
    out = convert(src, tmp_path / "mlx", dtype="float32", progress=False)
    ref = hf_state_dict(model)
    got: dict = {}
    for f in sorted(out.glob("model-*.safetensors")):
        got.update(mx.load(str(f)))
    q = f"{LM}layers.0.self_attn.q_proj.weight"
    assert np.array_equal(np.array(got[q]), ref[q])  # dequantized, then un-interleaved, exactly
    assert not any("scale" in k for k in got)
    px = pixtral_mlx.load(str(out))
    for case in ("text", "two_images"):
        ours = px.logits(CASES[case])
        theirs, _ = transformers_logits(model, px.encode(CASES[case]))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_fp8_weight_without_scale_is_refused(tmp_path):
    from pixtral_mlx.errors import ConversionError

    model = family_checkpoints.hf_model("A", seed=2)
    tensors = fp8_quantize(model)
    del tensors["layers.0.attention.wq.qscale_weight"]
    src = write_official(model, tmp_path / "official", tensors)
    with pytest.raises(ConversionError, match="no scale"):
        convert(src, tmp_path / "mlx", progress=False)


def test_4bit_official_conversion_loads_and_generates(variant, tmp_path):
    name, model, hf, out, _ = variant
    official = out.parent / "official"
    q_official = convert(official, tmp_path / "q-official", quantize=True, bits=4, group_size=32, progress=False)
    q_hf = convert(hf, tmp_path / "q-hf", quantize=True, bits=4, group_size=32, progress=False)
    config = json.loads((q_official / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and "multi_modal_projector.norm" not in config["quantization"]
    px = pixtral_mlx.load(str(q_official))
    tokens = px.generate(CASES["two_images"], temperature=0, max_tokens=6).tokens
    assert 0 < len(tokens) <= 6
    # the same model from either layout: the same quantized weights, the same logits
    np.testing.assert_array_equal(px.logits(CASES["text"]), pixtral_mlx.load(str(q_hf)).logits(CASES["text"]))


def test_pixtral_params_json_still_picks_pixtral():
    from pixtral_mlx.conversion.source import family_args, is_mistral3

    params = {
        "dim": 64,
        "n_layers": 1,
        "head_dim": 16,
        "hidden_dim": 96,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 160,
        "vision_encoder": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": 1024,
            "patch_size": 16,
        },
    }
    assert not is_mistral3("official", params)
    assert type(family_args("official", params)).__name__ == "PixtralArgs"
    assert is_mistral3("hf", {"model_type": "mistral3"}) and not is_mistral3("hf", {"model_type": "llava"})


def test_cli_converts_the_official_layout(variant, tmp_path, capsys):
    from pixtral_mlx.convert.__main__ import main

    *_, out, px = variant
    assert (
        main([str(out.parent / "official"), "-o", str(tmp_path / "cli"), "-q", "--bits", "8", "--group-size", "32"])
        == 0
    )
    assert "bits per weight" in capsys.readouterr().out
    q8 = pixtral_mlx.load(str(tmp_path / "cli"))
    assert type(q8.args) is Mistral3Args and q8.args.quantization["bits"] == 8
    np.testing.assert_allclose(q8.logits(CASES["text"]), px.logits(CASES["text"]), atol=0.1, rtol=0)
