"""Unit tests of the pieces under the turn path: options, finish reasons, the streaming detokenizer,
RoPE-2D, config validation, and loading errors through the real CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import ConfigError, PixtralError, PromptError
from pixtral_mlx.models.pixtral.args import PixtralArgs, VisionArgs
from pixtral_mlx.turn import MAX_SEED, Options


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": -5}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": True}, "seed"),
    ],
)
def test_options_refuse_out_of_range_values(kwargs, param):
    with pytest.raises(PromptError) as e:
        Options(**kwargs)
    assert e.value.param == param and str(e.value).startswith(f"{param} must be ")


def test_options_accept_the_edges_and_merge():
    o = Options(max_tokens=1, temperature=0, top_p=1, seed=MAX_SEED)
    assert o.merge(temperature=None, top_p=0.5) == Options(max_tokens=1, temperature=0, top_p=0.5, seed=MAX_SEED)


class FakeDetok:
    def __init__(self):
        self.pieces = []

    def add(self, token):
        self.pieces.append(token)
        return f"<{token}>"

    def flush(self):
        return "|"


def test_finish_reasons():
    from pixtral_mlx.generate import _decode

    def run(tokens, max_tokens):
        steps = iter([(t, None) for t in tokens])
        return list(_decode(steps, FakeDetok(), 7, max_tokens, eos_id=2, tic=0.0))

    stop = run([5, 6, 2, 9], max_tokens=10)  # the end-of-sequence token ends the reply and is not shown
    assert [c.text for c in stop] == ["<5>", "<6>", "|"] and [c.token for c in stop] == [5, 6, None]
    assert [c.finish_reason for c in stop] == [None, None, "stop"]
    assert stop[-1].generation_tokens == 3 and stop[-1].prompt_tokens == 7

    length = run([5, 6, 7, 8], max_tokens=3)  # the last token is kept, on the last chunk
    assert [c.text for c in length] == ["<5>", "<6>", "<7>|"] and [c.token for c in length] == [5, 6, 7]
    assert [c.finish_reason for c in length] == [None, None, "length"]


def test_stopped_chat_turn_is_interrupted(pixtral):
    chat = pixtral.chat(temperature=0.0, max_tokens=20)
    stream = chat.stream("Count to ten.")
    first = next(stream)
    stream.close()
    assert chat.last_finish == "interrupted" and chat.messages[-1] == {"role": "assistant", "content": first.text}
    reply = pixtral.generate([{"role": "user", "content": "Count to ten."}], temperature=0.0, max_tokens=4)
    assert reply.finish_reason == "length" and len(reply.tokens) == reply.generation_tokens == 4


@pytest.mark.parametrize("text", ["🦙", "𝄞 clef", "漢字", "a🙂b"])
def test_streaming_detokenizer_waits_for_whole_characters(pixtral, text):
    tekken = pixtral.encoder.text
    tokens = tekken.encode(text, bos=False, eos=False)
    assert any(len(tekken.id_to_byte_piece(t).decode("utf-8", "ignore")) == 0 for t in tokens)  # split bytes
    detok = pixtral.encoder.detokenizer()
    pieces = [detok.add(t) for t in tokens] + [detok.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert all(p == "" or p in text for p in pieces)  # never half a character


def test_rope_2d_equals_the_direct_formula():
    """mistral-inference's `precompute_freqs_cis_2d`, written out entry by entry, for two images."""
    from pixtral_mlx.models.pixtral.vision import rope_2d

    args = VisionArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                      image_size=64, patch_size=16, rope_theta=10000.0)  # fmt: skip
    grid = [(2, 3), (3, 1)]
    cos, sin = (np.array(a) for a in rope_2d(grid, args))
    hd = args.head_dim
    freqs = [args.rope_theta ** (-2 * k / hd) for k in range(hd // 2)]
    rows = []
    for h, w in grid:
        for r in range(h):
            for c in range(w):
                # First half: the row position with the even frequencies; then the column with the odd ones.
                angles = [r * freqs[2 * k] for k in range(hd // 4)] + [c * freqs[2 * k + 1] for k in range(hd // 4)]
                rows.append(angles + angles)  # rotate-half layout: both halves rotate by the same angles
    want = np.array(rows)
    np.testing.assert_allclose(cos, np.cos(want), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(want), atol=1e-6)
    assert cos.shape == (2 * 3 + 3 * 1, hd)


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], "must hold a JSON object"),
        ({"text_config": "big"}, "text_config must be an object"),
        ({"text_config": {"hidden_size": "5120"}}, "text_config.hidden_size must be a whole number"),
        ({"text_config": {"num_key_value_heads": 5}}, "num_attention_heads must be a multiple of num_key_value_heads"),
        ({"text_config": {"rms_norm_eps": -1}}, "text_config.rms_norm_eps must be positive"),
        ({"vision_config": {"num_attention_heads": 3}}, "vision hidden_size must be divisible by num_attention_heads"),
        ({"vision_config": {"image_size": 1000}}, "vision image_size must be a multiple of patch_size"),
        ({"quantization": {"bits": 4}}, "quantization has no 'group_size'"),
        ({"quantization": {"bits": 3.5, "group_size": 64}}, "bits must be"),
        ({"quantization": {"bits": 4, "group_size": 64, "x.q_proj": {"group_size": 7}}}, "group_size must be"),
        ({"text_config": {"rope_theta": "big"}}, "rope_theta must be a number"),
        ({"image_token_index": "ten"}, "image_token_index must be a whole number"),
    ],
)
def test_config_validation(config, message):
    with pytest.raises(ConfigError, match=message):
        PixtralArgs.from_hf_config(config)


