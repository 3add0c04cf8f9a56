"""The CPU prefill and vision paths (`pixtral_mlx/cpu.py`) compute what the plain MLX calls compute.

Each changed path is checked against the one it replaced: `blocked_attention` against one
`mx.fast.scaled_dot_product_attention` call (causal with a cache before the queries, bidirectional, GQA),
the per-stream dequantization against one dequantization, and a tiny 4-bit checkpoint end to end (logits of
an image and a text prompt, a chunked prefill, greedy tokens) with the new paths against the old ones. The
blocks are made tiny so that the tiny prompts cross several of them.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

import pixtral_mlx
from pixtral_mlx import backend, cpu, cpu_kernel
from pixtral_mlx.convert import convert
from pixtral_mlx.models.pixtral.vision import Attention

pytestmark = pytest.mark.skipif(not backend.on_cpu(), reason="the CPU backend's classes")


def _qkv(n_q: int, n_k: int, heads: int, kv_heads: int, seed: int) -> tuple[mx.array, mx.array, mx.array]:
    mx.random.seed(seed)
    q = mx.random.normal((1, heads, n_q, 16))
    k = mx.random.normal((1, kv_heads, n_k, 16))
    v = mx.random.normal((1, kv_heads, n_k, 16))
    return q, k, v


@pytest.mark.parametrize(
    "n_q,n_k,heads,kv_heads,causal",
    [(37, 37, 4, 2, True), (37, 100, 4, 2, True), (50, 50, 2, 2, False), (9, 9, 4, 1, True), (40, 40, 3, 3, False)],
)
@pytest.mark.parametrize("streams", [True, False])
def test_blocked_attention_equals_one_call(n_q, n_k, heads, kv_heads, causal, streams, monkeypatch):
    monkeypatch.setattr(cpu, "ATTENTION_BLOCK", 8)
    if not streams:
        monkeypatch.setattr(cpu, "cpu_streams", lambda: [])
    q, k, v = _qkv(n_q, n_k, heads, kv_heads, seed=n_q + n_k)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal" if causal else None)
    out = cpu.blocked_attention(q, k, v, 0.25, causal=causal)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-5, rtol=1e-5)
    if causal and n_k == n_q:  # the first query sees only the first key: its output is that value
        first = mx.repeat(v, heads // kv_heads, axis=1)[0, :, 0]
        np.testing.assert_allclose(np.array(out[0, :, 0]), np.array(first), atol=1e-6)


def test_dequantized_blocks_equal_one_dequantization(monkeypatch):
    """Row blocks dequantized on the CPU streams, one GEMM each: the values of one dequantization + GEMM (with the
    4-bit product from the codes off: test_gemm.py has it)."""
    import mlx.nn as nn

    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")

    mx.random.seed(3)
    layer = nn.Linear(128, 96, bias=True)
    layer.weight = mx.random.normal((96, 128)) * 0.05
    q = nn.QuantizedLinear.from_linear(layer, group_size=32, bits=4)
    q.scales, q.biases = q.scales.astype(mx.bfloat16), q.biases.astype(mx.bfloat16)  # as prepare keeps them
    q.__class__ = cpu.DequantizingQuantizedLinear
    x = mx.random.normal((1, 40, 128))
    w = mx.dequantize(q.weight, q.scales.astype(mx.float32), q.biases.astype(mx.float32), group_size=32, bits=4)
    ref = x @ w.T + q.bias
    np.testing.assert_allclose(np.array(q(x)), np.array(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.array(q._dequantized(10, 50)), np.array(w[10:50]))


# ---------------------------------------------------------------------------------------------
# End to end on a tiny 4-bit checkpoint: the new paths against the old ones.


def old_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU classes as they were: one dequantization, one attention call (mlx-lm's; vision: per image), MLX's
    SwiGLU and GELU."""
    monkeypatch.setattr(cpu, "PROMPT_ATTENTION_MIN", 10**9)
    monkeypatch.setattr(cpu.cpu_kernel, "gelu", lambda x: None)
    monkeypatch.setattr(cpu, "SWIGLU_KERNEL_MIN_ROWS", 10**9)
    monkeypatch.setattr(cpu.StreamSplitAttention, "_attend", Attention._attend)
    monkeypatch.setattr(
        cpu.DequantizingQuantizedLinear, "_many_tokens", lambda self, x, streams: x @ self._dequantized().T
    )


