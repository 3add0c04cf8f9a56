"""Ministral 3 Instruct's FP8 checkpoints in the Hugging Face layout (FAMILY.md §3.2 "FP8 checkpoints"): decoder
matrices in float8_e4m3fn with `weight_scale_inv` (one number, or one per block with `weight_block_size`) and an
unused `activation_scale`. `pixtral_mlx.load` reads them as they are and `convert` converts them; either way the
model equals the bf16 one built from the dequantized weights."""

from __future__ import annotations

import json
import shutil

import family_checkpoints
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_family import CASES

import pixtral_mlx
from pixtral_mlx.convert import convert
from pixtral_mlx.errors import ModelError

BLOCK = [32, 32]  # tiny tiles: 96x64 and 48x64 matrices get full and partial ones
# transformers 5's in-memory names (what the newer converters write, FAMILY.md §6.2)
PREFIXES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def is_fp8(name: str) -> bool:
    return name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")


def fp8_tensors(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, dequantized bf16): the scale maps each tile's largest magnitude to e4m3fn's 448."""
    w = w.float()
    if block is None:
        scale = w.abs().max() / 448.0
        full = scale
    else:
        b0, b1 = block
        rows, cols = -(-w.shape[0] // b0), -(-w.shape[1] // b1)
        scale = torch.empty(rows, cols)
        for i in range(rows):
            for j in range(cols):
                scale[i, j] = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].abs().max() / 448.0
        full = scale.repeat_interleave(b0, 0).repeat_interleave(b1, 1)[: w.shape[0], : w.shape[1]]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, scale, (codes.float() * full).to(torch.bfloat16)


def write_pair(root, block: list[int] | None, seed: int = 3):
    """An FP8 checkpoint (names as transformers 5 writes them) and the bf16 one holding its dequantized weights."""
    model = family_checkpoints.hf_model("A", seed=seed).to(torch.bfloat16)
    ref = family_checkpoints.write_checkpoint(model, root / "bf16")
    weights = load_file(str(ref / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if is_fp8(name):
            codes, scale, dequantized = fp8_tensors(w, block)
            stem = name.removesuffix(".weight")
            fp8[name], fp8[f"{stem}.weight_scale_inv"] = codes, scale
            fp8[f"{stem}.activation_scale"] = torch.tensor(1.0)
            weights[name] = dequantized
        else:
            fp8[name] = w
    save_file(weights, str(ref / "model.safetensors"), metadata={"format": "pt"})
    src = root / "fp8"
    shutil.copytree(ref, src)
    renamed = {}
    for name, w in fp8.items():
        for old, new in PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        renamed[name] = w
    save_file(renamed, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": block,
        "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        "dequantize": False,
    }
    (src / "config.json").write_text(json.dumps(config))
    return src, ref


@pytest.fixture(scope="module", params=["per-tensor", "block"])
def pair(request, tmp_path_factory):
    block = BLOCK if request.param == "block" else None
    return write_pair(tmp_path_factory.mktemp("fp8") / request.param, block)


def test_fp8_folder_loads_and_equals_the_dequantized_model(pair):
    src, ref = pair
    with open(src / "model.safetensors", "rb") as f:  # it really is FP8 on disk
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["model.language_model.layers.0.self_attn.q_proj.weight"]["dtype"] == "F8_E4M3"
    fp8, bf16 = pixtral_mlx.load(str(src)), pixtral_mlx.load(str(ref))
    for case in ("text", "one_image"):
        ours, theirs = fp8.logits(CASES[case]), bf16.logits(CASES[case])
        assert np.abs(theirs).max() > 0.5
        np.testing.assert_array_equal(ours, theirs)
    assert (
        fp8.generate(CASES["text"], temperature=0, max_tokens=4).tokens
        == bf16.generate(CASES["text"], temperature=0, max_tokens=4).tokens
    )


def test_fp8_folder_converts_like_the_dequantized_one(pair, tmp_path):
    from pixtral_mlx.convert.__main__ import main

    src, ref = pair
    assert main([str(src), "-o", str(tmp_path / "q-fp8"), "-q", "--group-size", "32", "--quiet"]) == 0
    q_ref = convert(ref, tmp_path / "q-ref", quantize=True, group_size=32, progress=False)
    ours, theirs = pixtral_mlx.load(str(tmp_path / "q-fp8")), pixtral_mlx.load(str(q_ref))
    config = json.loads((tmp_path / "q-fp8" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and "quant_method" not in config.get("quantization_config", {})
    for case in ("text", "one_image"):
        np.testing.assert_array_equal(ours.logits(CASES[case]), theirs.logits(CASES[case]))
    bf16 = convert(src, tmp_path / "bf16", progress=False)  # unquantized: the dequantized bf16 weights
    np.testing.assert_array_equal(
        pixtral_mlx.load(str(bf16)).logits(CASES["text"]), pixtral_mlx.load(str(ref)).logits(CASES["text"])
    )


def test_row_blocks_cut_through_scale_tiles(pair, monkeypatch):
    """The converter reads big tensors in blocks of rows; each block gets its own rows' scales."""
    import mlx.core as mx
    from tqdm import tqdm

    from pixtral_mlx.conversion import stream
    from pixtral_mlx.conversion.source import open_source

    src, ref = pair
    source = open_source(src)
    try:
        jobs, _ = stream.plan(source, mx.bfloat16, None)
        job = next(j for j in jobs if j.target.key.endswith("layers.0.mlp.gate_proj.weight"))  # 96 x 64 FP8
        assert job.scale is not None
        monkeypatch.setattr(stream, "CHUNK_BYTES", 40 * 64)  # 40 rows a block: 0-39, 40-79, 80-95
        blocks = list(stream._blocks(source, job, tqdm(disable=True), mx.bfloat16))
    finally:
        source.close()
    assert [b.shape[0] for b in blocks] == [40, 40, 16]
    want = load_file(str(ref / "model.safetensors"))["language_model.model.layers.0.mlp.gate_proj.weight"]
    assert np.array_equal(np.array(mx.concatenate(blocks).astype(mx.float32)), want.float().numpy())


