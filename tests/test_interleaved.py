"""4-bit weights stored interleaved (`cpu_kernel.interleave`, csrc/qmv/kernels.h): 8 output rows per 32-byte load.

The matvec on this layout (gemm_int16.cpp's `matvec_rows`) scales each group as the prompt product does, so a row of
x must get from it exactly the bits the prompt product gives it (on either layout), which also pins it to the int16
model of test_gemm.py; a row's bits must not depend on the rows or threads around it (batched greedy decoding picks
the one-by-one tokens); both builds (vpdpwssd, vpmaddwd) must agree; the layer class must run decode and prompt
chunks on the layout and fall back, correctly, where the extension cannot; and `backend.prepare` must install it
where `cpu_kernel.interleaves` says, leaving the model's answers as they were. On Linux the extension must be built
(as in test_cpu_kernel.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import test_cpu_kernel
from test_cpu_kernel import selected
from test_gemm import GEMM_OF, in_both_builds, model

from pixtral_mlx import cpu, cpu_kernel

ext = test_cpu_kernel.ext  # the fixture: the extension (a failure, not a skip, where Linux lacks it)


@pytest.fixture(autouse=True)
def defaults(monkeypatch):
    for name in ("PIXTRAL_MLX_QMV", "PIXTRAL_MLX_QMV_GEMM", "PIXTRAL_MLX_QMV_INTERLEAVE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=sorted(GEMM_OF))
def kernel(request, ext):
    yield from selected(ext, request.param)


def quantized(n: int, k: int, group_size: int, dtype=mx.bfloat16, seed: int = 0):
    """A random 4-bit matrix, its scales and biases in `dtype` (bf16: as the converter writes them)."""
    return test_cpu_kernel.quantized(n, k, group_size, 4, dtype, seed=seed)


def interleaved(*arrays):
    return tuple(cpu_kernel.interleave(a) for a in arrays)


def matvec(x, wq, scales, biases, group_size: int) -> mx.array:
    """The extension's matvec on interleaved operands (x: at most 8 rows)."""
    return cpu_kernel.extension().quantized_matvec(
        x, wq, scales, biases, group_size=group_size, bits=4, interleaved=True
    )


def gemm(x, wq, scales, biases, group_size: int, interleave: bool = False) -> mx.array:
    y = cpu_kernel.quantized_matmul(x, wq, scales, biases, group_size=group_size, bits=4, interleaved=interleave)
    assert y is not None, "the product from the codes did not apply"
    return y


