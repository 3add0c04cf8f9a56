"""The C++ CPU quantized matvec (pixtral_mlx._qmv via pixtral_mlx.cpu_kernel) equals mx.quantized_matmul.

The float kernels (avx512, avx2, scalar) equal it up to float32 rounding of the sums. The int16 kernels
(avx512-int16, avx512vl-vnni, avx2-vnni, avx2-int16) round x to int16 (one step per group of 64 or 128) for 4-bit
weights: they equal a numpy model of that arithmetic up to float32 rounding, and mx.quantized_matmul within the
bound the rounding of x gives.

On Linux the extension must be built: these tests fail (not skip) when it is missing, so a broken
build shows in CI. Elsewhere (macOS: Metal does the work) they are skipped.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest

from pixtral_mlx import cpu_kernel

ON_LINUX = platform.system() == "Linux"


@pytest.fixture(scope="module")
def ext():
    e = cpu_kernel.extension()
    if e is None:
        if ON_LINUX:
            pytest.fail(f"the qmv extension must be built on Linux: {cpu_kernel.reason()}")
        pytest.skip(f"no qmv extension on {platform.system()}")
    return e


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.delenv("PIXTRAL_MLX_QMV", raising=False)


# The int16 kernels (and the opt-in int8 one, the same form with x rounded to int8), and the K each needs a multiple of.
INT16_KERNELS = {
    "avx512-int16": 128,
    "avx512vl-vnni": 64,
    "avx2-vnni": 64,
    "avx2-int16": 64,
    "avx512vl-int8": 64,
    "avx2-int8": 64,
}
INT8_KERNELS = {"avx512vl-int8", "avx2-int8"}


def x_qmax() -> int:
    """The largest integer the selected kernel rounds x to: 127 for int8, 32767 for int16."""
    return 127 if cpu_kernel.extension().isa() in INT8_KERNELS else 32767


def selected(ext, name: str):
    """Select kernel `name` for one test (skipped where the CPU lacks it), then back to the default."""
    if name not in ext.supported_isas():
        pytest.skip(f"{name} not supported by this CPU")
    ext.select_isa(name)
    yield name
    ext.select_isa("auto")


@pytest.fixture(
    params=[
        "avx512-int16",
        "avx512vl-vnni",
        "avx512",
        "avx2-vnni",
        "avx512vl-int8",
        "avx2-int16",
        "avx2",
        "avx2-int8",
        "scalar",
    ]
)
def isa(request, ext):
    yield from selected(ext, request.param)


def quantized(n: int, k: int, group_size: int, bits: int, dtype=mx.float32, seed: int = 0):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


def codes(wq, bits: int) -> np.ndarray:
    """The unsigned codes MLX packs into uint32 words, low bits first: (rows, K)."""
    w = np.array(wq).astype(np.uint64)
    shifts = np.arange(32 // bits, dtype=np.uint64) * bits
    return ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1).astype(np.float64)


def int16_form(bits: int, group_size: int, k: int) -> bool:
    """Whether the selected kernel rounds x to int16 for this problem (K input features)."""
    chunk = INT16_KERNELS.get(cpu_kernel.extension().isa())
    return chunk is not None and bits == 4 and group_size % 64 == 0 and k % chunk == 0


def x_steps(x: np.ndarray, group_size: int) -> np.ndarray:
    """The int16 form's step per group of each row of x: max |x| / 32767 (int8: / 127), (M, G)."""
    m, k = x.shape
    amax = np.abs(x.reshape(m, k // group_size, group_size)).max(axis=-1)
    return (amax / np.float32(x_qmax())).astype(np.float32)


def int16_bound(x: np.ndarray, wq, scales, group_size: int) -> np.ndarray:
    """The most the int16 form's rounding of x can move an output: each element moves by at most half a
    step, weighted by |scale * (code - 7.5)| (the kernel centres the codes), (M, N)."""
    q = codes(wq, 4)
    n, k = q.shape
    s = np.abs(np.array(scales.astype(mx.float32)).astype(np.float64))
    weight = s * np.abs(q - 7.5).reshape(n, k // group_size, group_size).sum(axis=-1)  # (N, G)
    return (x_steps(x, group_size).astype(np.float64) / 2) @ weight.T


def check(out, x, wq, scales, biases, group_size, bits, rtol=2e-5):
    """out equals mx.quantized_matmul up to float32 rounding of the sums (and, for the int16 form, up to
    what rounding x to int16 can move it: int16_bound).

    The tolerance scales with sum_k |x_k| |w_nk| (what float32 accumulation error is proportional to).
    A half-precision result is compared with the float32 computation, rounded once.
    """
    ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    half = out.dtype in (mx.bfloat16, mx.float16)
    if half:
        x = x.astype(mx.float32)
        ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    wd = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits).astype(mx.float32)
    bound = np.array(mx.abs(x.astype(mx.float32)) @ mx.abs(wd).T)
    ref = np.array(ref.astype(mx.float32))
    diff = np.abs(np.array(out.astype(mx.float32)) - ref)
    tol = rtol * bound + 1e-6 + (2.0**-7 * np.abs(ref) if half else 0.0)
    if int16_form(bits, group_size, x.shape[-1]):
        x2 = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        tol = tol + int16_bound(x2, wq, scales, group_size).reshape(tol.shape)
    assert (diff <= tol).all(), f"max excess {(diff - tol).max()}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.float16, mx.bfloat16], ids=["f32", "f16", "bf16"])
def test_equals_quantized_matmul(isa, bits, group_size, sdtype):
    n, k = 4099, 384  # odd number of rows: tails of every row block
    wq, scales, biases = quantized(n, k, group_size, bits, sdtype)
    assert scales.dtype == sdtype
    for m in range(1, 9):
        x = mx.random.normal((m, k), key=mx.random.key(m))
        out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=group_size, bits=bits)
        check(out, x, wq, scales, biases, group_size, bits)


@pytest.mark.parametrize("m", [1, 3, 8])
def test_long_rows_several_k_blocks(isa, m):
    # K long enough that x is swept in several L1-sized blocks and scales in several stack blocks.
    n, k = 67, 8192
    for bits, gs in ((4, 32), (8, 128)):
        wq, scales, biases = quantized(n, k, gs, bits, mx.bfloat16, seed=1)
        x = mx.random.normal((m, k), key=mx.random.key(2))
        out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=bits)
        check(out, x, wq, scales, biases, gs, bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_odd_rows_and_k_tails(isa, bits, group_size):
    # K of 1..11 groups (scale and bias loads in vectors of 8 groups plus a tail), N odd, rows of x up to 15
    # (9..15: two passes over the weights).
    for groups in (1, 3, 11):
        k = groups * group_size
        wq, scales, biases = quantized(37, k, group_size, bits, mx.bfloat16, seed=groups)
        for m in (1, 5, 9, 15):
            x = mx.random.normal((m, k), key=mx.random.key(10 * groups + m))
            out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=group_size, bits=bits)
            check(out, x, wq, scales, biases, group_size, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_of_a_batch_equal_rows_alone(ext, bits):
    """Every kernel gives a row of x the same float whether it comes alone or with up to 14 others
    (batched greedy decoding then picks the tokens one-by-one decoding picks), including when K is long
    enough to be split into several L1-sized blocks (more of them the more rows of x come together)."""
    for isa in ext.supported_isas():
        ext.select_isa(isa)
        try:
            for n, k, gs in ((4099, 384, 64), (67, 8192, 32), (130, 1024, 128), (300, 5120, 64)):
                wq, scales, biases = quantized(n, k, gs, bits, mx.bfloat16, seed=k)
                x = mx.random.normal((15, k), key=mx.random.key(n))
                qmv = functools.partial(cpu_kernel.quantized_matvec, w=wq, scales=scales, biases=biases, group_size=gs)
                alone = [qmv(x[i], bits=bits) for i in range(15)]
                for m in (2, 3, 4, 7, 8, 11, 15):
                    batch = qmv(x[:m], bits=bits)
                    for i in range(m):
                        assert mx.array_equal(batch[i], alone[i]).item(), (isa, n, k, m, i)
        finally:
            ext.select_isa("auto")


def int16_model(x: np.ndarray, wq, scales, biases, group_size: int) -> np.ndarray:
    """The int16 form's arithmetic in float64 (kernels.h, Problem::xq): x rounded to int16 per group with
    step = max |x| / 32767 (float32, as the kernel; int8: 127, Problem::xq8), then per group
    scale * step * dot(code, xq) - 7.5 * scale * sum(step * xq - x) + bias * sum(x)."""
    qmax = np.float32(x_qmax())
    q = codes(wq, 4)
    n, k = q.shape
    m, g = x.shape[0], k // group_size
    s = np.array(scales.astype(mx.float32)).astype(np.float64)
    b = np.array(biases.astype(mx.float32)).astype(np.float64)
    xg = x.astype(np.float32).reshape(m, g, group_size)
    amax = np.abs(xg).max(axis=-1, keepdims=True)
    step = (amax / qmax).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, qmax / amax, np.float32(0)).astype(np.float32)
    xq = np.rint((xg * inv).astype(np.float32)).astype(np.float64)  # round half to even, as nearbyint
    xd = xq * step.astype(np.float64)  # (M, G, gs)
    err = (xd - xg.astype(np.float64)).sum(axis=-1)  # (M, G)
    qg = q.reshape(n, g, group_size)
    dots = np.einsum("mgk,ngk->mng", xd, qg)  # sum_k step * xq * code per group
    return (dots * s[None]).sum(-1) - 7.5 * err @ s.T + xg.astype(np.float64).sum(-1) @ b.T