def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new paths with blocks small enough for a tiny prompt to cross several."""
    monkeypatch.setattr(cpu, "ATTENTION_BLOCK", 8)
    monkeypatch.setattr(cpu, "PROMPT_ATTENTION_MIN", 2)


@pytest.fixture(scope="module")
def q4(hf_dir, tmp_path_factory):
    out = convert(hf_dir, tmp_path_factory.mktemp("q4") / "q4", quantize=True, bits=4, group_size=32, progress=False)
    return pixtral_mlx.load(str(out))


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


MESSAGES = {
    "image": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": noise(96, 64, 1)},
                {"type": "image", "image": noise(48, 80, 2)},
                {"type": "text", "text": "Describe both."},
            ],
        }
    ],
    "text": [{"role": "user", "content": "Tell me about the river, the stone and the quiet market at dawn. " * 3}],
}


@pytest.mark.parametrize("case", list(MESSAGES))
def test_logits_and_greedy_tokens_equal_the_old_paths(case, q4, monkeypatch):
    messages = MESSAGES[case]
    assert len(q4.encode(messages)) > 3 * 8  # crosses several attention blocks
    layer = q4.model.language_model.model.layers[0]
    assert isinstance(layer.self_attn, cpu.BlockedPromptAttention)
    assert isinstance(layer.mlp.gate_proj, cpu.DequantizingQuantizedLinear)
    assert isinstance(layer.mlp, cpu.KernelMLP)
    assert isinstance(q4.model.multi_modal_projector.gelu, cpu.KernelGELU)
    with monkeypatch.context() as m:
        small_blocks(m)
        new_logits = q4.logits(messages)
        new_tokens = q4.generate(messages, max_tokens=10, temperature=0.0).tokens
    with monkeypatch.context() as m:
        old_paths(m)
        old_logits = q4.logits(messages)
        old_tokens = q4.generate(messages, max_tokens=10, temperature=0.0).tokens
    assert np.abs(old_logits).max() > 0.1
    np.testing.assert_allclose(new_logits, old_logits, atol=1e-4 * np.abs(old_logits).max(), rtol=0)
    assert len(new_tokens) == 10 and new_tokens == old_tokens


def test_vision_features_equal_the_old_path(q4, monkeypatch):
    """Two images in one encoder call: per-image blocked attention gives the old per-image features."""
    prompt = q4.encode(MESSAGES["image"])
    images = [img.pixels for img in prompt.images]
    with monkeypatch.context() as m:
        small_blocks(m)
        new = [np.array(f) for f in q4.model.encode_images(images)]
    with monkeypatch.context() as m:
        old_paths(m)
        old = [np.array(f) for f in q4.model.encode_images(images)]
    assert [f.shape for f in new] == [f.shape for f in old] and len(new) == 2
    for a, b in zip(new, old):
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_chunked_prefill_equals_one_chunk(q4, monkeypatch):
    """A prompt prefilled in chunks (keys of the cache before each chunk's queries) gives the next-token logits
    of the old one-chunk path."""
    from pixtral_mlx.generate import prefill

    prompt = q4.encode(MESSAGES["image"])
    emb = q4.embeddings(prompt)

    def last_logits(step: int) -> np.ndarray:
        cache = q4.model.make_cache()
        prefill(q4.model, prompt.tokens, emb, cache, prefill_step=step)
        out = q4.model(mx.array(prompt.tokens[-1:])[None], cache=cache, input_embeddings=emb[None, -1:])
        return np.array(out[0, -1])

    with monkeypatch.context() as m:
        small_blocks(m)
        chunked = last_logits(13)
    with monkeypatch.context() as m:
        old_paths(m)
        whole = last_logits(10**6)
    np.testing.assert_allclose(chunked, whole, atol=1e-4 * np.abs(whole).max(), rtol=0)
    assert int(chunked.argmax()) == int(whole.argmax())


def fused_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """The one MLX call `decode_attention` replaced."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("n_k", [1, 37, 300])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("streams", [True, False])
def test_decode_attention_equals_one_call(n_k, heads, kv_heads, streams, monkeypatch):
    if not streams:
        monkeypatch.setattr(cpu, "cpu_streams", lambda: [])
    q, k, v = _qkv(1, n_k, heads, kv_heads, seed=n_k + heads)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(np.array(cpu.decode_attention(q, k, v, 0.3)), np.array(ref), atol=2e-6, rtol=1e-5)


def test_decode_steps_go_through_decode_attention_and_keep_the_tokens(q4, monkeypatch):
    """Greedy decode through `decode_attention` picks the tokens of mlx-lm's attention call."""
    messages = MESSAGES["text"]
    calls = []
    grouped = cpu.decode_attention
    with monkeypatch.context() as m:
        m.setattr(cpu, "decode_attention", lambda *a: calls.append(1) or grouped(*a))
        new = q4.generate(messages, max_tokens=12, temperature=0.0).tokens
    assert len(calls) >= 11 * len(q4.model.language_model.model.layers)  # every step after the first, every layer
    with monkeypatch.context() as m:
        m.setattr(
            cpu, "decode_attention", lambda q, k, v, scale: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        )
        old = q4.generate(messages, max_tokens=12, temperature=0.0).tokens
    assert len(new) == 12 and new == old


@pytest.mark.parametrize("variant", ["A", "B"])
def test_mistral3_decoders_take_the_cpu_attention_and_keep_their_outputs(variant, tmp_path, monkeypatch):
    """Mistral Small's llama attention and Ministral 3's (YaRN, llama-4 query scaling) both go through
    `cpu.attention` (blocked prompt chunks, grouped decode): the same logits and greedy tokens as mlx-lm's call."""
    import family_checkpoints

    path = family_checkpoints.write_checkpoint(family_checkpoints.hf_model(variant), tmp_path / variant)
    model = pixtral_mlx.load(str(path))
    attn = model.model.language_model.model.layers[0].self_attn
    assert isinstance(attn, cpu.BLOCKED_DECODER_ATTENTION)
    assert isinstance(attn, cpu.BlockedMinistral3Attention) == (variant == "B")
    messages = MESSAGES["text"]
    calls = []
    blocked, grouped = cpu.blocked_attention, cpu.decode_attention
    with monkeypatch.context() as m:
        small_blocks(m)
        m.setattr(cpu, "blocked_attention", lambda *a, **k: calls.append("blocked") or blocked(*a, **k))
        m.setattr(cpu, "decode_attention", lambda *a: calls.append("decode") or grouped(*a))
        new_logits = model.logits(messages)
        new_tokens = model.generate(messages, max_tokens=8, temperature=0.0).tokens
    assert {"blocked", "decode"} <= set(calls)
    layers = model.model.language_model.model.layers
    original = type(attn).__mro__[1]  # mlx-lm's own class, as loaded before the CPU swap
    for layer in layers:
        layer.self_attn.__class__ = original
    old_logits = model.logits(messages)
    old_tokens = model.generate(messages, max_tokens=8, temperature=0.0).tokens
    assert type(layers[0].self_attn).__module__.startswith("mlx_lm.")
    assert np.abs(old_logits).max() > 0.1
    np.testing.assert_allclose(new_logits, old_logits, atol=1e-4 * np.abs(old_logits).max(), rtol=0)
    assert len(new_tokens) == 8 and new_tokens == old_tokens


@pytest.mark.parametrize("kernel", ["codes", True, False])
def test_prefill_many_equals_prefill_bit_for_bit(q4, kernel, monkeypatch):
    """Several prompts prefilled layer by layer (`prefill_many`: one dequantization per weight for all of them) fill
    the caches `prefill` fills one prompt at a time, to the bit: an image prompt, a text prompt in chunks, and a
    prompt too short to dequantize; with the extension's dequantization and with MLX's per-stream one; and with the
    4-bit products from the codes, which dequantize nothing."""
    from pixtral_mlx.generate import prefill, prefill_many

    codes = kernel == "codes"
    if codes and not cpu_kernel.gemm_isa():
        pytest.skip("no product from the codes on this machine")
    if not codes:
        monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    if not kernel:
        monkeypatch.setattr(cpu_kernel, "dequantize", lambda *a, **k: None)
    short = [{"role": "user", "content": "Hi"}]
    prompts = [q4.encode(MESSAGES["image"]), q4.encode(MESSAGES["text"]), q4.encode(short)]
    embs = [q4.embeddings(p) for p in prompts]
    assert len(prompts[1]) > 2 * 20 and len(prompts[2]) < cpu.DEQUANT_MIN_TOKENS
    made = []  # one entry per dequantization made (not taken from the shared ones)
    real = cpu.DequantizingQuantizedLinear._weight_blocks

    def spy(self, streams):
        if cpu._shared is None or id(self) not in cpu._shared:
            made.append(id(self))
        return real(self, streams)

    monkeypatch.setattr(cpu.DequantizingQuantizedLinear, "_weight_blocks", spy)
    alone = []
    for p, e in zip(prompts, embs):
        cache = q4.model.make_cache()
        prefill(q4.model, p.tokens, e, cache, prefill_step=20)
        alone.append(cache)
    per_prompt = len(made)
    made.clear()
    jobs = [(p.tokens, e, q4.model.make_cache()) for p, e in zip(prompts, embs)]
    prefill_many(q4.model, jobs, prefill_step=20)
    weights = [id(m) for _, m in q4.model.named_modules() if isinstance(m, cpu.DequantizingQuantizedLinear)]
    layers = q4.model.language_model.model.layers
    if codes:
        assert made == [] and per_prompt == 0  # nothing dequantized
    else:
        assert sorted(set(made)) == sorted(made) and len(made) > 0  # each weight dequantized once
        assert set(made) <= set(weights) and per_prompt >= 4 * len(made)  # image prompt once, text prompt 3 chunks
        assert len(made) == len(weights)  # every layer's and lm_head's (in the graph, never evaluated, as `prefill`)
    assert all("generate" not in type(layer).__module__ for layer in layers)  # the taps are gone
    for one, (_, _, many) in zip(alone, jobs):
        for a, b in zip(one, many):
            assert a.offset == b.offset > 0
            for x, y in zip(a.state, b.state):
                assert mx.array_equal(x, y).item()


@pytest.mark.parametrize("codes", [True, False])
def test_batch_plan_counts_the_shared_layer_and_holds_the_measured_peak(q4, codes, monkeypatch):
    """The memory plan of a batch prefilled together holds one whole layer's float32 weights (none where the 4-bit
    products run from the codes) and every row's hidden states, and the peak of `generate_batch` stays under it."""
    from pixtral_mlx.memory import batch_bytes, estimate

    if not codes:
        monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    layer = q4.model.language_model.model.layers[0]
    elements = sum(m.weight.size * 32 // m.bits for _, m in layer.named_modules() if isinstance(m, nn.QuantizedLinear))
    dequantized = 0 if cpu_kernel.gemm_isa() else 4 * elements
    assert codes or dequantized > 0
    prompts = [q4.encode(MESSAGES["image"]), q4.encode(MESSAGES["text"]), q4.encode(MESSAGES["text"][:1])]
    plans = [estimate(q4, p, keep=0, max_tokens=6, kv_bits=None, kv_group_size=64) for p in prompts]
    assert all(p.layer_dequant == dequantized for p in plans)
    assert batch_bytes(plans, 0) >= batch_bytes(plans[:1], 0) + dequantized + sum(p.batch_hidden for p in plans[1:])
    q4.features.clear()
    mx.clear_cache()
    other = mx.get_active_memory() - plans[0].weights
    mx.reset_peak_memory()
    q4.generate_batch(prompts, max_tokens=6, temperature=0.0)
    measured = mx.get_peak_memory() - other
    assert measured <= batch_bytes(plans, 0), (measured, batch_bytes(plans, 0))


def test_server_rows_joining_together_are_prefilled_together_and_equal_alone(q4, monkeypatch):
    """The continuous batcher admits rows that arrive at the same step with one `prefill_many` (the engine does the
    same with the requests it finds waiting): each row decodes token for token what its turn decodes alone."""
    from pixtral_mlx import batching
    from pixtral_mlx.turn import Options, Reply

    greedy = Options(temperature=0.0, max_tokens=8)
    messages = [MESSAGES["image"], MESSAGES["text"], [{"role": "user", "content": "Count: one, two, three"}]]
    alone = [q4.generate(m, greedy) for m in messages]
    sizes = []
    real = batching.prefill_many
    monkeypatch.setattr(
        batching, "prefill_many", lambda model, jobs, **kw: sizes.append(len(jobs)) or real(model, jobs, **kw)
    )
    turns = [(0, q4.plan_turn(q4.encode(m), q4.new_cache(), greedy)) for m in messages]
    got = [Reply() for _ in messages]
    for i, chunk in batching.run(q4, turns):
        got[i].add(chunk)
    assert sizes == [3]
    for a, g in zip(alone, got):
        assert len(a.tokens) == 8 and (g.tokens, g.text, g.finish_reason) == (a.tokens, a.text, a.finish_reason)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_decode_goes_through_the_kernel_and_keeps_the_tokens(q4, bits, monkeypatch):
    """Greedy decode with an 8-bit and a 4-bit KV cache: every step after the first through the extension's
    `quantized_decode_attention`, the tokens of mlx-lm's quantized attention."""
    messages = MESSAGES["text"]
    calls = []
    real = cpu_kernel.quantized_decode_attention
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "quantized_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        new = q4.generate(messages, max_tokens=12, temperature=0.0, kv_bits=bits, kv_group_size=32)
    assert len(calls) >= 11 * len(q4.model.language_model.model.layers)
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "quantized_decode_attention", lambda *a, **k: None)
        old = q4.generate(messages, max_tokens=12, temperature=0.0, kv_bits=bits, kv_group_size=32)
    assert len(new.tokens) == 12 and new.tokens == old.tokens


def test_reusing_buffers_raises_the_cache_limit_and_puts_it_back():
    """`cpu.reusing_buffers`: the largest limit of the blocks open, the old one back (and the cache cleared) when
    the last closes; a limit of 0 changes nothing."""
    old = mx.set_cache_limit(12_345_678)
    try:
        with cpu.reusing_buffers(0):
            assert mx.set_cache_limit(12_345_678) == 12_345_678
        with cpu.reusing_buffers(50 << 20):
            assert mx.set_cache_limit(50 << 20) == 50 << 20
            with cpu.reusing_buffers(100 << 20):
                assert mx.set_cache_limit(100 << 20) == 100 << 20
                with cpu.reusing_buffers(10 << 20):  # a smaller one keeps the larger
                    assert mx.set_cache_limit(100 << 20) == 100 << 20
            assert mx.set_cache_limit(100 << 20) == 100 << 20  # the outer block is still open
            mx.eval(mx.zeros((1 << 20,)) + 1)  # a freed 4 MB buffer stays in the cache
            assert mx.get_cache_memory() > 0
        assert mx.set_cache_limit(12_345_678) == 12_345_678
        assert mx.get_cache_memory() == 0
    finally:
        mx.set_cache_limit(old)


def test_prefill_keeps_freed_buffers_for_the_next_layer(q4, monkeypatch):
    """While a prompt is fed on the CPU (`prefill`, `prefill_many`), MLX keeps twice the largest dequantized weight
    of freed buffers, so each layer's dequantized weights reuse the previous layer's buffers; the limit comes back
    afterwards, and the caches hold the values they hold without it, to the bit. (The dequantizing path: with the
    4-bit products from the codes nothing is dequantized and the limit is left alone.)"""
    from pixtral_mlx import generate

    if cpu_kernel.gemm_isa():
        assert cpu.dequantized_bytes(q4.model.layers[0]) == 0
    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")

    sizes = [
        m.weight.size * 32 // m.bits for _, m in q4.model.layers[0].named_modules() if isinstance(m, nn.QuantizedLinear)
    ]
    assert cpu.dequantized_bytes(q4.model.layers[0]) == 4 * max(sizes) > 0
    prompts = [q4.encode(MESSAGES["text"]), q4.encode(MESSAGES["image"])]
    jobs = [(p.tokens, q4.embeddings(p)) for p in prompts]

    def fill(many: bool) -> list[list]:
        caches = [q4.model.make_cache() for _ in jobs]
        if many:
            generate.prefill_many(q4.model, [(t, e, c) for (t, e), c in zip(jobs, caches)], prefill_step=20)
        else:
            for (t, e), c in zip(jobs, caches):
                generate.prefill(q4.model, t, e, c, prefill_step=20)
        return caches

    real = mx.set_cache_limit
    for many in (False, True):
        limits: list[int] = []
        monkeypatch.setattr(mx, "set_cache_limit", lambda n, seen=limits: seen.append(n) or real(n))
        old = real(7_654_321)
        try:
            reused = fill(many)
            assert limits == [2 * cpu.dequantized_bytes(q4.model.layers[0]), 7_654_321] * (1 if many else len(jobs))
            assert real(old) == 7_654_321
        finally:
            real(old)
        monkeypatch.setattr(generate, "_reusing_buffers", lambda model: nullcontext())
        plain = fill(many)
        monkeypatch.undo()
        monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")  # (undone with the rest)
        for one, other in zip(reused, plain):
            for a, b in zip(one, other):
                assert a.offset == b.offset > 0
                assert all(mx.array_equal(x, y).item() for x, y in zip(a.state, b.state))