def test_the_layout():
    """Row 8 b + r's column c at flat index (8 b) * C + 8 c + r; deinterleave undoes it."""
    a = mx.arange(24 * 5, dtype=mx.uint32).reshape(24, 5)
    got = np.array(cpu_kernel.interleave(a)).reshape(-1)
    want = np.empty(24 * 5, dtype=np.uint32)
    for row in range(24):
        for col in range(5):
            want[(row // 8) * 8 * 5 + 8 * col + row % 8] = row * 5 + col
    assert (got == want).all()
    assert mx.array_equal(cpu_kernel.deinterleave(cpu_kernel.interleave(a)), a).item()


@pytest.mark.parametrize("dtype", [mx.uint32, mx.bfloat16, mx.float16, mx.float32])
def test_the_extension_makes_the_same_layout(ext, dtype):
    """The extension's threaded copy gives MLX's reshape / transpose / reshape, for contiguous arrays and views."""
    a = (mx.random.uniform(shape=(8 * 300, 37), key=mx.random.key(1)) * 60000).astype(dtype)
    want = a.reshape(300, 8, 37).transpose(0, 2, 1).reshape(8 * 300, 37)
    assert mx.array_equal(ext.interleave(a), want).item()
    assert mx.array_equal(cpu_kernel.interleave(a), want).item()
    view = mx.concatenate([a, a], axis=1)[:, 5:42]
    assert mx.array_equal(ext.interleave(view), view.reshape(300, 8, 37).transpose(0, 2, 1).reshape(8 * 300, 37)).item()
    with pytest.raises(ValueError, match="rows a multiple of 8"):
        ext.interleave(a[:12])


@pytest.mark.parametrize(
    "n,k,group_size,dtype",
    [
        (40, 512, 64, mx.bfloat16),  # 5 blocks: pairs of blocks and a last one alone
        (64, 1024, 128, mx.float16),
        (24, 384, 64, mx.float32),
        (16, 1280, 128, mx.bfloat16),
    ],
)
def test_matvec_gives_the_prompt_products_bits(ext, kernel, n, k, group_size, dtype):
    """Every row count 1..8: the bits the prompt product gives those rows (row-major and interleaved alike), which
    is the int16 model to float32 rounding, with a group of zeros and an outlier."""
    wq, scales, biases = quantized(n, k, group_size, dtype, seed=n)
    x = np.array(mx.random.normal((20, k), key=mx.random.key(k)))
    x[0, :group_size] = 0.0
    x[2, 5] = 300.0
    x = mx.array(x)
    full = gemm(x, wq, scales, biases, group_size)
    assert mx.array_equal(gemm(x, *interleaved(wq, scales, biases), group_size, interleave=True), full).item()
    il = interleaved(wq, scales, biases)
    for m in range(1, 9):
        assert mx.array_equal(matvec(x[:m], *il, group_size), full[:m]).item(), m
    f32 = (scales.astype(mx.float32), biases.astype(mx.float32))
    wd = np.array(mx.dequantize(wq, *f32, group_size=group_size, bits=4))
    xn = np.array(x)
    scale = (np.abs(xn) @ np.abs(wd).T).max()
    out = np.array(matvec(x[:8], *il, group_size))
    assert np.abs(out - model(xn[:8], wq, scales, biases, group_size)[:8]).max() <= 5e-7 * scale


@pytest.mark.parametrize("group_size", [64, 128])
def test_rows_of_x_with_edge_values_get_the_prompt_products_bits(ext, kernel, group_size):
    """x as the matvec rounds it (vectorized, Gemm::prepare_x) and as the prompt product does (quantize_x): the same
    steps, codes, errors and sums with a zero group, inf and NaN groups, values at a half step (nearest even), a
    tiny value beside a large one, subnormals and signed zeros, groups too small for 1 / step in float holding a zero
    (they round to zeros: finite outputs); and a transposed view (x read with a stride)."""
    k = 4 * group_size
    wq, scales, biases = quantized(64, k, group_size, seed=3)
    x = np.array(mx.random.normal((12, k), key=mx.random.key(9)))  # the prompt product takes > 8 rows
    x[0, :group_size] = 0.0
    x[1, 3] = np.inf
    x[2, group_size + 1] = np.nan
    x[3, :group_size] = 0.0
    x[3, 0] = 32767.0
    x[3, 1 : group_size // 2] = np.arange(1, group_size // 2) - 0.5  # k + 0.5 steps: rounded to even
    x[3, group_size // 2 : group_size] = -(np.arange(group_size // 2) + 0.5)
    x[4, group_size : 2 * group_size] = 1e-30
    x[4, group_size] = 1.0
    x[5, 2 * group_size : 3 * group_size] = 1e-40  # subnormal
    x[6, :group_size] = -0.0
    x[7, :group_size] = 1e-36  # too small for 1 / step in float, with a zero: rounds to zeros, not NaN
    x[7, 1] = 0.0
    x[7, group_size : 2 * group_size] = 1e-40
    x[7, group_size + 2] = 0.0
    x = mx.array(x.astype(np.float32))
    full = gemm(x, wq, scales, biases, group_size)[:8]
    il = interleaved(wq, scales, biases)
    out = matvec(x[:8], *il, group_size)
    assert np.array_equal(np.array(out), np.array(full), equal_nan=True)
    got = np.array(out)
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all() and np.isfinite(got[[0, 3, 4, 5, 6, 7]]).all()
    strided = mx.array(np.ascontiguousarray(np.array(x[:8]).T)).T  # (8, k) with a column stride of 8
    assert np.array_equal(np.array(matvec(strided, *il, group_size)), got, equal_nan=True)


def test_prompt_chunks_run_as_matvec_passes_with_the_products_bits(ext, kernel):
    """On the interleaved layout any number of rows of x goes through the matvec in passes of at most 8 rows, as
    even as they go (9 rows: 5 + 4), in groups of 32 passes (qmv.cpp interleaved_matvec): every row gets the bits
    the product from the codes gives it on MLX's layout, and the bits it gets alone, whatever the split, the group
    and the thread count."""
    n, k = 8 * 45, 512  # ~0.1 MB: several threads' tasks
    wq, scales, biases = quantized(n, k, 64, seed=11)
    il = interleaved(wq, scales, biases)
    x = mx.random.normal((300, k), key=mx.random.key(12))
    product = gemm(x, wq, scales, biases, 64)  # MLX's layout: the product from the codes
    alone = mx.concatenate([matvec(x[i : i + 1], *il, 64) for i in range(0, 300, 37)])
    assert mx.array_equal(alone, product[::37]).item()
    for m in (9, 16, 17, 40, 255, 257, 300):  # 300 rows: 38 passes, a group of 32 and one of 6
        assert mx.array_equal(gemm(x[:m], *il, 64, interleave=True), product[:m]).item(), m
    with test_cpu_kernel.threads_set(ext, 1):
        assert mx.array_equal(gemm(x[:41], *il, 64, interleave=True), product[:41]).item()


def test_a_row_gets_the_same_bits_in_any_batch_and_thread_count(ext, kernel):
    wq, scales, biases = interleaved(*quantized(8 * 45, 1024, 64, seed=4))  # ~0.2 MB: several threads' tasks
    x = mx.random.normal((8, 1024), key=mx.random.key(6))
    alone = mx.concatenate([matvec(x[i : i + 1], wq, scales, biases, 64) for i in range(8)])
    for lo, hi in ((0, 2), (1, 4), (3, 8), (0, 8), (5, 7)):
        assert mx.array_equal(matvec(x[lo:hi], wq, scales, biases, 64), alone[lo:hi]).item(), (lo, hi)
    with test_cpu_kernel.threads_set(ext, 1):
        assert mx.array_equal(matvec(x, wq, scales, biases, 64), alone).item()


def test_both_builds_give_the_same_bits(ext):
    il = interleaved(*quantized(48, 1024, 128, seed=9))
    x = mx.random.normal((30, 1024), key=mx.random.key(9))

    def compute():
        return mx.concatenate([matvec(x[:3], *il, 128), matvec(x[:8], *il, 128), gemm(x, *il, 128, True)])

    assert mx.array_equal(*in_both_builds(ext, compute)).item()


def test_what_the_extension_refuses(ext, kernel):
    x = mx.random.normal((2, 256))
    w8, s8, b8 = mx.quantize(mx.random.normal((64, 256)), group_size=64, bits=8)
    with pytest.raises(ValueError, match="interleaved weights must be 4-bit"):
        ext.quantized_matvec(x, w8, s8, b8, group_size=64, bits=8, interleaved=True)
    with pytest.raises(ValueError, match="interleaved weights must be 4-bit"):
        ext.quantized_matvec(x, *quantized(64, 256, 32), group_size=32, bits=4, interleaved=True)
    with pytest.raises(ValueError, match="interleaved weights must be 4-bit"):
        ext.quantized_matvec(x, *quantized(60, 256, 64), group_size=64, bits=4, interleaved=True)


def test_views_are_read_as_their_copies(ext, kernel):
    """The operands are read as whole contiguous blocks: a sliced (non-contiguous) view gives its copy's bits."""
    wq, scales, biases = interleaved(*quantized(32, 512, 64, seed=2))
    wide = mx.concatenate([wq, wq], axis=1)[:, : wq.shape[1]]  # the same values, rows twice as far apart
    x = mx.random.normal((3, 512), key=mx.random.key(3))
    want = matvec(x, wq, scales, biases, 64)
    assert mx.array_equal(matvec(x, wide, scales, biases, 64), want).item()  # a lazy view
    mx.eval(wide)
    assert mx.array_equal(matvec(x, wide, scales, biases, 64), want).item()  # an evaluated one


def test_without_the_kernels_the_layout_goes_back(ext):
    """With a float kernel selected (no int16 products), `quantized_matvec(interleaved=True)` puts the operands back
    in MLX's layout for mx.quantized_matmul: the reference result."""
    wq, scales, biases = quantized(32, 256, 64, mx.float32, seed=5)
    x = mx.random.normal((3, 256), key=mx.random.key(5))
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
    float_isa = next(i for i in ("avx512", "avx2", "scalar") if i in ext.supported_isas())
    try:
        ext.select_isa(float_isa)
        assert not cpu_kernel.interleaved_kernels()
        y = cpu_kernel.quantized_matvec(x, *interleaved(wq, scales, biases), group_size=64, bits=4, interleaved=True)
        assert mx.allclose(y, want, rtol=1e-5, atol=1e-5).item()
    finally:
        ext.select_isa("auto")


def _linear(k: int, n: int, group_size: int = 64, bias: bool = False) -> cpu.DequantizingQuantizedLinear:
    layer = cpu.DequantizingQuantizedLinear(k, n, bias=bias, group_size=group_size, bits=4)
    if bias:
        layer.bias = mx.random.normal((n,), key=mx.random.key(n))
    layer.update({k_: v.astype(mx.bfloat16) for k_, v in layer.parameters().items() if k_ in ("scales", "biases")})
    return layer


def test_where_prepare_interleaves(ext, monkeypatch):
    """By default with the kernel it was measured with (avx512vl-vnni); `=on` wherever an int16 kernel runs; `=off`
    never; never for 8-bit weights, groups of 32, rows not a multiple of 8, or with PIXTRAL_MLX_QMV_GEMM=off."""
    layer = _linear(256, 64)
    monkeypatch.setenv("PIXTRAL_MLX_QMV_INTERLEAVE", "on")
    assert cpu_kernel.interleaves(layer) == bool(cpu_kernel.gemm_isa())
    assert not cpu_kernel.interleaves(_linear(256, 64, group_size=32))
    assert not cpu_kernel.interleaves(_linear(256, 60))
    assert not cpu_kernel.interleaves(cpu.DequantizingQuantizedLinear(256, 64, group_size=64, bits=8))
    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    assert not cpu_kernel.interleaves(layer)
    monkeypatch.delenv("PIXTRAL_MLX_QMV_GEMM")
    monkeypatch.setenv("PIXTRAL_MLX_QMV_INTERLEAVE", "off")
    assert not cpu_kernel.interleaves(layer)
    monkeypatch.delenv("PIXTRAL_MLX_QMV_INTERLEAVE")
    assert cpu_kernel.interleaves(layer) == (ext.isa() == "avx512vl-vnni")


def test_the_layer_class(ext, kernel, monkeypatch):
    """Decode rows (1..15: passes of 8) and prompt chunks give the bits the prompt product gives the same rows on the
    row-major weights, so a token gets the same output in a prompt chunk as alone; the bias is added; with the
    product switched off (dequantize for BLAS) and with a float kernel (mx.quantized_matmul) the weights go back to
    MLX's layout and the result stays the float one to the int16 rounding of x."""
    layer = _linear(512, 72, bias=True)
    w, s, b = layer["weight"], layer["scales"], layer["biases"]
    x = mx.random.normal((24, 512), key=mx.random.key(8))
    want = gemm(x, w, s, b, 64) + layer["bias"]
    cpu.InterleavedQuantizedLinear.convert(layer)
    assert type(layer) is cpu.InterleavedQuantizedLinear
    assert mx.array_equal(layer["weight"], cpu_kernel.interleave(w)).item()
    assert mx.array_equal(layer(x), want).item()
    for m in (1, 5, 8, 11, 15):
        assert mx.array_equal(layer(x[None, :m]), want[None, :m]).item(), m
    floats = (x @ mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=4).T) + layer["bias"]
    tol = 1e-4 * mx.abs(floats).max().item()
    monkeypatch.setenv("PIXTRAL_MLX_QMV_GEMM", "off")
    assert mx.allclose(layer(x), floats, rtol=0, atol=tol).item()
    monkeypatch.delenv("PIXTRAL_MLX_QMV_GEMM")
    float_isa = next(i for i in ("avx512", "avx2", "scalar") if i in ext.supported_isas())
    try:
        ext.select_isa(float_isa)
        assert mx.allclose(layer(x[:3]), floats[:3], rtol=0, atol=tol).item()
        assert mx.allclose(layer(x), floats, rtol=0, atol=tol).item()
    finally:
        ext.select_isa(kernel)


# A checkpoint whose projections all take groups of 64 (the suite's default one has K = 96 in down_proj).
WIDE_TEXT = {"hidden_size": 128, "intermediate_size": 256}


@pytest.fixture(scope="module")
def q64(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    import checkpoints

    from pixtral_mlx.convert import convert

    root = tmp_path_factory.mktemp("interleaved")
    hf = checkpoints.write_hf_checkpoint(checkpoints.hf_model(seed=3, text=WIDE_TEXT), root / "hf")
    return convert(hf, root / "q4", quantize=True, bits=4, group_size=64, progress=False)


PROMPTS = ["Tell me about the sea.", "Hi", "What is two plus two?", "Name a colour.", "Count to ten, slowly."]


def test_a_loaded_model(ext, q64, monkeypatch):
    """Loaded with the layout: every decoder projection and lm_head interleaved; batched greedy decoding picks the
    one-by-one tokens; the first step's logits are the row-major model's to the int16 rounding of x."""
    if not cpu_kernel.gemm_isa():
        pytest.skip("no int16 kernel on this CPU")
    import pixtral_mlx

    monkeypatch.setenv("PIXTRAL_MLX_QMV_INTERLEAVE", "on")
    on = pixtral_mlx.load(str(q64))
    kinds = [
        type(m) for _, m in on.model.language_model.named_modules() if isinstance(m, cpu.DequantizingQuantizedLinear)
    ]
    assert kinds and all(k is cpu.InterleavedQuantizedLinear for k in kinds) and len(kinds) == 2 * 7 + 1
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    singles = [on.generate(p, max_tokens=8, temperature=0.0) for p in prompts]
    batch = on.generate_batch(prompts, max_tokens=8, temperature=0.0)
    for one, many in zip(singles, batch):
        assert len(one.tokens) == 8 and many.tokens == one.tokens
    monkeypatch.setenv("PIXTRAL_MLX_QMV_INTERLEAVE", "off")
    off = pixtral_mlx.load(str(q64))
    assert not any(isinstance(m, cpu.InterleavedQuantizedLinear) for _, m in off.model.named_modules())
    tokens = mx.array([[1, 1091, 1114, 1101, 1032, 1115, 1101, 1097]])
    a, b = on.model.language_model(tokens), off.model.language_model(tokens)
    assert mx.allclose(a, b, rtol=0, atol=1e-3 * mx.abs(b).max().item()).item()
    assert not mx.array_equal(a, b).item()  # the layouts ran different kernels