@pytest.fixture(params=sorted(INT16_KERNELS))
def int16_isa(request, ext):
    yield from selected(ext, request.param)


@pytest.mark.parametrize("group_size", [64, 128])
def test_int16_form_equals_its_model(int16_isa, group_size):
    """The int16 kernels compute exactly the arithmetic they document, up to float32 rounding far below
    what the rounding of x to int16 moves (so a missing centring, a wrong lane order or a wrong step
    fails), for 1 to 8 rows of x, with x in several L1-sized K blocks, a group of zeros and a group with
    an outlier."""
    n, k = 261, 3840  # 8 rows of x: 3 K blocks
    wq, scales, biases = quantized(n, k, group_size, 4, mx.bfloat16, seed=7)
    wd = np.abs(np.array(mx.dequantize(wq, scales, biases, group_size=group_size, bits=4).astype(mx.float32)))
    for m in (1, 3, 8):
        x = np.array(mx.random.normal((m, k), key=mx.random.key(m)))
        x[0, :group_size] = 0.0  # step 0
        x[-1, group_size + 5] = 300.0  # one large element: a coarse step for its group only
        out = np.array(cpu_kernel.quantized_matvec(mx.array(x), wq, scales, biases, group_size=group_size, bits=4))
        model = int16_model(x, wq, scales, biases, group_size)
        scale = np.abs(x) @ wd.T
        assert np.abs(out - model).max() <= (5e-7 * scale).max(), np.abs(out - model).max()
        # and the rounding of x is what separates it from the float result, within int16_bound
        check(mx.array(out), mx.array(x), wq, scales, biases, group_size, 4)
        moved = np.abs(
            out
            - np.array(
                mx.quantized_matmul(mx.array(x), wq, scales, biases, transpose=True, group_size=group_size, bits=4)
            )
        )
        assert moved.max() > 20 * (5e-7 * scale).max()  # the model test above can tell them apart
    x = np.array(mx.random.normal((2, k), key=mx.random.key(9)))
    x[0, 3] = np.inf
    out = np.array(cpu_kernel.quantized_matvec(mx.array(x), wq, scales, biases, group_size=group_size, bits=4))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()  # inf poisons its row only, as in float


