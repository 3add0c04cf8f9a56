"""The context limit: the model card's trained window, never the config's max_position_embeddings (Hugging Face
Pixtral configs carry 1,024,000 there); `context_length` lowers it, or raises it with a warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest

import pixtral_mlx
from pixtral_mlx.config import CONTEXT_LENGTH
from pixtral_mlx.errors import ConfigError, ContextError, ContextLengthWarning

LONG = "hello " * 140_000  # 140,004 tokens with the chat template


@pytest.fixture(scope="module")
def hf_like_dir(mlx_dir, tmp_path_factory):
    """The tiny MLX checkpoint with the max_position_embeddings that the real HF Pixtral configs carry."""
    out = tmp_path_factory.mktemp("ctx") / "tiny-1024000"
    shutil.copytree(mlx_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 1_024_000
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hf_like(hf_like_dir):
    return pixtral_mlx.load(str(hf_like_dir))


def test_trained_window_not_max_position_embeddings(hf_like):
    assert hf_like.args.text.max_position_embeddings == 1_024_000
    assert hf_like.trained_context_length == CONTEXT_LENGTH == 131_072
    assert hf_like.context_length == 131_072


def test_long_prompt_refused_before_any_work(hf_like, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_like, "embeddings", lambda *a, **k: calls.append(a))  # prefill would call it
    prompt = hf_like.encode([{"role": "user", "content": LONG}])
    assert len(prompt) > 131_072
    with pytest.raises(ContextError, match=r"140,004 tokens, over the model's 131,072-token context"):
        hf_like.stream(prompt, max_tokens=8)  # raised by the call itself, not by iterating
    with pytest.raises(ContextError):
        hf_like.memory_plan(prompt)
    with pytest.raises(ContextError):
        hf_like.chat().stream(LONG)
    assert calls == []


def test_lower_and_raise(hf_like_dir):
    low = pixtral_mlx.load(str(hf_like_dir), context_length=64)
    assert low.context_length == 64 and low.trained_context_length == 131_072
    with pytest.raises(ContextError, match="64-token context"):
        low.stream([{"role": "user", "content": "hello " * 70}], max_tokens=4)
    # A prompt that fits generates only up to the limit.
    prompt = low.encode([{"role": "user", "content": "hello " * 40}])
    reply = low.generate(prompt, max_tokens=100, temperature=0)
    assert reply.generation_tokens <= 64 - len(prompt)
    assert low.memory_plan(prompt, max_tokens=10).context_length == 64

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        high = pixtral_mlx.load(str(hf_like_dir), context_length=200_000)
    assert high.context_length == 200_000
    assert [w.category for w in caught] == [ContextLengthWarning]
    assert "above the 131,072 tokens this model was trained on" in str(caught[0].message)
    assert len(high.encode([{"role": "user", "content": LONG}])) < high.context_length
    high.memory_plan([{"role": "user", "content": LONG}], max_tokens=1)  # fits the raised limit: no ContextError

    for bad in (0, -5, 3, 1.5, "4096", True):
        with pytest.raises(ConfigError, match="context length must be a whole number of at least 16"):
            pixtral_mlx.load(str(hf_like_dir), context_length=bad)


def _describe(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PIXTRAL_MLX_MEMORY_LIMIT"}
    argv = [sys.executable, "-m", "pixtral_mlx", "describe", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_describe_refuses_a_140k_prompt(hf_like_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    out = _describe([str(tmp_path / "red.png"), "-m", str(hf_like_dir), "--prompt", "-"], input=LONG)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: the prompt is 140,0")
    assert "over the model's 131,072-token context" in out.stderr and "Traceback" not in out.stderr

    plan = _describe([str(tmp_path / "red.png"), "-m", str(hf_like_dir), "--dry-run", "--context-length", "4096"])
    assert plan.returncode == 0, plan.stderr
    assert "context:          4,096 tokens (trained on 131,072)" in plan.stdout

    high = _describe([str(tmp_path / "red.png"), "-m", str(hf_like_dir), "--dry-run", "--context-length", "300000"])
    assert high.returncode == 0 and "context:          300,000 tokens" in high.stdout
    assert high.stderr.startswith("warning: the context length 300,000 is above the 131,072 tokens")

    bad = _describe([str(tmp_path / "red.png"), "-m", str(hf_like_dir), "--context-length", "0"])
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --context-length must be a whole number of at least 16 tokens, got 0."


@pytest.mark.parametrize("value", ["lots", "inf", "1e400", "-3", "nan"])
def test_memory_limit_setting_checked_at_start(hf_like_dir, tmp_path, value):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    env = {**os.environ, "PIXTRAL_MLX_MEMORY_LIMIT": value}
    argv = [sys.executable, "-m", "pixtral_mlx", "describe", str(tmp_path / "a.png"), "-m", str(hf_like_dir)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "error: PIXTRAL_MLX_MEMORY_LIMIT must be a number of GB or 'off' (a positive, finite number such as 24), "
        f"got {value!r}."
    )
