"""The extension's prefill kernels (csrc/qmv/prefill_*.cpp): dequantization, SwiGLU, GELU and logsumexp bit for
bit against MLX's, the fused attention against `mx.fast.scaled_dot_product_attention`, on the AVX2 and the portable
code, and the library's CPU classes going through them."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama
from test_cpu_kernel import ext, kernel_on  # noqa: F401  (fixtures: the extension, built on Linux; the kernel on)

from pixtral_mlx import cpu, cpu_kernel


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request, ext):  # noqa: F811
    if request.param != "scalar" and request.param not in ext.supported_isas():
        pytest.skip(f"no {request.param.upper()} on this CPU")
    ext.select_isa(request.param)
    yield ext.prefill_isa()
    ext.select_isa("auto")


def test_prefill_isa_follows_the_decode_kernel(isa, ext):  # noqa: F811
    """The prefill kernels follow the decode kernel in use: its AVX-512 forms bring the AVX-512 attention."""
    assert isa == ext.isa()
    for name in ext.supported_isas():
        ext.select_isa(name)
        want = "scalar" if name == "scalar" else ("avx512" if name.startswith("avx512") else "avx2")
        assert ext.prefill_isa() == want, name
    ext.select_isa(isa)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.float16, mx.bfloat16])
def test_dequantize_bit_for_bit(isa, bits, group_size, sdtype):
    w = mx.random.normal((37, 384), key=mx.random.key(bits + group_size))
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    s, b = s.astype(sdtype), b.astype(sdtype)
    ref = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    out = cpu_kernel.dequantize(wq, s, b, group_size=group_size, bits=bits)
    assert out.dtype == mx.float32 and out.shape == ref.shape
    assert mx.array_equal(out, ref).item()
    # a row slice (a view, as the per-block split makes) too
    part = cpu_kernel.dequantize(wq[5:20], s[5:20], b[5:20], group_size=group_size, bits=bits)
    assert mx.array_equal(part, ref[5:20]).item()


def test_dequantize_declines_what_it_does_not_cover(ext):  # noqa: F811
    wq, s, b = mx.quantize(mx.random.normal((8, 96)), group_size=32, bits=3)
    assert cpu_kernel.dequantize(wq, s, b, group_size=32, bits=3) is None
    assert cpu_kernel.dequantize(wq, s, None, group_size=32, bits=4) is None


CASES = [
    # B, H, Hkv, Lq, Lk, D, causal
    (1, 4, 2, 70, 70, 64, True),  # a fresh prompt chunk, GQA, a ragged last query block
    (2, 2, 1, 100, 300, 128, True),  # a chunk behind 200 cached keys, two sequences
    (1, 3, 3, 65, 600, 64, False),  # vision: no mask, several key blocks with a ragged end
    (1, 2, 2, 5, 9, 16, True),
    (1, 1, 1, 1, 1, 32, False),
    (1, 8, 2, 257, 1000, 128, True),  # blocks straddling the diagonal at every offset
    (1, 2, 1, 90, 200, 48, True),  # a head_dim that is no multiple of 32 (AVX-512: one 16-float panel left)
    (1, 2, 2, 130, 130, 80, False),
]


@pytest.mark.parametrize("case", CASES)
def test_attention_equals_mlx(isa, case):
    B, H, Hkv, Lq, Lk, D, causal = case
    keys = mx.random.split(mx.random.key(Lq * Lk), 3)
    q = mx.random.normal((B, H, Lq, D), key=keys[0]) * 2
    k = mx.random.normal((B, Hkv, Lk, D), key=keys[1])
    v = mx.random.normal((B, Hkv, Lk, D), key=keys[2])
    scale = D**-0.5
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    out = cpu_kernel.attention(q, k, v, scale=scale, causal=causal)
    assert out.shape == ref.shape
    assert mx.allclose(out, ref, atol=1e-5, rtol=1e-5).item(), mx.abs(out - ref).max().item()


def test_attention_on_strided_views(isa):
    """The layouts mlx-lm hands over: heads as a transposed view of (B, L, H, D), keys a slice of a cache."""
    x = mx.random.normal((1, 300, 8, 64), key=mx.random.key(1)).transpose(0, 2, 1, 3)
    cache = mx.random.normal((1, 4, 512, 64), key=mx.random.key(2))
    k, v = cache[:, :, :300], cache[:, :, 100:400]
    ref = mx.fast.scaled_dot_product_attention(x, k, v, scale=0.125, mask="causal")
    out = cpu_kernel.attention(x, k, v, scale=0.125, causal=True)
    assert mx.allclose(out, ref, atol=1e-5, rtol=1e-5).item()
    # a last dimension that is not contiguous is copied first
    qt = mx.random.normal((1, 2, 64, 40), key=mx.random.key(3)).swapaxes(-1, -2)[:, :, :, :32]
    ref = mx.fast.scaled_dot_product_attention(qt, qt, qt, scale=0.2)
    assert mx.allclose(cpu_kernel.attention(qt, qt, qt, scale=0.2, causal=False), ref, atol=1e-5).item()


def test_attention_declines_what_it_does_not_cover(ext):  # noqa: F811
    q = mx.random.normal((1, 2, 8, 64)).astype(mx.bfloat16)
    assert cpu_kernel.attention(q, q, q, scale=0.1, causal=True) is None
    q = mx.random.normal((1, 3, 8, 64))
    k = mx.random.normal((1, 2, 8, 64))
    assert cpu_kernel.attention(q, k, k, scale=0.1, causal=False) is None  # 3 heads over 2 kv heads


def swiglu_inputs(n: int, seed: int) -> tuple[mx.array, mx.array]:
    """Gates over the whole range sigmoid's exp sees (|x| past 88, where exp saturates), the special values, and
    the gates where MLX's exp rounds x log2(e) at a half (k + 0.5 for every k up to 127, and their neighbours)."""
    rng = np.random.default_rng(seed)
    halves = ((np.arange(128) + 0.5) / 1.442695).astype(np.float32)
    halves = np.concatenate([np.nextafter(halves, np.float32(0)), halves, np.nextafter(halves, np.float32(1e9))])
    special = [0.0, -0.0, 1e-30, -1e-30, 88.0, 88.1, -88.0, -88.1, 89.0, 1e30, -1e30, np.inf, -np.inf, np.nan]
    gate = np.concatenate(
        [rng.normal(0, 3, n), rng.uniform(-100, 100, n // 4), rng.normal(0, 1e-3, n // 8), special, halves, -halves]
    ).astype(np.float32)
    return mx.array(gate), mx.array(rng.normal(0, 1, gate.size).astype(np.float32))


def same_bits(a: mx.array, b: mx.array) -> bool:
    return np.array_equal(np.array(a), np.array(b), equal_nan=True)


@pytest.mark.parametrize("n", [20_000, 7])
def test_swiglu_bit_for_bit(isa, n):
    gate, up = swiglu_inputs(n, seed=n)
    out = cpu_kernel.swiglu(gate, up)
    ref = llama.swiglu(gate, up)  # mlx-lm's compiled one; the vision MLP's uncompiled form gives the same
    assert out.dtype == mx.float32 and out.shape == ref.shape
    assert same_bits(out, ref) and same_bits(out, nn.silu(gate) * up)
    assert np.isnan(np.array(out)).sum() == 2  # nan, and -inf * sigmoid(-inf) = -inf * 0
    assert np.nanmax(np.abs(np.array(ref))) > 10  # not all zeros
    # 2-D and 3-D shapes, a length that is no multiple of 8, and transposed views (copied first)
    g2, u2 = gate[: 31 * 23].reshape(31, 23), up[: 31 * 23].reshape(31, 23)
    assert same_bits(cpu_kernel.swiglu(g2, u2), llama.swiglu(g2, u2))
    assert same_bits(cpu_kernel.swiglu(g2.T, u2.T), llama.swiglu(g2.T, u2.T))
    g3 = gate[:600].reshape(2, 20, 15)
    assert same_bits(cpu_kernel.swiglu(g3, g3), llama.swiglu(g3, g3))


def test_swiglu_declines_what_it_does_not_cover(ext):  # noqa: F811
    g = mx.random.normal((4, 64))
    assert cpu_kernel.swiglu(g.astype(mx.bfloat16), g.astype(mx.bfloat16)) is None
    assert cpu_kernel.swiglu(g, g[:, :32]) is None


def quantized_cache(b: int, kv_heads: int, n: int, d: int, bits: int, group_size: int, seed: int):
    """mlx-lm's QuantizedKVCache filled with n random positions: its keys and values as attention sees them (views
    of a larger buffer), and the float32 keys and values they came from."""
    from mlx_lm.models.cache import QuantizedKVCache

    cache = QuantizedKVCache(group_size=group_size, bits=bits)
    k = mx.random.normal((b, kv_heads, n, d), key=mx.random.key(seed))
    v = mx.random.normal((b, kv_heads, n, d), key=mx.random.key(seed + 1))
    keys, values = cache.update_and_fetch(k[:, :, : n // 2], v[:, :, : n // 2])
    keys, values = cache.update_and_fetch(k[:, :, n // 2 :], v[:, :, n // 2 :])
    return cache, keys, values


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "b,heads,kv_heads,n,d,group_size", [(1, 8, 2, 300, 128, 64), (2, 4, 4, 37, 64, 32), (1, 6, 1, 129, 128, 128)]
)
def test_quantized_decode_attention_equals_mlx_lm(isa, bits, b, heads, kv_heads, n, d, group_size):
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    cache, keys, values = quantized_cache(b, kv_heads, n, d, bits, group_size, seed=n + d)
    assert keys[0].shape[2] == n and cache.keys[0].shape[2] > n  # views of the cache's buffer
    q = mx.random.normal((b, heads, 1, d), key=mx.random.key(n))
    ref = quantized_scaled_dot_product_attention(
        mx.array(q), keys, values, scale=0.2, mask=None, group_size=group_size, bits=bits
    )
    out = cpu_kernel.quantized_decode_attention(q, keys, values, scale=0.2, group_size=group_size, bits=bits)
    assert out.shape == ref.shape == (b, heads, 1, d)
    assert mx.abs(ref).max().item() > 0.05
    assert mx.allclose(out, ref, atol=2e-6, rtol=1e-5).item()


@pytest.mark.parametrize("b,heads,kv_heads,n,d", [(1, 8, 2, 700, 128), (2, 4, 4, 37, 64), (1, 6, 1, 1, 128)])
def test_decode_attention_equals_mlx(isa, b, heads, kv_heads, n, d):
    """One query per head over a float32 KV cache's view (rows of a larger buffer), GQA: the values of MLX's SDPA."""
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    k = mx.random.normal((b, kv_heads, n, d), key=mx.random.key(n))
    v = mx.random.normal((b, kv_heads, n, d), key=mx.random.key(n + 1))
    keys, values = cache.update_and_fetch(k, v)
    assert cache.keys.shape[2] > n or n == 1 or n % 256 == 0
    q = mx.random.normal((b, heads, 1, d), key=mx.random.key(d))
    ref = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.2)
    out = cpu_kernel.decode_attention(q, keys, values, scale=0.2)
    assert out.shape == ref.shape and mx.abs(ref).max().item() > 0.05
    assert mx.allclose(out, ref, atol=2e-6, rtol=1e-5).item()
    if 3 % kv_heads:  # 3 query heads over these kv heads: not a GQA layout
        assert cpu_kernel.decode_attention(q[:, :3], keys, values, scale=0.2) is None


def test_quantized_decode_attention_declines_what_it_does_not_cover(ext):  # noqa: F811
    cache, keys, values = quantized_cache(1, 2, 20, 64, 8, 64, seed=1)
    q = mx.random.normal((1, 4, 2, 64))  # two queries: a prompt chunk
    assert cpu_kernel.quantized_decode_attention(q, keys, values, scale=0.1, group_size=64, bits=8) is None
    q = mx.random.normal((1, 4, 1, 64)).astype(mx.bfloat16)
    assert cpu_kernel.quantized_decode_attention(q, keys, values, scale=0.1, group_size=64, bits=8) is None
    q = mx.random.normal((1, 4, 1, 64))
    assert cpu_kernel.quantized_decode_attention(q, keys, values, scale=0.1, group_size=64, bits=2) is None


def test_library_paths_use_the_kernels(ext, monkeypatch):  # noqa: F811
    """`blocked_attention` and the prefill projection go through the kernels, with the values of the plain path."""
    calls = []
    for name in ("attention", "dequantize", "quantized_matmul", "swiglu"):
        real = getattr(cpu_kernel, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(cpu_kernel, name, spy)
    q = mx.random.normal((1, 4, 96, 64), key=mx.random.key(4))
    k = mx.random.normal((1, 2, 96, 64), key=mx.random.key(5))
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125, mask="causal")
    assert mx.allclose(cpu.blocked_attention(q, k, k, 0.125, causal=True), ref, atol=1e-5).item()

    lin = nn.QuantizedLinear(256, 96, bias=True, group_size=64, bits=4)
    lin.__class__ = cpu.DequantizingQuantizedLinear
    x = mx.random.normal((1, 40, 256), key=mx.random.key(6))
    w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=64, bits=4)
    assert mx.allclose(lin(x), x @ w.T + lin.bias, atol=1e-4).item()

    args = llama.ModelArgs("llama", 256, 1, 512, 4, 1e-5, 1000)
    mlp = llama.MLP(args)
    mlp.__class__ = cpu.KernelMLP
    ref = llama.MLP.__call__(mlp, x)
    assert same_bits(mlp(x), ref)
    # the 4-bit projection: from the codes with an int16 kernel (test_gemm.py), else dequantized for BLAS
    proj = ["quantized_matmul"] if cpu_kernel.gemm_isa() else ["quantized_matmul", "dequantize"]
    assert calls == ["attention", *proj, "swiglu"]
    one = mlp(x[:, :1])  # one token (decode): the kernel too (SWIGLU_KERNEL_MIN_ROWS), the same bits
    assert calls == ["attention", *proj, "swiglu", "swiglu"]
    assert same_bits(one, llama.MLP.__call__(mlp, x[:, :1]))


def gelu_inputs(n: int, seed: int) -> mx.array:
    """Activations over the range erf sees (past ±9.2, where it saturates; past ±13.3, where exp(-v²) underflows),
    the values where MLX's exp rounds -v² log2(e) at a half, tiny and subnormal values and the special ones."""
    rng = np.random.default_rng(seed)
    halves = np.sqrt((np.arange(128) + 0.5) / 1.442695).astype(np.float32) * np.float32(np.sqrt(2))
    halves = np.concatenate([np.nextafter(halves, np.float32(0)), halves, np.nextafter(halves, np.float32(1e9))])
    special = [0.0, -0.0, 1e-30, -1e-30, 3e-39, -3e-39, 9.2, -9.2, 13.3, -13.3, 1e30, -1e30, np.inf, -np.inf, np.nan]
    x = np.concatenate([rng.normal(0, 3, n), rng.uniform(-20, 20, n // 4), rng.normal(0, 1e-3, n // 8), special])
    return mx.array(np.concatenate([x, halves, -halves]).astype(np.float32))


@pytest.mark.parametrize("n", [20_000, 7])
def test_gelu_bit_for_bit(isa, n):
    """`cpu_kernel.gelu` gives MLX's exact `nn.gelu` (compiled, and the same ops uncompiled) bit for bit; the CPU
    class `KernelGELU` goes through it, and an approximate GELU keeps MLX's."""
    x = gelu_inputs(n, seed=n)
    out = cpu_kernel.gelu(x)
    ref = nn.gelu(x)
    assert out.dtype == mx.float32 and out.shape == ref.shape
    assert same_bits(out, ref) and same_bits(out, x * (1 + mx.erf(x / math.sqrt(2))) / 2)
    assert np.isnan(np.array(out)).sum() == 2  # nan, and -inf * (1 + erf(-inf)) = -inf * 0
    assert np.nanmax(np.abs(np.array(ref))) > 10 and (np.array(ref) < -0.1).any()  # a GELU, not a copy or ReLU
    x2 = x[: 31 * 23].reshape(31, 23)
    assert same_bits(cpu_kernel.gelu(x2), nn.gelu(x2))
    assert same_bits(cpu_kernel.gelu(x2.T), nn.gelu(x2.T))  # a transposed view (copied first)
    assert cpu_kernel.gelu(x.astype(mx.bfloat16)) is None
    calls = []
    exact, approx = nn.GELU(), nn.GELU(approx="precise")
    exact.__class__ = approx.__class__ = cpu.KernelGELU
    real = cpu_kernel.gelu
    try:
        cpu_kernel.gelu = lambda a: calls.append(a.shape) or real(a)
        assert same_bits(exact(x2), nn.gelu(x2)) and calls == [x2.shape]
        assert same_bits(approx(x2), nn.gelu_approx(x2)) and calls == [x2.shape]
    finally:
        cpu_kernel.gelu = real


def logsumexp_rows(dtype: mx.Dtype) -> list[mx.array]:
    """Rows a decode step's log-softmax sees and the edges of MLX's algorithm: logits at several scales and lengths
    (tails of 1-7 past the 8-lane blocks and the 1,024-value sum blocks), rows [0, v] where exp(v - 0) is rounded at
    a half (v log2(e) = k + 0.5 for every exponent k and its neighbours), past ±88, and the special values."""
    rng = np.random.default_rng(7)
    rows = [rng.normal(0, s, n) for s in (1, 4, 30, 1e-3) for n in (1, 7, 8, 9, 1023, 1025, 5000)]
    rows += [rng.normal(0, 4, 131_072)]  # a vocabulary's logits
    halves = ((np.arange(-130, 2) + 0.5) / 1.442695).astype(np.float32)
    edge = np.concatenate([np.nextafter(halves, np.float32(-1e9)), halves, np.nextafter(halves, np.float32(1e9))])
    edge = np.concatenate([edge, np.float32([-88.0, -88.1, -87.9, -1e-30, -0.0, -1e30])])
    rows += [np.float32([0.0, v]) for v in edge]
    special = [
        [np.nan, 1, 2],
        [1, 2, np.nan],
        [-np.inf, -np.inf],
        [np.inf, 1],
        [-np.inf, 1, 2],
        [0.0, -0.0],
        [88.5, 0],
        [1e30, -1e30],
    ]
    rows += [np.float32(r) for r in special]
    return [mx.array(np.asarray(r, np.float32)).astype(dtype) for r in rows]


def f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)  # exact from float16 and bfloat16


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_logsumexp_bit_for_bit(isa, dtype):
    """`cpu_kernel.logsumexp` gives MLX's CPU `mx.logsumexp` bit for bit: one row at a time, and the same rows
    stacked into one batch (a row's value does not depend on the others or on which thread runs it)."""
    rows = logsumexp_rows(dtype)
    got = [cpu_kernel.logsumexp(r[None]) for r in rows]
    want = [mx.logsumexp(r[None], axis=-1, keepdims=True) for r in rows]
    for g, w, r in zip(got, want, rows):
        assert g.dtype == dtype and g.shape == (1, 1)
        assert same_bits(f32(g), f32(w)), (r.shape, r[:3], g, w)
    # several rows at once (over the threads), a 3-D shape, and a transposed view (copied first)
    batch = mx.stack([r for r in rows if r.size == 5000])
    assert batch.shape[0] == 4
    assert same_bits(f32(cpu_kernel.logsumexp(batch)), f32(mx.logsumexp(batch, axis=-1, keepdims=True)))
    cube = batch.reshape(2, 2, 5000)
    assert same_bits(f32(cpu_kernel.logsumexp(cube)), f32(mx.logsumexp(cube, axis=-1, keepdims=True)))
    flat = batch[:, :1000].T
    assert same_bits(f32(cpu_kernel.logsumexp(flat)), f32(mx.logsumexp(flat, axis=-1, keepdims=True)))
    # a real logsumexp, not a copy of one: the values are those of float64
    v = next(i for i, r in enumerate(rows) if r.size == 131_072)  # the vocabulary's row
    x = np.array(f32(rows[v]), np.float64)
    ref = np.log(np.exp(x).sum())
    assert abs(float(f32(got[v]).item()) - ref) < 1e-2 * ref  # bfloat16 holds 8 bits


def test_logsumexp_declines_what_it_does_not_cover(ext):  # noqa: F811
    assert cpu_kernel.logsumexp(mx.array([1, 2, 3])) is None  # integers
    assert cpu_kernel.logsumexp(mx.zeros((0,))) is None
    with mx.stream(mx.cpu):
        assert cpu_kernel.logsumexp(mx.zeros((2, 4))) is not None