@pytest.mark.parametrize("group_size", [256, 512])
def test_int16_form_larger_groups(int16_isa, group_size):
    """Groups of several 128-element chunks (the extension takes any multiple of 32; mx.quantize stops
    at 128, so the scales are made here) sum their chunks in int32 before the one scaling."""
    n, k = 77, 4096
    wq, _, _ = quantized(n, k, 64, 4, mx.bfloat16, seed=3)  # only the codes are used
    rng = np.random.default_rng(group_size)
    scales = mx.array(rng.normal(size=(n, k // group_size)) * 0.02, dtype=mx.bfloat16)
    biases = mx.array(rng.normal(size=(n, k // group_size)) * 0.1, dtype=mx.bfloat16)
    q = codes(wq, 4).reshape(n, k // group_size, group_size)
    s32, b32 = (np.array(a.astype(mx.float32)).astype(np.float64)[..., None] for a in (scales, biases))
    wd = (q * s32 + b32).reshape(n, k)
    for m in (1, 5, 8):
        x = np.array(mx.random.normal((m, k), key=mx.random.key(m)))
        out = np.array(cpu_kernel.quantized_matvec(mx.array(x), wq, scales, biases, group_size=group_size, bits=4))
        scale = (np.abs(x) @ np.abs(wd).T).max()
        to_model = np.abs(out - int16_model(x, wq, scales, biases, group_size)).max()
        assert to_model <= 5e-7 * scale
        assert np.abs(out - x @ wd.T).max() > 20 * to_model  # x was rounded: the model is the right one


def test_int16_is_the_default_and_the_float_kernels_stay_selectable(ext):
    """The int16 form is picked where the CPU has it (avx512-int16 with AVX512-VNNI, or its 256-bit form
    avx512vl-vnni on AMD Zen 4, whose 512-bit instructions run as two halves; without AVX-512, avx2-vnni with
    AVX-VNNI, else avx2-int16); PIXTRAL_MLX_QMV_ISA=avx512 or =avx2 (or select_isa) brings the float kernel back,
    which equals mx.quantized_matmul to float rounding."""
    isas = ext.supported_isas()
    order = ["avx512-int16", "avx512", "avx2-vnni", "avx512vl-vnni", "avx512vl-int8", "avx2-int16", "avx2"]
    if zen4():
        order = ["avx512vl-vnni", "avx512-int16", "avx512", "avx512vl-int8", "avx2-int16", "avx2"]
    order += ["avx2-int8", "scalar"]  # avx2-int8: opt-in, never the default
    assert isas == [k for k in order if k in isas]  # the default is the first
    if "avx512" in isas:
        assert ("avx512-int16" in isas) == ("avx512_vnni" in cpu_flags())
        assert ("avx512vl-vnni" in isas) == ("avx512_vnni" in cpu_flags())
        assert ("avx512vl-int8" in isas) == ("avx512_vnni" in cpu_flags())  # opt-in: never the default
    if "avx2" in isas:
        assert ("avx2-vnni" in isas) == ("avx_vnni" in cpu_flags())
        assert "avx2-int8" in isas
    code = "import pixtral_mlx\nfrom pixtral_mlx import cpu_kernel\nprint(cpu_kernel.extension().isa())"
    base = {kk: v for kk, v in os.environ.items() if kk != "PIXTRAL_MLX_QMV_ISA"}
    for env, want in [({}, isas[0])] + [({"PIXTRAL_MLX_QMV_ISA": f}, f) for f in ("avx512", "avx2") if f in isas]:
        done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True)
        assert done.stdout.strip() == want, done.stderr
    for float_isa in ("avx512", "avx2"):
        if float_isa not in isas:
            continue
        ext.select_isa(float_isa)
        try:
            wq, scales, biases = quantized(300, 512, 64, 4, mx.bfloat16)
            x = mx.random.normal((2, 512))
            out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=64, bits=4)
            assert not int16_form(4, 64, 512)
            check(out, x, wq, scales, biases, 64, 4)
        finally:
            ext.select_isa("auto")


@pytest.mark.parametrize(
    "base,vnni", [("avx2-int16", "avx2-vnni"), ("avx2-int16", "avx512vl-vnni"), ("avx2-int8", "avx512vl-int8")]
)
@pytest.mark.parametrize("bits", [4, 8])
def test_vnni_gives_the_bits_of_avx2_int16(ext, bits, base, vnni):
    """avx2-vnni's and avx512vl-vnni's vpdpwssd (VEX or EVEX encoded, 256 bits) sums the same int32 products as
    avx2-int16's vpmaddwd and adds (exact integer sums), so every output is the same float, for 1 to 8 rows of x,
    groups of 64 and 128 and several K blocks; 8-bit weights take the same float loop. Likewise avx512vl-int8's
    vpdpbusd and avx2-int8's vpmaddubsw, vpaddw and vpmaddwd (no int16 saturation: 2 * 15 * 127 at most)."""
    if vnni not in ext.supported_isas():
        pytest.skip(f"no {vnni} on this CPU")
    try:
        for gs in (64, 128):
            wq, scales, biases = quantized(301, 5120, gs, bits, mx.bfloat16, seed=gs)
            x = mx.random.normal((8, 5120), key=mx.random.key(gs))
            for m in range(1, 9):
                outs = []
                for isa in (base, vnni):
                    ext.select_isa(isa)
                    outs.append(cpu_kernel.quantized_matvec(x[:m], wq, scales, biases, group_size=gs, bits=bits))
                assert mx.array_equal(*outs).item(), (gs, m)
                check(outs[1], x[:m], wq, scales, biases, gs, bits)
    finally:
        ext.select_isa("auto")


def zen4() -> bool:
    """An AMD CPU of family 25 (0x19) with AVX-512: Zen 4 (/proc/cpuinfo, Linux)."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" and "avx512f" in cpu_flags()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them (Linux)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_half_scales_subnormal_and_negative(isa):
    n, k, gs = 40, 256, 64
    wq, _, _ = quantized(n, k, gs, 4)
    rng = np.random.default_rng(0)
    scales = mx.array(rng.normal(size=(n, k // gs)) * 1e-5, dtype=mx.float16)  # many subnormals
    biases = mx.array(rng.normal(size=(n, k // gs)) * 3.0, dtype=mx.float16)
    x = mx.random.normal((2, k))
    check(cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4), x, wq, scales, biases, gs, 4)


@contextmanager
def threads_set(ext, n: int):
    """The extension's thread count set to n inside, the previous one restored after."""
    old = ext.threads()
    try:
        assert ext.set_threads(n) == n
        yield
    finally:
        ext.set_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads(ext, threads):
    n, k, gs = 8195, 512, 64
    wq, scales, biases = quantized(n, k, gs, 4, mx.bfloat16)
    x = mx.random.normal((4, k))
    with threads_set(ext, threads):
        check(cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4), x, wq, scales, biases, gs, 4)


@pytest.mark.parametrize("spin_us", ["0", "2000"])
def test_pool_sleeping_or_spinning_workers(ext, spin_us):
    """Workers that sleep at once (PIXTRAL_MLX_QMV_SPIN_US=0) or spin between calls give the same results,
    call after call (a fresh process: the pool reads the setting when it starts): bit for bit what one
    thread computes (each output row is computed by one task, whichever thread runs it)."""
    code = (
        "import pixtral_mlx, mlx.core as mx\n"
        "from pixtral_mlx import cpu_kernel\n"
        "ext = cpu_kernel.extension()\n"
        "w, s, b = mx.quantize(mx.random.normal((3000, 512), key=mx.random.key(1)), group_size=64, bits=4)\n"
        "xs = [mx.random.normal((1, 512), key=mx.random.key(i)) for i in range(50)]\n"
        "ext.set_threads(1)\n"
        "alone = [cpu_kernel.quantized_matvec(x, w, s, b, group_size=64, bits=4) for x in xs]\n"
        "mx.eval(alone)\n"
        "ext.set_threads(2)\n"
        "same = 0\n"
        "for x, ref in zip(xs, alone):\n"
        "    out = cpu_kernel.quantized_matvec(x, w, s, b, group_size=64, bits=4)\n"
        "    same += mx.array_equal(out, ref).item()\n"
        "print(same)\n"
    )
    env = {**os.environ, "PIXTRAL_MLX_QMV_SPIN_US": spin_us}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 50


def test_leading_dims_and_non_contiguous(ext):
    n, k, gs = 515, 256, 64
    wq, scales, biases = quantized(n, k, gs, 4, mx.bfloat16)
    big = mx.random.normal((2, 3, 2 * k))
    cases = {
        "batch dims": big[..., :k],  # (2, 3, K): 6 rows, row stride 2K
        "strided last dim": big[0, :, ::2],  # column stride 2
        "transposed": mx.random.normal((k, 5)).T,  # (5, K), column stride 5
        "broadcast": mx.broadcast_to(mx.random.normal((1, k)), (4, k)),  # row stride 0
        "one row 1-D": mx.random.normal((k,)),
        "one row 3-D": mx.random.normal((1, 1, k)),
    }
    for name, x in cases.items():
        out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4)
        assert out.shape == (*x.shape[:-1], n), name
        check(out, x, wq, scales, biases, gs, 4)


def test_non_contiguous_weights(ext):
    n, k, gs = 300, 256, 32
    wq, scales, biases = quantized(n, k, gs, 8, mx.float16)
    x = mx.random.normal((3, k))
    # Row slices (the stream split's views) and column-strided scales/biases (gathered in the task).
    ws, ss, bs = wq[17:211], scales[17:211], biases[17:211]
    check(cpu_kernel.quantized_matvec(x, ws, ss, bs, group_size=gs, bits=8), x, ws, ss, bs, gs, 8)
    s2 = mx.stack([scales, scales * 2], axis=-1)[..., 0]
    b2 = mx.stack([biases, biases * 2], axis=-1)[..., 0]
    check(cpu_kernel.quantized_matvec(x, wq, s2, b2, group_size=gs, bits=8), x, wq, s2, b2, gs, 8)


def test_more_rows_and_other_dtypes(ext):
    n, k, gs = 129, 128, 64
    wq, scales, biases = quantized(n, k, gs, 4, mx.bfloat16)
    for rows in (9, 15, 32, 40):  # passes of 8 rows up to 32, then mx.quantized_matmul
        x = mx.random.normal((rows, k))
        check(cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4), x, wq, scales, biases, gs, 4)
    x = mx.random.normal((2, k)).astype(mx.bfloat16)  # same dtype rule as mx.quantized_matmul: bfloat16 out
    out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4)
    assert out.dtype == mx.bfloat16
    check(out, x, wq, scales, biases, gs, 4)


def test_inside_compile(ext):
    n, k, gs = 1000, 256, 64
    wq, scales, biases = quantized(n, k, gs, 4, mx.bfloat16)

    def f(x):
        return mx.maximum(cpu_kernel.quantized_matvec(x * 2.0, wq, scales, biases, group_size=gs, bits=4), 0.0) + 1.0

    cf = mx.compile(f)
    for m in (1, 2, 8, 2):
        x = mx.random.normal((m, k))
        inner = cpu_kernel.quantized_matvec(x * 2.0, wq, scales, biases, group_size=gs, bits=4)
        check(inner, x * 2.0, wq, scales, biases, gs, 4)
        assert mx.array_equal(cf(x), mx.maximum(inner, 0.0) + 1.0).item()
        assert mx.array_equal(cf(x), f(x)).item()


def test_two_streams_at_once(ext):
    n, k, gs = 4096, 1024, 64
    a = quantized(n, k, gs, 4, mx.bfloat16, seed=3)
    b = quantized(n, k, gs, 8, mx.float32, seed=4)
    x = mx.random.normal((2, k))

    # One thread, two CPU streams evaluated together (both stream threads call the kernel at once).
    s1, s2 = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    for _ in range(5):
        with mx.stream(s1):
            ya = cpu_kernel.quantized_matvec(x, *a, group_size=gs, bits=4)
        with mx.stream(s2):
            yb = cpu_kernel.quantized_matvec(x, *b, group_size=gs, bits=8)
        mx.eval(ya, yb)
        check(ya, x, *a, gs, 4)
        check(yb, x, *b, gs, 8)

    # Two Python threads, each with its own stream.
    errors: list[str] = []

    def work(q, bits):
        try:
            s = mx.new_stream(mx.cpu)
            with mx.stream(s):
                for _ in range(10):
                    y = cpu_kernel.quantized_matvec(x, *q, group_size=gs, bits=bits)
                    mx.eval(y)
                    try:
                        check(y, x, *q, gs, bits)
                    except AssertionError as e:
                        errors.append(f"{bits}-bit result differs: {e}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=args) for args in ((a, 4), (b, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_switched_off_falls_back(ext, monkeypatch):
    n, k, gs = 200, 128, 64
    wq, scales, biases = quantized(n, k, gs, 4)
    x = mx.random.normal((1, k))
    assert cpu_kernel.available()
    assert cpu_kernel.describe().startswith(f"qmv {ext.isa()}, ")
    monkeypatch.setenv("PIXTRAL_MLX_QMV", "off")
    assert not cpu_kernel.available()
    assert cpu_kernel.describe().split("; ")[0] == "mx.quantized_matmul (PIXTRAL_MLX_QMV=off)"
    out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=gs, bits=4)
    ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=gs, bits=4)
    assert mx.array_equal(out, ref).item()  # it *is* mx.quantized_matmul


