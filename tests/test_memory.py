"""The memory plan: its terms, its estimate against the measured peak, refusal before any work, `--dry-run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import MemoryPlanError
from pixtral_mlx.memory import LIMIT_ENV, kv_bytes_per_token, largest_chunk, prefill_step


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*items):
    content = [
        {"type": "image", "image": i} if isinstance(i, Image.Image) else {"type": "text", "text": i} for i in items
    ]
    return [{"role": "user", "content": content}]


def test_kv_bytes_per_token_at_pixtral_widths():
    """Pixtral-12B: 40 layers, 8 KV heads of 128; bf16 is the issue's 160 KB per token."""
    assert kv_bytes_per_token(40, 8, 128, 2, None) == 40 * 8 * 128 * 2 * 2 == 163_840
    assert kv_bytes_per_token(40, 8, 128, 2, 8, 64) == 2 * 40 * 8 * 128 * (1 + 4 / 64) == 87_040
    assert kv_bytes_per_token(40, 8, 128, 2, 4, 64) == 2 * 40 * 8 * 128 * (0.5 + 4 / 64) == 46_080
    assert kv_bytes_per_token(40, 8, 128, 4, None) == 327_680  # float32 on the CPU backend


def test_prefill_chunks():
    assert largest_chunk(5000, 0, 2048) == (2048, 4096)  # 2048 x 4096 > 903 x 4999
    assert largest_chunk(3000, 0, 2048) == (2048, 2048)  # 2048 x 2048 > 951 x 2999
    assert largest_chunk(4000, 0, 2048) == (1951, 3999)  # the last, partial chunk sees more keys
    assert largest_chunk(3000, 10_000, 2048) == (2048, 12_048)  # behind a long cached prefix
    assert largest_chunk(1, 50, 2048) == (1, 51)
    assert prefill_step(32, 131_072, 2, materialized=False) == 2048  # Metal's fused attention
    assert prefill_step(32, 131_072, 4, materialized=True) == 64  # 1 GiB of scores at most
    assert prefill_step(4, 3000, 4, materialized=True) == 2048


CASES = {
    "long text": (user("hello " * 3000), None),
    "1024 px image": (user(noise(1024, 1024, 1), "Describe."), None),
    "two images, kv 8": (user(noise(512, 300, 2), noise(300, 700, 3), "Compare."), 8),
}


@pytest.mark.parametrize("case", CASES)
def test_estimate_within_25_percent_of_measured_peak(pixtral, case):
    """Measured on CPU: the estimate is within 4% of the peak in each case."""
    import mlx.core as mx

    messages, bits = CASES[case]
    pixtral.features.clear()  # the vision encoder runs for these images
    mx.clear_cache()
    prompt = pixtral.encode(messages)
    kv = {"kv_bits": bits, "kv_group_size": 32}
    plan = pixtral.memory_plan(prompt, max_tokens=8, **kv)
    # Arrays other tests left alive are not this turn's: measure against the model's own resident bytes.
    other = mx.get_active_memory() - plan.weights
    pixtral.generate(prompt, max_tokens=8, temperature=0.0, **kv)
    measured = mx.get_peak_memory() - other
    assert abs(plan.total - measured) <= 0.25 * measured, (plan.total, measured)
    work = max(plan.vision, plan.prefill)
    from pixtral_mlx.cpu import fused_attention

    t = pixtral.args.text
    if bits is None and fused_attention(t.head_dim, pixtral.model.language_model.model.norm.weight.dtype):
        # The extension's fused attention holds no scores: the transient terms are the activations.
        assert work > 0.1 * plan.total
    else:
        assert work > 0.3 * plan.total  # the transient terms matter here: the test checks them, not just the weights


