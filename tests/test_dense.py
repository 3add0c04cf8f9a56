"""Float weights on the CPU (csrc/qmv/dense.cpp, `cpu.DenseLinear`): the extension's float-weight matvec and widening,
the layer classes, and a bf16 checkpoint that keeps its weights in 16 bits.

The matvec must give x @ w.T in float32 for float32, bfloat16 and float16 weights (a 16-bit weight widened exactly),
each row of x the same bits alone and in a batch (batched greedy decoding picks the one-by-one tokens), on every
kernel this CPU has; widening must equal `astype`; a prompt chunk through the layer must get exactly the product of
the float32 weights; and a loaded bf16 checkpoint must hold its float layers in bf16 and answer as the same model with
float32 copies does. On Linux the extension must be built (as in test_cpu_kernel.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import test_cpu_kernel

from pixtral_mlx import cpu, cpu_kernel

ext = test_cpu_kernel.ext  # the fixture: the extension (a failure, not a skip, where Linux lacks it)

DTYPES = [mx.float32, mx.bfloat16, mx.float16]


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.delenv("PIXTRAL_MLX_QMV", raising=False)


# Decode kernels and the dense kernels they bring: 512-bit vectors, 256-bit ones in 32 registers, in 16, plain C++.
DENSE_OF = {"avx512": "avx512", "avx512vl-vnni": "avx512vl", "avx2": "avx2", "scalar": "scalar"}


@pytest.fixture(params=sorted(DENSE_OF))
def dense_isa(request, ext):
    yield from test_cpu_kernel.selected(ext, request.param)


def reference(x: mx.array, w: mx.array) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ np.asarray(w.astype(mx.float32), dtype=np.float64).T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [64, 200, 1000])
def test_the_matvec(ext, dense_isa, dtype, k):
    """x @ w.T to float32 rounding for 1..15 rows (passes of up to 8, 4 with AVX2), K with and without a tail past the
    vectors, N not a multiple of the register blocks (and several tasks' worth where K is small); a row of x gets the
    same bits alone as in any batch."""
    assert ext.dense_isa() == DENSE_OF[dense_isa]
    n = 150
    w = mx.random.normal((n, k), key=mx.random.key(k)).astype(dtype)
    x = mx.random.normal((15, k), key=mx.random.key(k + 1))
    bound = np.abs(np.asarray(x, dtype=np.float64)) @ np.abs(np.asarray(w.astype(mx.float32), dtype=np.float64)).T
    alone = mx.concatenate([ext.dense_matvec(x[i : i + 1], w) for i in range(15)])
    np.testing.assert_array_less(np.abs(np.asarray(alone) - reference(x, w)), 1e-6 * bound + 1e-30)
    for m in (2, 3, 4, 5, 7, 8, 9, 15):
        y = ext.dense_matvec(x[:m], w)
        assert y.dtype == mx.float32 and y.shape == (m, n)
        assert mx.array_equal(y, alone[:m]).item(), m
    # A batch of (2, 3, K) rows and a view with strided rows: the same rows, the same bits.
    assert mx.array_equal(ext.dense_matvec(x[:6].reshape(2, 3, k), w), alone[:6].reshape(2, 3, n)).item()
    assert mx.array_equal(ext.dense_matvec(x[::2], w), alone[::2]).item()
    # Views with strided columns: x gathered, w copied contiguous first.
    x_cols = mx.contiguous(x[:4].T).T  # (4, K), columns 4 apart
    w_cols = mx.contiguous(w.T).T  # (N, K), columns N apart
    mx.eval(x_cols, w_cols)
    assert x_cols.shape == (4, k) and mx.array_equal(ext.dense_matvec(x_cols, w), alone[:4]).item()
    assert mx.array_equal(ext.dense_matvec(x[:3], w_cols), alone[:3]).item()
    # A 16-bit weight gives what its float32 copy gives: it is widened exactly as it is read.
    assert mx.array_equal(ext.dense_matvec(x[:5], w.astype(mx.float32)), alone[:5]).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=str)
def test_widening_is_astype(ext, dense_isa, dtype):
    w = (mx.random.normal((300, 77), key=mx.random.key(5)) * 1000).astype(dtype)
    wide = ext.widen(w)
    assert wide.dtype == mx.float32 and mx.array_equal(wide, w.astype(mx.float32)).item()
    assert mx.array_equal(ext.widen(w.T), w.T.astype(mx.float32)).item()  # a view: copied contiguous first
    assert cpu_kernel.widen(w.astype(mx.float32)).dtype == mx.float32


def test_the_layer_classes(ext):
    """Below `dense_gemm_rows` rows (a decode step, a short prompt chunk) the matvec, from there the GEMM on the widened
    weight: exactly the float32 copy's product, the bias added as nn.Linear adds it; the embedding gives float32 rows
    and a tied output layer."""
    import mlx.nn as nn

    gemm_rows = cpu_kernel.dense_gemm_rows(mx.bfloat16)
    assert gemm_rows == cpu_kernel.DENSE_GEMM_ROWS.get(ext.dense_isa(), 16)
    assert cpu_kernel.dense_gemm_rows(mx.float32) == cpu.DEQUANT_MIN_TOKENS  # nothing to widen: the GEMM from 16 on
    layer = nn.Linear(96, 40, bias=True)
    layer.update({"weight": layer.weight.astype(mx.bfloat16)})
    layer.__class__ = cpu.DenseLinear
    w32 = layer.weight.astype(mx.float32)
    x = mx.random.normal((1, gemm_rows + 4, 96), key=mx.random.key(2))
    chunk = layer(x)
    assert mx.array_equal(chunk, mx.addmm(layer.bias, x, w32.T)).item()
    for m in sorted({1, 3, 15, gemm_rows - 1}):
        assert mx.array_equal(layer(x[:, :m]), ext.dense_matvec(x[:, :m], layer.weight) + layer.bias).item()
        assert mx.allclose(layer(x[:, :m]), chunk[:, :m], rtol=1e-5, atol=1e-5).item()
    assert cpu.widens(layer)
    with cpu.shared_dequantization():  # several prompts: one widened weight for all of them
        a, b = layer(x), layer(x[:, ::-1])
        assert mx.array_equal(a, chunk).item() and mx.array_equal(b, chunk[:, ::-1]).item()
        assert len(cpu._shared) == 1
    emb = nn.Embedding(50, 96)
    emb.update({"weight": emb.weight.astype(mx.bfloat16)})
    emb.__class__ = cpu.DenseEmbedding
    ids = mx.array([[3, 49, 0]])
    assert emb(ids).dtype == mx.float32 and mx.array_equal(emb(ids), emb.weight.astype(mx.float32)[ids]).item()
    assert mx.array_equal(emb.as_linear(x[:, :2]), ext.dense_matvec(x[:, :2], emb.weight)).item()
    assert mx.array_equal(emb.as_linear(x), x @ emb.weight.astype(mx.float32).T).item()


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    import checkpoints

    from pixtral_mlx.convert import convert

    root = tmp_path_factory.mktemp("dense")
    hf = checkpoints.write_hf_checkpoint(checkpoints.hf_model(seed=5), root / "hf")
    return convert(hf, root / "bf16", dtype="bfloat16", progress=False)


PROMPTS = ["Tell me about the sea.", "Hi", "What is two plus two?", "Name a colour."]


def test_a_loaded_bf16_model(ext, bf16_checkpoint, monkeypatch):
    """The float layers keep the checkpoint's bf16 (the norms go to float32), so the weights take about half the memory
    of float32 copies; long prompt chunks (the GEMM) and decode steps (the matvec) give the float32 copies' logits bit
    for bit; batched greedy decoding picks the one-by-one tokens; and the logits are MLX's own (the extension off:
    float32 weights, BLAS) to float32 rounding, short chunks included."""
    import mlx.nn as nn

    import pixtral_mlx
    from pixtral_mlx.memory import weights_bytes

    half = pixtral_mlx.load(str(bf16_checkpoint))
    layers = [m for _, m in half.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert layers and all(type(m) in (cpu.DenseLinear, cpu.DenseEmbedding) for m in layers)
    assert all(m.weight.dtype == mx.bfloat16 for m in layers)
    assert half.model.language_model.model.norm.weight.dtype == mx.float32
    # The memory plan counts the float32 copy a prompt chunk widens: the largest layer's but the output layer's, which
    # only sees the last position, and the embedding table's, whose rows are gathered (the largest here: 131,072 x 64).
    from pixtral_mlx.memory import _largest_quantized

    lm_head = half.model.language_model.lm_head
    layer = half.model.language_model.model.layers[0]
    in_layer = max(m.weight.size for _, m in layer.named_modules() if cpu.widens(m))
    assert cpu.dequantized_bytes(layer) == 4 * in_layer > 0
    linears = [m for m in layers if type(m) is cpu.DenseLinear and m is not lm_head]
    assert _largest_quantized(half.model) == max(m.weight.size for m in linears) < lm_head.weight.size
    gemm_rows = cpu_kernel.dense_gemm_rows(mx.bfloat16)  # shorter chunks take the matvec: nothing widened
    assert _largest_quantized(half.model, gemm_rows) == _largest_quantized(half.model)
    assert _largest_quantized(half.model, gemm_rows - 1) == 0
    # A prompt chunk long enough for the GEMM, a short one (the matvec where the kernel takes 24 rows), one token.
    tokens = mx.array([[1, 1091, 1114, 1101, 1032, 1115, 1101, 1097] * 17])
    assert tokens.shape[1] >= cpu_kernel.dense_gemm_rows(mx.bfloat16)
    chunk, step = half.model.language_model(tokens), half.model.language_model(tokens[:, :1])
    short = half.model.language_model(tokens[:, :24])
    held = weights_bytes(half.model)

    monkeypatch.setenv("PIXTRAL_MLX_QMV", "off")
    plain = pixtral_mlx.load(str(bf16_checkpoint))
    assert all(
        m.weight.dtype == mx.float32 for _, m in plain.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
    )
    assert held < 0.6 * weights_bytes(plain.model)
    want_chunk, want_step = plain.model.language_model(tokens), plain.model.language_model(tokens[:, :1])
    want_short = plain.model.language_model(tokens[:, :24])
    monkeypatch.delenv("PIXTRAL_MLX_QMV")
    for got, want in ((chunk, want_chunk), (step, want_step), (short, want_short)):
        assert mx.allclose(got, want, rtol=0, atol=1e-4 * mx.abs(want).max().item()).item()

    for m in layers:  # the same model with float32 copies of the weights
        m.update({"weight": m.weight.astype(mx.float32)})
    assert mx.array_equal(half.model.language_model(tokens), chunk).item()
    assert mx.array_equal(half.model.language_model(tokens[:, :1]), step).item()

    half = pixtral_mlx.load(str(bf16_checkpoint))
    # --verbose and the memory plan name the kernel this model's decode takes: the float-weight matvec here, the 4-bit
    # kernel where the decoder's layers are quantized (and where no model is given)
    from pixtral_mlx import backend

    device = backend.device_name(half.model)
    assert f"decode: qmv {ext.dense_isa()} float-weight matvec, bfloat16 weights, {ext.threads()} thread" in device
    assert cpu_kernel.describe() not in device and cpu_kernel.describe() in backend.device_name()
    quantized = pixtral_mlx.load(str(bf16_checkpoint))
    nn.quantize(quantized.model.language_model.model.layers[0], group_size=32, bits=4)
    assert backend.device_name(quantized.model) == backend.device_name()

    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    singles = [half.generate(p, max_tokens=8, temperature=0.0) for p in prompts]
    batch = half.generate_batch(prompts, max_tokens=8, temperature=0.0)
    for one, many in zip(singles, batch):
        assert len(one.tokens) == 8 and many.tokens == one.tokens
