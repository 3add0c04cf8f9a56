"""`cpu.rope`: Pixtral's decoder RoPE from a shared cos/sin table, bit for bit `mx.fast.rope` (what `nn.RoPE` calls)."""

from __future__ import annotations

from unittest import mock

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.rope_utils import SuScaledRoPE

from pixtral_mlx import cpu


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    monkeypatch.setattr(cpu, "_rope_tables", {})
    monkeypatch.setattr(cpu, "ROPE_TABLE_BLOCK", 64)  # small blocks: the table grows within the test


@pytest.mark.parametrize(("dims", "base", "scale"), [(128, 1e9, 1.0), (64, 10000.0, 1.0), (128, 1e6, 0.25)])
def test_equals_fast_rope_bit_for_bit(dims, base, scale):
    module = nn.RoPE(dims, traditional=False, base=base, scale=scale)
    for offset, length in ((0, 1), (0, 37), (5, 1), (63, 1), (64, 1), (100, 9), (700, 1), (4097, 3)):
        x = mx.random.normal((2, 4, length, dims), key=mx.random.key(offset + length))
        ours = cpu.rope(module, x, offset)
        assert mx.array_equal(ours, module(x, offset=offset)).item(), (offset, length)
    # one table for all layers of the same settings, grown in blocks past the largest position asked for
    (table,) = cpu._rope_tables.values()
    assert table[0].shape == (4160, dims) and table[1].shape == (4160, dims)
    cpu.rope(nn.RoPE(dims, traditional=False, base=base, scale=scale), x, 4000)
    assert len(cpu._rope_tables) == 1


def test_other_ropes_and_inputs_are_the_module():
    """Anything but a plain non-traditional nn.RoPE over whole float32 heads at an integer offset goes to the
    module itself (no table is made)."""
    calls = []
    x = mx.random.normal((1, 2, 3, 64))
    cases = [
        (nn.RoPE(64, traditional=True, base=10000.0), x, 4),
        (nn.RoPE(32, traditional=False, base=10000.0), x, 4),  # partial rotation
        (nn.RoPE(64, traditional=False, base=10000.0), x.astype(mx.float16), 4),
        (nn.RoPE(64, traditional=False, base=10000.0), x, mx.array([4])),  # a batched cache's offsets
        (SuScaledRoPE(64, max_position_embeddings=4096, original_max_position_embeddings=1024), x, 4),
    ]
    for module, xi, offset in cases:
        real = type(module).__call__

        def counting(self, a, offset=0, _real=real):
            calls.append(1)
            return _real(self, a, offset=offset)

        with mock.patch.object(type(module), "__call__", counting):
            out = cpu.rope(module, xi, offset)
        assert mx.array_equal(out, real(module, xi, offset=offset)).item()
    assert len(calls) == len(cases)
    assert cpu._rope_tables == {}


def test_decoder_attention_uses_the_table():
    """Pixtral's decoder attention on the CPU (`cpu.BlockedPromptAttention`) takes its RoPE from the table: a
    prompt and then decode steps against a KV cache give mlx-lm's llama attention's values."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import KVCache

    args = llama.ModelArgs("llama", 256, 1, 512, 4, 1e-5, 1000, num_key_value_heads=2, rope_theta=1e9, head_dim=64)
    attn = llama.Attention(args)
    ours = llama.Attention(args)
    ours.update(attn.parameters())
    ours.__class__ = cpu.BlockedPromptAttention
    theirs_cache, ours_cache = KVCache(), KVCache()
    x = mx.random.normal((1, 5, 256), key=mx.random.key(1))
    want = attn(x, mask="causal", cache=theirs_cache)
    got = ours(x, mask="causal", cache=ours_cache)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    for i in range(3):
        x = mx.random.normal((1, 1, 256), key=mx.random.key(2 + i))
        assert mx.allclose(ours(x, cache=ours_cache), attn(x, cache=theirs_cache), rtol=1e-5, atol=1e-5).item()
    assert list(cpu._rope_tables) == [(64, 1e9, 1.0)]
