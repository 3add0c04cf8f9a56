"""Numerical parity with transformers' LlavaForConditionalGeneration and mistral_common's encoding."""

from __future__ import annotations

import checkpoints
import numpy as np
import pytest
from PIL import Image

import pixtral_mlx
from pixtral_mlx.convert import convert
from pixtral_mlx.pipeline import Pixtral


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def user(*parts: object) -> dict:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return {"role": "user", "content": content}


# portrait, landscape, tiny, and 1000x1421 (mistral_common's round() gives 46 columns, floor 45)
MIXED = [noise(40, 70, 1), noise(90, 33, 2), noise(10, 12, 3), noise(1000, 1421, 4)]
CASES = {
    "text": [user("Hello there. What can you do?")],
    "one_image": [user(noise(64, 48, 5), "Describe.")],
    "mixed_images": [
        user(*MIXED[:2], "Compare."),
        {"role": "assistant", "content": "Two noisy images."},
        user(*MIXED[2:], "And these?"),
    ],
}


def transformers_logits(hf_model, px, messages) -> np.ndarray:
    import torch

    prompt = px.encode(messages)
    kwargs = checkpoints.transformers_image_inputs(prompt)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([prompt.tokens]), **kwargs).logits[0].numpy()


@pytest.fixture(scope="module")
def official_pixtral(official_dir, tmp_path_factory):
    out = convert(official_dir, tmp_path_factory.mktemp("off") / "mlx", dtype="float32", progress=False)
    return pixtral_mlx.load(str(out))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("source", ["hf", "official"])
def test_logits_match_transformers(case, source, hf_model, pixtral, official_pixtral):
    px = pixtral if source == "hf" else official_pixtral
    messages = CASES[case]
    ours = px.logits(messages)
    ref = transformers_logits(hf_model, px, messages)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero values
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_images_change_logits(pixtral):
    """A tokenized-but-ignored image would pass parity only by accident: different pixels, different logits."""
    a = pixtral.logits([user(noise(64, 48, 5), "Describe.")])
    b = pixtral.logits([user(noise(64, 48, 6), "Describe.")])
    assert np.abs(a[-1] - b[-1]).max() > 1e-3


def test_vision_attention_stays_within_each_image(pixtral):
    """Images encoded in one call (patches concatenated) give each the features it has alone: attention is
    block-diagonal and RoPE-2D restarts at every image, wherever it sits in the batch."""
    a, b = noise(48, 32, 7), noise(32, 64, 8)
    pa, pb = (pixtral.encode([user(x, "x")]).images[0].pixels for x in (a, b))
    alone = np.array(pixtral.model.encode_images([pa])[0])
    together = [np.array(f) for f in pixtral.model.encode_images([pb, pa, pb])]
    assert [f.shape[0] for f in together] == [4 * 2, 2 * 3, 4 * 2]
    np.testing.assert_allclose(together[1], alone, atol=1e-5)
    np.testing.assert_allclose(together[0], together[2], atol=1e-5)
    # Through the prompt path: both new images go through the encoder in one call, then are cached.
    fresh = Pixtral(pixtral.model, pixtral.encoder)
    emb = np.array(fresh.embeddings(fresh.encode([user(b, a, "x")])))
    assert fresh.vision_runs == 2
    n = 2 * 3 + 2  # image a: 2 rows x 3 cols of [IMG] + 2 break/end tokens, after <s>[INST] and image b
    start = 2 + 4 * 3
    np.testing.assert_allclose(
        emb[start : start + n][np.array(fresh.encode([user(a, "x")]).tokens[2 : 2 + n]) == 10], alone, atol=1e-5
    )


def test_features_only_on_img_positions(pixtral):
    prompt = pixtral.encode([user(noise(48, 32, 9), "Describe.")])
    emb = np.array(pixtral.embeddings(prompt))
    table = np.array(pixtral.model.language_model.model.embed_tokens.weight)
    ids = np.array(prompt.tokens)
    text = ids != 10
    np.testing.assert_array_equal(emb[text], table[ids[text]])  # [IMG_BREAK]/[IMG_END] keep text embeddings
    assert not np.allclose(emb[~text], table[10])


@pytest.fixture(scope="module")
def bf16_logits(hf_dir, tmp_path_factory):
    out = convert(hf_dir, tmp_path_factory.mktemp("bf16") / "mlx", dtype="bfloat16", progress=False)
    return pixtral_mlx.load(str(out)).logits(CASES["mixed_images"])


# Measured on this tiny model (rms |Δlogit| / std, min cosine over positions) against bf16:
# 8-bit g32 0.015 / 0.9997, 4-bit g32 0.14 / 0.962. Bounds leave ~2x headroom.
@pytest.mark.parametrize("bits,rms_bound,cos_bound", [(8, 0.04, 0.999), (4, 0.3, 0.93)])
def test_quantized_checkpoints_stay_close(bits, rms_bound, cos_bound, hf_dir, bf16_logits, tmp_path):
    import mlx.nn as nn

    out = convert(hf_dir, tmp_path / f"q{bits}", quantize=True, bits=bits, group_size=32, progress=False)
    q = pixtral_mlx.load(str(out))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in q.model.language_model.named_modules())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in q.model.vision_tower.named_modules())
    ref, got = bf16_logits, q.logits(CASES["mixed_images"])
    rms = np.sqrt(((got - ref) ** 2).mean()) / ref.std()
    cos = ((got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)).min()
    assert rms < rms_bound, rms
    assert cos > cos_bound, cos
    assert rms > 1e-4  # the weights really were quantized


def test_cpu_dequantized_prefill_equals_quantized_kernel(hf_dir, tmp_path, monkeypatch):
    """The CPU prefill path (dequantize + BLAS GEMM) computes the same function as quantized_matmul."""
    from pixtral_mlx import backend, cpu
    from pixtral_mlx.cpu import DequantizingQuantizedLinear

    out = convert(hf_dir, tmp_path / "q4", quantize=True, bits=4, group_size=32, progress=False)
    q = pixtral_mlx.load(str(out))
    layer = q.model.language_model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, DequantizingQuantizedLinear) == backend.on_cpu()
    messages = CASES["one_image"]
    assert len(q.encode(messages)) > cpu.DEQUANT_MIN_TOKENS
    fast = q.logits(messages)
    monkeypatch.setattr(cpu, "DEQUANT_MIN_TOKENS", 10**9)
    kernel = q.logits(messages)
    np.testing.assert_allclose(fast, kernel, atol=1e-4 * np.abs(kernel).max())
