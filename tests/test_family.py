"""Mistral3 checkpoints (Mistral Small 3.x, Ministral 3) in the Hugging Face layout: loaded by `pixtral_mlx.load`
and equal to transformers' `Mistral3ForConditionalGeneration` (float32, eager) and to mistral_common's encoding."""

from __future__ import annotations

import checkpoints
import family_checkpoints
import numpy as np
import pytest
from PIL import Image

import pixtral_mlx
from pixtral_mlx.models import family
from pixtral_mlx.models.mistral3.args import Mistral3Args


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def user(*parts: object) -> dict:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return {"role": "user", "content": content}


CASES = {
    "text": [
        {"role": "system", "content": "You are terse."},
        user("Hello there. What can you do for me today, in a few words, please? Tell me more about it."),
    ],
    "one_image": [user(noise(64, 48, 5), "Describe this picture in one sentence, please.")],
    # different sizes: 4x3 and 2x3 [IMG] grids (8x6 and 4x6 patches), over several turns
    "two_images": [
        user(noise(100, 60, 1), "What is this?"),
        {"role": "assistant", "content": "Some noise."},
        user(noise(40, 70, 2), "And this one? Compare both."),
    ],
}


def transformers_logits(model, prompt) -> np.ndarray:
    import torch

    kwargs = checkpoints.transformers_image_inputs(prompt)
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt.tokens]), **kwargs).logits[0].numpy(), kwargs


@pytest.fixture(scope="module", params=list(family_checkpoints.VARIANTS))
def variant(request, tmp_path_factory):
    model = family_checkpoints.hf_model(request.param)
    path = family_checkpoints.write_checkpoint(model, tmp_path_factory.mktemp("mistral3") / request.param)
    return request.param, model, path, pixtral_mlx.load(str(path))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, variant):
    name, model, _, px = variant
    prompt = px.encode(CASES[case])
    ours = px.logits(CASES[case])
    ref, _ = transformers_logits(model, prompt)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.5  # not a comparison of near-zero values
    print(f"{name} {case}: {len(prompt)} tokens, max |diff| {np.abs(ours - ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_the_family_and_decoder(variant):
    name, _, path, px = variant
    assert type(px.args) is Mistral3Args
    decoder = {"A": "llama", "B": "ministral3", "B_scaled": "ministral3"}[name]
    assert type(px.model.language_model).__module__ == f"mlx_lm.models.{decoder}"
    tied = family_checkpoints.VARIANTS[name]["tie_word_embeddings"]
    assert px.args.text.tie_word_embeddings is tied
    assert hasattr(px.model.language_model, "lm_head") is not tied
    # Ministral 3's window is YaRN's original_max_position_embeddings x factor (16 x 16 here)
    assert px.args.context_length == (512 if name == "A" else 256)


def test_tokens_and_pixels_equal_mistral_common(variant):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_mlx.prompt import to_mistral_messages

    _, _, path, px = variant
    reference = MistralTokenizer.from_file(str(path / "tekken.json"))
    for messages in CASES.values():
        ours = px.encode(messages)
        msgs, _ = to_mistral_messages(messages)
        ref = reference.encode_chat_completion(ChatCompletionRequest(messages=msgs))
        assert ours.tokens == list(ref.tokens)
        assert len(ours.images) == len(ref.images)
        for mine, theirs in zip(ours.images, ref.images):
            assert mine.pixels.dtype == np.float32 and np.array_equal(mine.pixels, theirs)


def test_image_grid_counts_merged_patches(variant):
    *_, px = variant
    prompt = px.encode(CASES["two_images"])
    # 100x60 -> 4 x 3 cells of 28 px (resized to 112x84), 40x70 -> 2 x 3 (56x84)
    assert [img.grid for img in prompt.images] == [(3, 4), (3, 2)]
    assert [img.size for img in prompt.images] == [(112, 84), (56, 84)]
    assert [img.n_tokens for img in prompt.images] == [15, 9]
    assert [img.patches for img in prompt.images] == [48, 24]
    assert prompt.tokens.count(10) == 12 + 6  # [IMG] = one per merged 2x2 block
    assert prompt.tokens.count(12) == 2 + 2 and prompt.tokens.count(13) == 2
    assert prompt.tokens[:2] == [1, 3]  # <s>[INST]: no system message here
    assert px.encode(CASES["text"]).tokens[:2] == [1, 17]  # v7: <s>[SYSTEM_PROMPT] first


def test_images_change_logits(variant):
    *_, px = variant
    a = px.logits([user(noise(64, 48, 5), "Describe.")])
    b = px.logits([user(noise(64, 48, 6), "Describe.")])
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("case", ["text", "two_images"])
def test_greedy_continuation_matches_transformers(case, variant):
    import torch

    _, model, _, px = variant
    prompt = px.encode(CASES[case])
    _, kwargs = transformers_logits(model, prompt)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt.tokens]),
            **kwargs,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=px.encoder.eos_id,
            pad_token_id=11,
        )
    ref = out[0, len(prompt) :].tolist()
    ours = px.generate(CASES[case], temperature=0, max_tokens=8).tokens
    assert ours == ref[: len(ours)] and len(ours) in (len(ref), len(ref) - 1)