def test_unsupported_inputs_fall_back(ext):
    n, k = 64, 128
    wq, scales, biases = quantized(n, k, 64, 2)  # 2-bit: not a kernel case
    x = mx.random.normal((1, k))
    out = cpu_kernel.quantized_matvec(x, wq, scales, biases, group_size=64, bits=2)
    ref = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=2)
    assert mx.array_equal(out, ref).item()
    with pytest.raises(ValueError):
        ext.quantized_matvec(x, wq, scales, biases, group_size=64, bits=2)
    with pytest.raises(ValueError):  # 9 rows of x for 8-bit weights (4-bit: the product from the codes, test_gemm.py)
        w8 = quantized(n, k, 64, 8)
        ext.quantized_matvec(mx.zeros((9, k)), *w8, group_size=64, bits=8)


@pytest.fixture(scope="module")
def pixtral_q4(hf_dir, tmp_path_factory):
    import pixtral_mlx
    from pixtral_mlx.convert import convert

    out = tmp_path_factory.mktemp("q4") / "tiny-q4"
    return pixtral_mlx.load(str(convert(hf_dir, out, quantize=True, bits=4, group_size=32, progress=False)))


def test_tiny_model_greedy_unchanged(ext, pixtral_q4, monkeypatch):
    messages = [{"role": "user", "content": "Tell me about the sea and the river."}]
    calls = []
    real = cpu_kernel.quantized_matvec

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "quantized_matvec", counting)
    on = pixtral_q4.generate(messages, max_tokens=12, temperature=0.0)
    assert calls, "decode did not use the kernel"
    monkeypatch.setenv("PIXTRAL_MLX_QMV", "off")
    calls.clear()
    off = pixtral_q4.generate(messages, max_tokens=12, temperature=0.0)
    assert not calls
    assert on.tokens == off.tokens and on.text == off.text


