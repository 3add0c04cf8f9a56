"""Prefill's 4-bit product from the codes (csrc/qmv/gemm_int16.cpp via `cpu_kernel.quantized_matmul`).

It rounds x to int16 per (row, group) exactly as the int16 matvec kernels do, so it must equal the numpy model of
that arithmetic up to float32 rounding, and `mx.quantized_matmul` within what the rounding of x moves; give each
row the same bits whatever rows, tiles and threads it comes with; give the same bits in both builds (vpdpwssd
and vpmaddwd); and go away with the float kernels or `PIXTRAL_MLX_QMV_GEMM=off`. On Linux the extension must be
built (as in test_cpu_kernel.py); elsewhere these tests are skipped.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import test_cpu_kernel
from test_cpu_kernel import codes, selected

from pixtral_mlx import cpu, cpu_kernel

ext = test_cpu_kernel.ext  # the fixture: the extension (a failure, not a skip, where Linux lacks it)

# The matvec kernel selected -> the product that goes with it (its family).
GEMM_OF = {"avx512vl-vnni": "avx512vl-vnni", "avx512-int16": "avx512vl-vnni", "avx2-int16": "avx2"}


@pytest.fixture(autouse=True)
def defaults(monkeypatch):
    monkeypatch.delenv("PIXTRAL_MLX_QMV", raising=False)
    monkeypatch.delenv("PIXTRAL_MLX_QMV_GEMM", raising=False)


@pytest.fixture(params=sorted(GEMM_OF))
def kernel(request, ext):
    yield from selected(ext, request.param)


def quantized(n: int, k: int, group_size: int, seed: int = 0):
    """A random 4-bit matrix with bf16 scales, as the converter writes them."""
    return test_cpu_kernel.quantized(n, k, group_size, 4, mx.bfloat16, seed=seed)


def model(x: np.ndarray, wq, scales, biases, group_size: int) -> np.ndarray:
    """The int16 form in float64 (test_cpu_kernel.int16_model, with an int16 kernel selected, as here): step =
    max |x| / 32767 per (row, group), xq = x / step rounded to nearest even, and per group scale * step *
    dot(code, xq) - 7.5 * scale * (step * sum(xq) - sum(x)) + bias * sum(x)."""
    assert test_cpu_kernel.x_qmax() == 32767
    return test_cpu_kernel.int16_model(x, wq, scales, biases, group_size)


def rounding_bound(x: np.ndarray, wq, scales, group_size: int) -> np.ndarray:
    """The most rounding x can move an output: half a step per element, weighted by |scale * (code - 7.5)|."""
    q = codes(wq, 4)
    n, k = q.shape
    g = k // group_size
    s = np.array(scales.astype(mx.float32)).astype(np.float64)
    half = np.abs(x.astype(np.float32).reshape(x.shape[0], g, group_size)).max(-1) / 32767 / 2  # (M, G)
    weight = (np.abs(q - 7.5).reshape(n, g, group_size).sum(-1)) * np.abs(s)  # (N, G)
    return half @ weight.T


def product(x, wq, scales, biases, group_size: int) -> mx.array:
    y = cpu_kernel.quantized_matmul(x, wq, scales, biases, group_size=group_size, bits=4)
    assert y is not None, "the product from the codes did not apply"
    return y


@pytest.mark.parametrize(
    "m,n,k,group_size",
    [
        (9, 77, 512, 64),  # N not a multiple of the 32-row panel
        (37, 300, 1024, 128),  # several K blocks, rows in tiles and a remainder
        (16, 64, 320, 32),  # the last K block short (320 = 256 + 64)
        (23, 33, 640, 64),
    ],
)
def test_equals_the_int16_model(ext, kernel, m, n, k, group_size):
    """The product is the int16 arithmetic it documents, to float32 rounding far below what the rounding of x
    moves (so a wrong pair order, a missing centring term or a wrong step fails), with a group of zeros and an
    outlier; and the float product within the bound that rounding gives."""
    assert cpu_kernel.gemm_isa() == GEMM_OF[kernel]
    wq, scales, biases = quantized(n, k, group_size, seed=m)
    x = np.array(mx.random.normal((m, k), key=mx.random.key(k)))
    x[0, :group_size] = 0.0
    x[-1, group_size + 3] = 300.0
    out = np.array(product(mx.array(x), wq, scales, biases, group_size))
    f32 = (scales.astype(mx.float32), biases.astype(mx.float32))  # (bf16 scales would round the weights to bf16)
    wd = np.array(mx.dequantize(wq, *f32, group_size=group_size, bits=4))
    scale = (np.abs(x) @ np.abs(wd).T).max()
    to_model = np.abs(out - model(x, wq, scales, biases, group_size)).max()
    assert to_model <= 5e-7 * scale, to_model / scale
    moved = np.abs(out - x.astype(np.float64) @ wd.T.astype(np.float64))
    assert moved.max() > 20 * to_model  # x was rounded: the model is the right one
    assert (moved <= rounding_bound(x, wq, scales, group_size) + 5e-7 * scale).all()  # by at most half a step


def test_rows_get_the_same_bits_in_any_chunk_and_thread_count(ext, kernel):
    """A row's result does not depend on the rows around it (its tile, the remainder tile), nor on threads."""
    wq, scales, biases = quantized(100, 768, 64, seed=3)
    x = mx.random.normal((300, 768), key=mx.random.key(5))  # two blocks of rows (256, then 44)
    whole = product(x, wq, scales, biases, 64)
    assert mx.array_equal(product(x[3:20], wq, scales, biases, 64), whole[3:20]).item()
    assert mx.array_equal(product(x[250:291], wq, scales, biases, 64), whole[250:291]).item()
    with test_cpu_kernel.threads_set(ext, 1):
        assert mx.array_equal(product(x, wq, scales, biases, 64), whole).item()