def test_fp8_dequantization_is_exact_for_block_scales():
    import mlx.core as mx

    from pixtral_mlx.conversion import fp8

    w = torch.randn(100, 70) * 3
    codes, scale, _ = fp8_tensors(w, [32, 16])
    ref = codes.float() * scale.repeat_interleave(32, 0).repeat_interleave(16, 1)[:100, :70]
    raw = mx.array(codes.view(torch.uint8).numpy())
    whole = fp8.dequantize(fp8.decode(raw), mx.array(scale.numpy()), (32, 16))
    assert np.array_equal(np.array(whole), ref.numpy())
    rows = fp8.dequantize(fp8.decode(raw[45:77]), mx.array(scale.numpy()), (32, 16), first_row=45)
    assert np.array_equal(np.array(rows), ref[45:77].numpy())


def test_a_scale_that_fits_no_block_is_one_sentence(tmp_path):
    src, _ = write_pair(tmp_path, BLOCK, seed=4)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (src / "config.json").write_text(json.dumps(config))
    message = r"FP8 scale '.*_proj.weight_scale_inv' has shape \[\d, \d\]: expected one number, or one per 16x16"
    with pytest.raises(ModelError, match=message):
        pixtral_mlx.load(str(src))


def test_short_name_loads_the_fp8_repo(pair, monkeypatch, tmp_path):
    """`--model ministral-3-8b`: the official repo, which lists both layouts, is downloaded in its Hugging Face
    layout (FP8) and loaded as it is, nothing converted."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    src, ref = pair
    asked = []

    class Info:
        siblings = [
            type("S", (), {"rfilename": n})()
            for n in ("consolidated.safetensors", "params.json", "config.json", "model.safetensors", "tekken.json")
        ]

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        asked.append((repo_id, allow_patterns))
        return str(src)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo: Info())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "ours"))
    px = pixtral_mlx.load("ministral-3-8b")
    assert [repo for repo, _ in asked] == ["mistralai/Ministral-3-8B-Instruct-2512"]
    assert "consolidated.safetensors" not in asked[0][1] and px.path == src
    assert not (tmp_path / "ours").exists()  # loaded as it is: nothing converted into our cache
    np.testing.assert_array_equal(px.logits(CASES["text"]), pixtral_mlx.load(str(ref)).logits(CASES["text"]))