def test_tiny_model_keeps_checkpoint_scales(ext, pixtral_q4, monkeypatch):
    """On the CPU the quantized layers keep their bf16 scales (fewer bytes per token), and every path
    (kernel, fallback, prefill) computes what float32 copies of those scales give."""
    import mlx.nn as nn

    from pixtral_mlx.cpu import DequantizingQuantizedLinear

    layers = [m for _, m in pixtral_q4.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is DequantizingQuantizedLinear for m in layers)
    assert {m.scales.dtype for m in layers} == {mx.bfloat16} and {m.biases.dtype for m in layers} == {mx.bfloat16}
    assert pixtral_q4.model.language_model.model.norm.weight.dtype == mx.float32  # the rest is float32
    layer = pixtral_q4.model.language_model.model.layers[0].mlp.gate_proj
    f32 = nn.QuantizedLinear(layer.group_size, 1, bias=False, group_size=layer.group_size, bits=layer.bits)
    f32.update(
        {"weight": layer.weight, "scales": layer.scales.astype(mx.float32), "biases": layer.biases.astype(mx.float32)}
    )
    f32.__class__ = DequantizingQuantizedLinear
    k = layer.weight.shape[1] * 32 // layer.bits
    for rows in (1, 3, 40):  # kernel, kernel, dequantize + GEMM
        x = mx.random.normal((1, rows, k), key=mx.random.key(rows))
        assert mx.array_equal(layer(x), f32(x)).item()
        monkeypatch.setenv("PIXTRAL_MLX_QMV", "off")
        assert mx.allclose(layer(x), f32(x), rtol=1e-5, atol=1e-6).item()  # the fallback casts
        monkeypatch.delenv("PIXTRAL_MLX_QMV")