# Real config.json files (FAMILY.md §1.1, §3.1, §3.2): sparse, with transformers' 4.x and 5.x rope spellings.
SMALL_31 = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "model_type": "mistral3",
    "image_token_index": 10,
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "model_type": "mistral",
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "max_position_embeddings": 131072,
        "sliding_window": None,
        "vocab_size": 131072,
    },
    "vision_config": {"model_type": "pixtral", "hidden_act": "silu", "image_size": 1540, "patch_size": 14},
}
MINISTRAL_3B = {
    "model_type": "mistral3",
    "text_config": {
        "model_type": "ministral3",
        "hidden_size": 3072,
        "num_hidden_layers": 26,
        "intermediate_size": 9216,
        "tie_word_embeddings": True,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "type": "yarn",
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 16384,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1,
        },
    },
    "vision_config": {"image_size": 1540, "patch_size": 14},
}


def test_real_configs():
    assert family(SMALL_31).__name__ == "pixtral_mlx.models.mistral3"
    assert family({"model_type": "llava"}).__name__ == "pixtral_mlx.models.pixtral"
    small = Mistral3Args.from_hf_config(SMALL_31)
    assert small.context_length == 131072 and not small.text.tie_word_embeddings
    assert (small.vision.patch_size, small.vision.image_size, small.spatial_merge_size) == (14, 1540, 2)
    assert small.text.to_mlx_lm()["model_type"] == "llama" and small.text.rope_theta == 1e9
    mini = Mistral3Args.from_hf_config(MINISTRAL_3B)
    assert mini.context_length == 262144 and mini.text.tie_word_embeddings
    mlx_lm_args = mini.text.to_mlx_lm()
    assert mlx_lm_args["model_type"] == "ministral3" and mlx_lm_args["rope_parameters"]["rope_theta"] == 1e6
    assert mlx_lm_args["rope_parameters"]["llama_4_scaling_beta"] == 0.1
    # transformers' 4.x spelling (rope_theta + rope_scaling) and a Ministral 3 config with no rope block at all
    legacy = {**MINISTRAL_3B["text_config"]}
    legacy["rope_scaling"] = dict(legacy.pop("rope_parameters"))
    legacy["rope_theta"] = legacy["rope_scaling"].pop("rope_theta")
    assert Mistral3Args.from_hf_config({**MINISTRAL_3B, "text_config": legacy}).text == mini.text
    bare = {k: v for k, v in MINISTRAL_3B["text_config"].items() if k != "rope_parameters"}
    assert Mistral3Args.from_hf_config({**MINISTRAL_3B, "text_config": bare}).text == mini.text


@pytest.mark.parametrize(
    "change, words",
    [
        ({"text_config": {"model_type": "mixtral"}}, "text_config.model_type"),
        ({"vision_feature_layer": -2}, "vision_feature_layer"),
        ({"spatial_merge_size": 0}, "spatial_merge_size"),
        ({"text_config": {"model_type": "ministral3", "rope_parameters": {"rope_type": "linear"}}}, "rope_type"),
    ],
)
def test_bad_configs_are_one_sentence(change, words):
    from pixtral_mlx.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        Mistral3Args.from_hf_config({**SMALL_31, **change})


def test_quantized_batch_prefilled_together_equals_alone(variant, tmp_path, monkeypatch):
    """4-bit on the CPU: a batch of prompts is prefilled together (`prefill_many`, its taps on the family's decoder
    layers: llama's or Ministral 3's) and every row decodes token for token what it decodes alone."""
    from pixtral_mlx import backend, generate
    from pixtral_mlx.convert import convert

    name, _, path, _ = variant
    q4 = pixtral_mlx.load(str(convert(path, tmp_path / "q4", quantize=True, bits=4, group_size=32, progress=False)))
    prompts = [CASES["text"], CASES["one_image"], CASES["two_images"]]
    alone = [q4.generate(p, max_tokens=6, temperature=0.0) for p in prompts]
    sizes = []
    real = generate.prefill_many
    monkeypatch.setattr(
        generate, "prefill_many", lambda m, jobs, *a, **k: sizes.append(len(jobs)) or real(m, jobs, *a, **k)
    )
    together = q4.generate_batch(prompts, max_tokens=6, temperature=0.0)
    assert sizes == [3]
    for a, t in zip(alone, together):
        assert len(a.tokens) == 6 and t.tokens == a.tokens, name
    if backend.on_cpu():
        from pixtral_mlx import cpu

        assert cpu.dequantizes(q4.model)
