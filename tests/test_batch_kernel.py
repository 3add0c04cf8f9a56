"""Batched decode through the CPU kernel picks the same tokens as decoding one prompt at a time.

The kernel (pixtral_mlx._qmv) computes every row of a batch with exactly the operations it uses for that
row alone, so a batch of greedy decodes must equal the one-by-one decodes token for token. These run a
tiny random 4-bit checkpoint (built in the test) through `generate_batch` (mlx-lm's left-padded
`BatchKVCache`, all rows in one matvec per layer) and through `generate`, one prompt at a time.
"""

from __future__ import annotations

import platform

import mlx.core as mx
import pytest

from pixtral_mlx import cpu_kernel

PROMPTS = [
    "Tell me about the sea and the river.",
    "Hi",
    "Write three words about mountains, then stop, please, and say why.",
    "What is two plus two?",
    "Name a colour.",
]


@pytest.fixture(scope="module")
def q4(hf_dir, tmp_path_factory):
    if cpu_kernel.extension() is None:
        if platform.system() == "Linux":
            pytest.fail(f"the qmv extension must be built on Linux: {cpu_kernel.reason()}")
        pytest.skip("no qmv extension here")
    import pixtral_mlx
    from pixtral_mlx.convert import convert

    out = tmp_path_factory.mktemp("q4batch") / "tiny-q4"
    return pixtral_mlx.load(str(convert(hf_dir, out, quantize=True, bits=4, group_size=32, progress=False)))


@pytest.fixture
def rows_seen(monkeypatch):
    """The rows of x of every kernel call."""
    monkeypatch.delenv("PIXTRAL_MLX_QMV", raising=False)
    seen: list[int] = []
    real = cpu_kernel.quantized_matvec

    def spy(x, *args, **kwargs):
        seen.append(x.size // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "quantized_matvec", spy)
    return seen


@pytest.mark.parametrize("size", [2, 5])
def test_batched_greedy_equals_one_by_one(q4, rows_seen, size):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:size]]
    singles = [q4.generate(p, max_tokens=10, temperature=0.0) for p in prompts]
    assert 1 in rows_seen  # one-by-one decode steps: one row per call (short prefills: a few)
    rows_seen.clear()
    batch = q4.generate_batch(prompts, max_tokens=10, temperature=0.0)
    assert size in rows_seen, "the batched decode did not send all rows through the kernel at once"
    for one, many in zip(singles, batch):
        assert len(one.tokens) == 10
        assert many.tokens == one.tokens and many.text == one.text


def test_batch_rows_equal_single_rows_bit_for_bit(q4):
    """One decoder layer's projections: a row computed in a batch of 2..8 rows (one pass over the weights) or
    of 9..15 (two passes; 16 rows and more go to the dequantized GEMM) is the very float it is alone."""
    layer = q4.model.language_model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
        k = lin.weight.shape[1] * 32 // lin.bits
        x = mx.random.normal((15, 1, k), key=mx.random.key(k))
        alone = mx.concatenate([lin(x[i : i + 1]) for i in range(15)])
        for m in (2, 3, 7, 8, 13, 15):
            assert mx.array_equal(lin(x[:m]), alone[:m]).item(), m