def test_params_json_validation():
    with pytest.raises(ConfigError, match="no 'dim' field"):
        PixtralArgs.from_params({"vision_encoder": {}})
    with pytest.raises(ConfigError, match="wrong type"):
        PixtralArgs.from_params({"dim": "x", "n_layers": 1, "hidden_dim": 1, "n_heads": 1, "vocab_size": 1,
                                 "vision_encoder": []})  # fmt: skip


def broken_model(mlx_dir, tmp_path, case):
    """A copy of the tiny model with one thing broken the way users' folders break."""
    bad = tmp_path / case
    shutil.copytree(mlx_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    if case == "config_list":
        (bad / "config.json").write_text("[1, 2]")
    elif case == "config_heads":
        config["vision_config"]["num_attention_heads"] = 3
        (bad / "config.json").write_text(json.dumps(config))
    elif case == "config_not_json":
        (bad / "config.json").write_text("{oops")
    elif case == "quant_no_group":
        config["quantization"] = {"bits": 4}
        (bad / "config.json").write_text(json.dumps(config))
    elif case == "tekken_not_json":
        (bad / "tekken.json").write_text("not json")
    elif case == "tekken_no_keys":
        (bad / "tekken.json").write_text("{}")
    elif case == "int_weights":
        import mlx.core as mx

        shard = next(bad.glob("model-*.safetensors"))
        weights = mx.load(str(shard))
        key = "language_model.model.norm.weight"
        if key in weights:
            weights[key] = weights[key].astype(mx.int32)
        mx.save_safetensors(str(shard), weights, metadata={"format": "mlx"})
    return bad


LOAD_ERRORS = {
    "config_list": "config.json does not describe a usable Pixtral model: the file must hold a JSON object",
    "config_heads": "vision hidden_size must be divisible by num_attention_heads",
    "config_not_json": "config.json cannot be read",
    "quant_no_group": "quantization has no 'group_size'",
    "tekken_not_json": "tekken.json is not a usable tekken tokenizer",
    "tekken_no_keys": "tekken.json is not a usable tekken tokenizer",
    "int_weights": "language_model.model.norm.weight is stored as mlx.core.int32, but it must hold floating-point",
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_broken_model_folders_give_one_sentence(case, mlx_dir, tmp_path):
    import pixtral_mlx

    bad = broken_model(mlx_dir, tmp_path, case)
    with pytest.raises(PixtralError, match=LOAD_ERRORS[case].replace("(", r"\(").replace(")", r"\)")):
        pixtral_mlx.load(str(bad))


def test_broken_model_folder_through_the_cli(mlx_dir, tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "ok.png")
    for case in ("config_list", "tekken_not_json"):
        bad = broken_model(mlx_dir, tmp_path, case)
        run = subprocess.run([sys.executable, "-m", "pixtral_mlx", "describe", str(tmp_path / "ok.png"), "--model",
                              str(bad)], capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert LOAD_ERRORS[case] in lines[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-tokens", "-1"], "--max-tokens must be a whole number of at least 1, got -1."),
        (["--temp", "-1"], "--temp must be a number of at least 0 (0 is greedy), got -1.0."),
        (["--temp", "nan"], "--temp must be a number of at least 0 (0 is greedy), got nan."),
        (["--top-p", "-1"], "--top-p must be a number greater than 0 and at most 1, got -1.0."),
        (["--seed", "-5"], "--seed must be a whole number from 0 to 18446744073709551615, got -5."),
        (["--seed", str(2**64)], "--seed must be a whole number from 0 to 18446744073709551615"),
        (["--max-edge", "8"], "--max-edge must be between 16 and 1540 pixels (a whole number), got 8."),
    ],
)
def test_numeric_flags_are_checked_before_any_work(flags, message, tmp_path):
    argv = ["describe", str(tmp_path / "none.png"), "--model", str(tmp_path / "nothing"), *flags]
    run = subprocess.run([sys.executable, "-m", "pixtral_mlx", *argv], capture_output=True, text=True, timeout=60)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), run.stderr


@pytest.mark.parametrize(
    "messages",
    [
        ["hello"],
        [{"role": "user", "content": [5]}],
        [{"role": "user", "content": 5}],
        [{"role": "assistant", "content": 5}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": [1]}, {"role": "user", "content": "hi"}],
        [{"role": "robot", "content": "hi"}],
        [],
        "hello",
    ],
)
def test_malformed_messages_give_the_library_error(pixtral, messages):
    with pytest.raises(PromptError):
        pixtral.generate(messages, max_tokens=1)


def test_new_images_are_encoded_in_groups_of_bounded_patches(pixtral, monkeypatch):
    """Small images share encoder calls up to VISION_BATCH_PATCHES; features equal one call per image."""
    import pixtral_mlx.memory as memory
    import pixtral_mlx.pipeline as pipeline

    rng = np.random.default_rng(3)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 48), (64, 16), (48, 48))]
    prompt = pixtral.encode([{"role": "user", "content": [{"type": "image", "image": p} for p in pics]}])
    sizes = [img.grid[0] * img.grid[1] for img in prompt.images]  # 6, 4, 9 patches
    monkeypatch.setattr(memory, "VISION_BATCH_PATCHES", sizes[0] + sizes[1])
    assert [len(g) for g in pipeline._vision_groups(prompt.images)] == [2, 1]
    calls = []
    encode = pixtral.model.encode_images
    fresh = pipeline.Pixtral(pixtral.model, pixtral.encoder)
    monkeypatch.setattr(pixtral.model, "encode_images", lambda imgs: calls.append(len(imgs)) or encode(imgs))
    feats = fresh.image_features(prompt.images)
    assert calls == [2, 1] and fresh.vision_runs == 3
    for img, f in zip(prompt.images, feats):
        np.testing.assert_allclose(np.array(f), np.array(encode([img.pixels])[0]), atol=1e-5)


def test_chat_rejects_unknown_options_instead_of_ignoring_them(pixtral):
    chat = pixtral.chat()
    with pytest.raises(TypeError, match="temp"):
        chat.send("Hello.", temp=0)
    with pytest.raises(PromptError, match="temperature must be"):
        chat.send("Hello.", temperature=-1)
    assert chat.messages == []  # neither attempt reached the history