def in_both_builds(ext, compute):
    """compute() with the vpdpwssd build selected, then with the vpmaddwd one (skipped without AVX512-VNNI)."""
    if "avx512vl-vnni" not in ext.supported_isas():
        pytest.skip("no AVX512-VNNI on this CPU")
    outs = []
    try:
        for isa in ("avx512vl-vnni", "avx2-int16"):
            ext.select_isa(isa)
            outs.append(compute())
    finally:
        ext.select_isa("auto")
    return outs


def test_both_builds_give_the_same_bits(ext):
    """vpdpwssd and vpmaddwd + vpaddd sum the same int32 products exactly, then the same float operations."""
    wq, scales, biases = quantized(96, 1024, 128, seed=9)
    x = mx.random.normal((30, 1024), key=mx.random.key(9))
    assert mx.array_equal(*in_both_builds(ext, lambda: product(x, wq, scales, biases, 128))).item()


def test_non_finite_rows_and_strided_x(ext, kernel):
    """inf in x poisons its row only (as in float); a column-strided view of x gives what its copy gives."""
    wq, scales, biases = quantized(64, 512, 64, seed=1)
    x = np.array(mx.random.normal((20, 512), key=mx.random.key(2)))
    x[4, 10] = np.inf
    out = np.array(product(mx.array(x), wq, scales, biases, 64))
    assert np.isnan(out[4]).all() and np.isfinite(np.delete(out, 4, axis=0)).all()
    xt = mx.random.normal((512, 20), key=mx.random.key(4))
    assert mx.array_equal(
        product(xt.T, wq, scales, biases, 64), product(mx.array(np.array(xt.T)), wq, scales, biases, 64)
    ).item()


def test_where_it_does_not_apply(ext, monkeypatch):
    """None (the caller dequantizes for BLAS) with a float kernel, with PIXTRAL_MLX_QMV_GEMM=off, for 8-bit
    weights and for 8 rows or fewer (the matvec's own, bit-identical to one row); the extension refuses more than
    8 rows without it."""
    wq, scales, biases = quantized(64, 256, 64)
    x = mx.random.normal((20, 256))
    assert cpu_kernel.quantized_matmul(x[:8], wq, scales, biases, group_size=64, bits=4) is None
    w8, s8, b8 = mx.quantize(mx.random.normal((64, 256)), group_size=64, bits=8)
    assert cpu_kernel.quantized_matmul(x, w8, s8, b8, group_size=64, bits=8) is None
    float_isa = next(i for i in ("avx512", "avx2", "scalar") if i in ext.supported_isas())
    try:
        ext.select_isa(float_isa)
        assert cpu_kernel.gemm_isa() == ""
        assert cpu_kernel.quantized_matmul(x, wq, scales, biases, group_size=64, bits=4) is None
        with pytest.raises(ValueError, match="between 1 and 8 rows"):
            ext.quantized_matvec(x, wq, scales, biases, group_size=64, bits=4)
    finally:
        ext.select_isa("auto")
    if not cpu_kernel.gemm_isa():
        pytest.skip("no int16 kernel on this CPU")
    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    assert cpu_kernel.gemm_isa() == ""
    assert cpu_kernel.quantized_matmul(x, wq, scales, biases, group_size=64, bits=4) is None
    assert "PIXTRAL_MLX_QMV_GEMM=off" in cpu_kernel.describe_prefill()


def test_the_prefill_layer_uses_it(ext, monkeypatch):
    """A prompt chunk through the CPU layer class multiplies from the codes (its bits), and with the product
    turned off dequantizes for BLAS: the two agree to the int16 rounding of x."""
    if not cpu_kernel.gemm_isa():
        pytest.skip("no int16 kernel on this CPU")
    layer = cpu.DequantizingQuantizedLinear(512, 96, bias=False, group_size=64, bits=4)
    x = mx.random.normal((2, 24, 512), key=mx.random.key(7))
    y = layer(x)
    want = product(x, layer["weight"], layer["scales"], layer["biases"], 64)
    assert y.shape == (2, 24, 96) and mx.array_equal(y, want).item()
    assert cpu.dequantized_bytes(_Holder(layer)) == 0  # nothing dequantized: no buffers kept for it
    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    floats = layer(x)
    assert not mx.array_equal(floats, y).item()
    assert mx.allclose(floats, y, rtol=0, atol=1e-4 * mx.abs(floats).max().item()).item()
    assert cpu.dequantized_bytes(_Holder(layer)) == 4 * 96 * 512


class _Holder:
    """A stand-in decoder layer holding one linear (cpu.dequantized_bytes walks named_modules)."""

    def __init__(self, linear):
        self.linear = linear

    def named_modules(self):
        return [("linear", self.linear)]
