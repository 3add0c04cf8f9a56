"""The CPU decode kernel (csrc/qmv via cpu_kernel.quantized_matvec) at every matrix shape of the family: Pixtral-12B,
Mistral Small 3.x, Ministral 3 3B/8B/14B and Pixtral-Large (catalog.FAMILY), 4 and 8 bits, groups of 32/64/128.

Every inner dimension is tested with a few output rows (rows are independent in the kernel: threads split them),
and the tallest matrix (the 131072-row lm_head) once at full height with random packed weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_cpu_kernel import check, ext, kernel_on, quantized  # noqa: F401  (fixtures)

from pixtral_mlx import cpu_kernel
from pixtral_mlx.catalog import FAMILY


def family_shapes() -> list[tuple[int, int]]:
    """(rows, cols) of every distinct matrix the decoders quantize; cols is the inner dimension."""
    return sorted({(r, c) for m in FAMILY for r, c, _ in m.text.matrices()})


SHAPES = family_shapes()
INNER = sorted({c for _, c in SHAPES})


def test_the_family_shapes_are_all_here():
    assert {3072, 4096, 5120, 12288, 9216, 14336, 16384, 28672, 32768} <= set(INNER)
    assert (131072, 5120) in SHAPES and (32768, 12288) in SHAPES and (28672, 12288) in SHAPES


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("k", INNER)
def test_every_inner_dimension(ext, k, group_size, bits):  # noqa: F811
    wq, scales, biases = quantized(37, k, group_size, bits, mx.bfloat16, seed=k)
    for m in (1, 3):  # one decode token; a few rows of a batch
        x = mx.random.normal((m, k), key=mx.random.key(m + k))
        out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=group_size, bits=bits)
        check(out, x, wq, scales, biases, group_size, bits)


def test_full_height_lm_head(ext):  # noqa: F811
    """Mistral Small's (and Ministral 3's) 131072-row lm_head at full size, 4-bit: random codes, scales and
    biases (any is valid), so nothing has to be quantized first."""
    rows, k, bits, gs = 131072, 5120, 4, 64
    rng = np.random.default_rng(0)
    wq = mx.array(rng.integers(0, 2**32, (rows, k * bits // 32), dtype=np.uint32))
    scales = mx.array(rng.random((rows, k // gs), dtype=np.float32) * 0.02).astype(mx.bfloat16)
    biases = mx.array(rng.standard_normal((rows, k // gs), dtype=np.float32) * 0.05).astype(mx.bfloat16)
    x = mx.random.normal((1, k), key=mx.random.key(5))
    out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=bits)
    ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=gs, bits=bits)
    assert out.shape == ref.shape == (1, rows)
    out, ref = np.array(out), np.array(ref)
    # the sums run in another order: float32 rounding of K terms, relative to the rows' magnitude
    assert np.abs(ref).max() > 1 and np.abs(out - ref).max() <= 2e-5 * np.abs(ref).max()
    assert np.corrcoef(out[0], ref[0])[0, 1] > 0.999999