def test_over_limit_is_refused_before_any_work(pixtral, monkeypatch):
    chat = pixtral.chat(temperature=0.0, max_tokens=6)
    chat.send(user(noise(64, 48, 5), "Hi.")[0]["content"])
    messages, tokens, runs = list(chat.messages), list(chat.cache.tokens), pixtral.vision_runs
    big = [{"type": "image", "image": noise(1024, 1024, 6)}, {"type": "text", "text": "And this?"}]
    plan = chat.memory_plan(big)
    monkeypatch.setenv(LIMIT_ENV, str((plan.total - 1_000_000) / 1e9))
    with pytest.raises(MemoryPlanError) as e:
        chat.send(big)
    message = str(e.value)
    assert message.startswith("this turn would need about 0.") and message.endswith("start a new conversation.")
    assert "(max_edge=512)" in message and message.count(".") >= 2  # the library names its parameters
    from pixtral_mlx.cli import flag_message

    assert "(--max-edge 512)" in flag_message(e.value) and "max_edge" not in flag_message(e.value)  # the CLI, flags
    assert chat.messages == messages and chat.cache.tokens == tokens and pixtral.vision_runs == runs
    # A smaller image fits, and the refused turn left nothing behind.
    reply = chat.send([{"type": "image", "image": noise(128, 96, 6)}, {"type": "text", "text": "And this?"}])
    fresh = pixtral.generate(chat.messages[:-1], temperature=0.0, max_tokens=6)
    assert reply.tokens == fresh.tokens


def test_refusal_suggests_a_kv_bits_that_fits(pixtral, monkeypatch):
    messages = user("word " * 2000)
    plan = pixtral.memory_plan(messages, max_tokens=100_000)
    plan8 = pixtral.memory_plan(messages, max_tokens=100_000, kv_bits=8, kv_group_size=32)
    assert plan8.kv < plan.kv
    monkeypatch.setenv(LIMIT_ENV, str((plan8.total + plan.total) / 2 / 1e9))
    chat = pixtral.chat(max_tokens=100_000, kv_group_size=32)
    with pytest.raises(MemoryPlanError, match=r"an 8-bit KV cache would fit \(kv_bits=8\)"):
        chat.send(messages[0]["content"])
    assert chat.messages == []
    monkeypatch.setenv(LIMIT_ENV, "off")
    assert pixtral.memory_plan(messages, max_tokens=100_000).fits


def test_machine_limit_on_cpu(pixtral, monkeypatch):
    import mlx.core as mx

    from pixtral_mlx.memory import _mem_available, machine_limit

    monkeypatch.delenv(LIMIT_ENV, raising=False)
    limit, source = machine_limit()
    assert source == "the available RAM" and limit >= _mem_available() * 0.5 and limit >= mx.get_active_memory()
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(MemoryPlanError, match=f"{LIMIT_ENV} must be a number of GB or 'off'"):
        machine_limit()


def test_dry_run_prints_the_plan(mlx_dir, tmp_path):
    noise(200, 120, 7).save(tmp_path / "a.png")
    noise(64, 64, 8).save(tmp_path / "b.png")
    argv = [sys.executable, "-m", "pixtral_mlx", "describe", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    argv += ["-m", str(mlx_dir), "--dry-run", "--max-tokens", "100"]
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    # 4 KiB pages: the device line counts the MB moved to 2 MiB pages, which differs between the two runs
    env["PIXTRAL_MLX_HUGE_PAGES"] = "off"
    ok = subprocess.run(argv + ["--json"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    # rows x (cols + one [IMG_BREAK]/[IMG_END]): 200x120 is 13x8 patches, 64x64 is 4x4
    assert plan["image_tokens"] == [[str(tmp_path / "a.png"), 8 * 14], [str(tmp_path / "b.png"), 4 * 5]]
    assert plan["total_tokens"] == plan["prompt_tokens"] + 100 and plan["fits"] is True
    assert plan["total"] == plan["weights"] + plan["kv"] + plan["features"] + max(plan["vision"], plan["prefill"])
    over = subprocess.run(argv, capture_output=True, text=True, env={**env, LIMIT_ENV: "0.001"}, timeout=300)
    assert over.returncode == 1
    assert f"image 1 ({tmp_path / 'a.png'}): 112 tokens" in over.stdout and "does NOT fit" in over.stdout
    # the device line names the BLAS and the decode kernel in use, as the JSON's `device` does
    device = over.stdout.splitlines()[-1]
    assert device == f"device: {plan['device']}" and "BLAS" in device and "decode:" in device
    from pixtral_mlx import cpu_kernel  # the tiny checkpoint is float32: its decode takes the float-weight matvec

    assert ("float-weight matvec, float32 weights" in device) == cpu_kernel.dense_available()
    assert over.stderr.startswith("error: this turn would need about") and over.stderr.count("\n") == 1
