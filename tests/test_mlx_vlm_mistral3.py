"""mlx-community's Mistral3 repos are converted by mlx-vlm (`python -m mlx_vlm.convert`): its output, bf16 or 4-bit,
loads with `pixtral_mlx.load` and gives our logits for the same source folder."""

from __future__ import annotations

import json

import family_checkpoints
import numpy as np
import pytest
from test_family import CASES

import pixtral_mlx
from pixtral_mlx.convert import convert

mlx_vlm_convert = pytest.importorskip("mlx_vlm.convert")


@pytest.fixture(scope="module", params=["A", "B"])
def source(request, tmp_path_factory):
    """A tiny bf16 HF Mistral3 folder (A: Mistral Small, untied; B: Ministral 3, YaRN, tied; bf16 as on the Hub, so
    both converters quantize the same values) and our model of it."""
    import torch

    root = tmp_path_factory.mktemp("mlx-vlm") / request.param
    model = family_checkpoints.hf_model(request.param, seed=7).to(torch.bfloat16)
    hf = family_checkpoints.write_checkpoint(model, root / "hf")
    return root, hf, pixtral_mlx.load(str(hf))


def mlx_vlm(hf, out, **kwargs):
    mlx_vlm_convert.convert(str(hf), str(out), **kwargs)
    return out


def test_mlx_vlm_bf16_loads_with_our_logits(source):
    root, hf, ours = source
    out = mlx_vlm(hf, root / "vlm-bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral3"
    theirs = pixtral_mlx.load(str(out))
    for case in ("text", "two_images"):
        ref = ours.logits(CASES[case])
        assert np.abs(ref).max() > 0.5
        np.testing.assert_allclose(theirs.logits(CASES[case]), ref, atol=1e-4, rtol=0)


def tensors(folder) -> dict:
    import mlx.core as mx

    out: dict = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def test_mlx_vlm_4bit_equals_our_4bit(source):
    """mlx-vlm quantizes as we do (affine, same groups: the same bytes), except that it keeps the lm_head in bf16
    (its mistral3 quant predicate); with that one difference put back, the logits are ours exactly."""
    import mlx.core as mx

    root, hf, _ = source
    out = mlx_vlm(hf, root / "vlm-q4", dtype="bfloat16", quantize=True, q_bits=4, q_group_size=32)
    theirs = pixtral_mlx.load(str(out))
    assert theirs.args.quantization["bits"] == 4 and theirs.args.quantization["group_size"] == 32
    q = theirs.model.language_model.model.layers[0].self_attn.q_proj
    assert type(q).__name__.endswith("QuantizedLinear")
    ours_q4 = convert(hf, root / "ours-q4", quantize=True, group_size=32, progress=False)
    ours_bf16 = convert(hf, root / "ours-bf16", progress=False)
    got, q4, bf16 = tensors(out), tensors(ours_q4), tensors(ours_bf16)
    head = "language_model.lm_head."
    tied = family_checkpoints.VARIANTS[root.name]["tie_word_embeddings"]
    assert {k for k in got if k.startswith(head)} == (set() if tied else {head + "weight"})  # bf16, not packed
    for k, v in got.items():
        ref = bf16[k] if k.startswith(head) else q4[k]
        assert v.dtype == ref.dtype and mx.array_equal(v, ref).item(), k
    assert set(got) == {k for k in q4 if not k.startswith(head)} | {k for k in got if k.startswith(head)}
    # our 4-bit folder with their dense lm_head: the same model, loaded from our files
    hybrid = root / "hybrid"
    hybrid.mkdir()
    (hybrid / "config.json").write_text((ours_q4 / "config.json").read_text())
    (hybrid / "tekken.json").write_text((ours_q4 / "tekken.json").read_text())
    weights = {k: v for k, v in q4.items() if not k.startswith(head)} | {k: bf16[k] for k in got if k.startswith(head)}
    mx.save_safetensors(str(hybrid / "model.safetensors"), weights, metadata={"format": "mlx"})
    ours = pixtral_mlx.load(str(hybrid))
    for case in ("text", "two_images"):
        np.testing.assert_array_equal(theirs.logits(CASES[case]), ours.logits(CASES[case]))