def test_huge_pages_keep_values(ext, monkeypatch):
    a = mx.random.normal((3, 1 << 20))  # 12 MiB: at least four whole 2 MiB pages
    b = mx.arange(7)
    mx.eval(a, b)
    before = np.array(a)
    total, advised, collapsed, err = ext.huge_pages([a, b], True)
    assert total == a.nbytes + b.nbytes
    assert 4 * (2 << 20) <= advised <= a.nbytes and advised % (2 << 20) == 0
    assert collapsed in (0, advised)  # 0: a kernel without MADV_COLLAPSE (err says why)
    assert collapsed == advised or err
    np.testing.assert_array_equal(np.array(a), before)
    assert np.array(b).tolist() == list(range(7))
    phrase = cpu_kernel.huge_pages([a])
    if collapsed:  # the same pages again
        assert phrase == f"weights in 2 MiB pages: {collapsed / 1e6:.0f} MB of {a.nbytes / 1e6:.0f} MB"
    else:
        assert phrase.startswith("weights marked for 2 MiB pages, not moved now (")
    assert cpu_kernel.describe().endswith(phrase)
    monkeypatch.setenv("PIXTRAL_MLX_HUGE_PAGES", "off")
    assert cpu_kernel.huge_pages([a]) == "weights in 4 KiB pages (PIXTRAL_MLX_HUGE_PAGES=off)"


def test_scales_cast_when_the_kernel_is_off(ext, pixtral_q4, monkeypatch):
    """Without the kernel, the scales are cast to float32 once at load (the fallback would cast them on
    every call), and greedy decoding gives what it gives with the kernel."""
    import mlx.nn as nn

    import pixtral_mlx

    monkeypatch.setenv("PIXTRAL_MLX_QMV", "off")
    off = pixtral_mlx.load(str(pixtral_q4.path))
    layers = [m for _, m in off.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and {m.scales.dtype for m in layers} == {mx.float32}
    messages = [{"role": "user", "content": "Tell me about the sea and the river."}]
    a = off.generate(messages, max_tokens=12, temperature=0.0)
    monkeypatch.delenv("PIXTRAL_MLX_QMV")
    b = pixtral_q4.generate(messages, max_tokens=12, temperature=0.0)
    assert a.tokens == b.tokens
