"""The CPU decode kernel: a C++ MLX primitive for the few-row 4/8-bit affine quantized matvec.

On Linux x86 MLX's CPU `quantized_matmul` takes a scalar path (~0.65 GB/s of weights per thread):
decode, which reads every weight once per token, runs at a few percent of the memory bandwidth.
`pixtral_mlx._qmv` (sources in csrc/qmv, built by `pip install` on Linux) is an MLX `Primitive`
whose `eval_cpu` runs an AVX-512, AVX2 or scalar kernel chosen at run time, with the output rows
split over a small thread pool. It stays in MLX's lazy graph (streams, `mx.compile`) and reads the
scales and biases in their stored dtype (float32, float16 or bfloat16). Up to 8 rows of x share one
pass over the weights: batched decoding costs little more memory traffic than one token. The AVX2 and
scalar kernels give each row of x the float it gets alone, whatever the number of rows, so batched
greedy decoding picks the tokens one-by-one decoding picks (tests/test_batch_kernel.py).

The result equals `mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)` up to float32
rounding (the sums run in another order). Nothing here raises on import: when the extension is
missing, was built for another mlx, or `PIXTRAL_MLX_QMV=off` is set, `available()` is False and
`quantized_matvec` is `mx.quantized_matmul`. `describe()` is the phrase `--verbose` prints.
Build, settings (PIXTRAL_MLX_QMV*, huge pages) and the mlx pin: docs/CPU.md.
"""

from __future__ import annotations

import os
import platform
import threading
from typing import Any

MAX_ROWS = 8  # rows of x one kernel call handles (one pass over the weights)
MAX_SPLIT_ROWS = 32  # up to this many rows: passes of MAX_ROWS; more rows: mx.quantized_matmul

_lock = threading.Lock()
_loaded = False
_ext: Any = None
_why = ""  # why the extension is not in use, when it is not
_pages = ""  # what huge_pages() did last, for describe()


def _disabled_by_env() -> bool:
    return os.environ.get("PIXTRAL_MLX_QMV", "").strip().lower() in ("0", "off", "no", "false")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _load() -> Any:
    """Import the extension once (after mlx.core, whose libmlx and nanobind types it uses)."""
    global _loaded, _ext, _why
    if _loaded:
        return _ext
    with _lock:
        if _loaded:
            return _ext
        try:
            import mlx.core as mx
        except Exception as e:  # noqa: BLE001 - never raise from here
            _why = f"mlx unavailable: {e}"
        else:
            try:
                import pixtral_mlx._qmv as _qmv  # type: ignore[import-not-found]
            except ModuleNotFoundError:
                _why = (
                    "qmv extension not built"
                    if platform.system() == "Linux"
                    else f"qmv extension not built on {platform.system()}"
                )
            except Exception as e:  # noqa: BLE001 - a broken build must not break pixtral_mlx
                _why = f"qmv extension failed to load: {e}"
            else:
                built, running = _qmv.mlx_version, mx.__version__
                if _version_tuple(built) != _version_tuple(running):
                    _why = f"qmv extension built for mlx {built}, running mlx {running}; reinstall pixtral-mlx"
                else:
                    _ext = _qmv
        _loaded = True
    return _ext


def extension() -> Any:
    """The loaded `pixtral_mlx._qmv` module, or None (ignores PIXTRAL_MLX_QMV)."""
    return _load()


def available() -> bool:
    """True when decode can use the kernel: built, loadable, for this mlx, and not switched off."""
    return not _disabled_by_env() and _load() is not None


def reason() -> str:
    """Why the kernel is not in use ('' when it is)."""
    if _disabled_by_env():
        return "PIXTRAL_MLX_QMV=off"
    _load()
    return _why


def describe() -> str:
    """A short phrase for --verbose, e.g. 'qmv avx512, 2 threads; weights in 2 MiB pages: 6.4 of 6.5 GB'."""
    if available():
        n = _ext.threads()
        text = f"qmv {_ext.isa()}, {n} thread{'s' if n != 1 else ''}"
        if interleaving():
            text += ", 4-bit weights interleaved"
    else:
        text = f"mx.quantized_matmul ({reason()})"
    return f"{text}; {_pages}" if _pages else text


def describe_prefill() -> str:
    """The prefill kernels in use, in words for `doctor`, e.g. 'qmv avx512 (attention, dequantization, SwiGLU);
    4-bit products from the codes, int16 x (avx512vl-vnni), on interleaved weights as decode-kernel passes of up to
    8 rows'."""
    if prefill_available():
        words = f"qmv {_ext.prefill_isa()} (attention, dequantization, SwiGLU)"
        g = gemm_isa()
        if g:
            words += f"; 4-bit products from the codes, int16 x ({g})"
            if interleaving():
                words += ", on interleaved weights as decode-kernel passes of up to 8 rows"
        elif _gemm_disabled_by_env():
            words += "; 4-bit products dequantized for BLAS (PIXTRAL_MLX_QMV_GEMM=off)"
        return words
    return f"MLX's own ops ({reason() or 'this extension has no prefill kernels'})"


def describe_float(dtype_name: str) -> str:
    """`describe` for a model whose decoder holds float weights of `dtype_name` (an unquantized checkpoint), e.g.
    'qmv avx512vl float-weight matvec, bfloat16 weights, 2 threads'."""
    if dense_available():
        n = _ext.threads()
        text = f"qmv {_ext.dense_isa()} float-weight matvec, {dtype_name} weights, {n} thread{'s' if n != 1 else ''}"
    else:
        text = f"MLX's BLAS GEMM, float32 weights ({reason() or 'this extension has no float-weight kernels'})"
    return f"{text}; {_pages}" if _pages else text


def describe_dense() -> str:
    """The float-weight kernels in use, in words for `doctor`, e.g. 'qmv avx512vl (decode steps and short prompt chunks;
    bfloat16/float16 weights kept as stored)'."""
    if dense_available():
        return f"qmv {_ext.dense_isa()} (decode steps and short prompt chunks; bfloat16/float16 weights kept as stored)"
    return f"MLX's BLAS GEMM on float32 copies ({reason() or 'this extension has no float-weight kernels'})"


def _gemm_disabled_by_env() -> bool:
    return os.environ.get("PIXTRAL_MLX_QMV_GEMM", "").strip().lower() in ("0", "off", "no", "false")


def gemm_isa() -> str:
    """The prefill product from 4-bit codes in use ('avx512vl-vnni': vpdpwssd; 'avx2': vpmaddwd), or '' where
    prompt chunks dequantize for BLAS instead: no extension (or one without it), a float matvec kernel selected
    (`PIXTRAL_MLX_QMV_ISA=avx2|avx512`: exact float arithmetic throughout), or `PIXTRAL_MLX_QMV_GEMM=off`."""
    if not available() or not hasattr(_ext, "gemm_isa") or _gemm_disabled_by_env():
        return ""
    return _ext.gemm_isa()


def _interleave_setting() -> str:
    return os.environ.get("PIXTRAL_MLX_QMV_INTERLEAVE", "").strip().lower()


def interleave(a: Any) -> Any:
    """Rows in blocks of 8, each block transposed: row 8 b + r's column c goes to flat index (8 b) * C + 8 c + r of
    the (N, C) result (csrc/qmv/kernels.h, the interleaved layout). The same shape, dtype and bytes. With the extension
    a copy over its thread pool (~1.7x MLX's strided copy; Pixtral-12B has 6.5 GB of 4-bit weights to copy at load),
    else MLX's reshape / transpose / reshape: the same values."""
    import mlx.core as mx

    n, c = a.shape
    if available() and hasattr(_ext, "interleave") and a.itemsize in (2, 4) and mx.default_device() == mx.cpu:
        return _ext.interleave(a)
    return a.reshape(n // 8, 8, c).transpose(0, 2, 1).reshape(n, c)


def deinterleave(a: Any) -> Any:
    """`interleave`'s inverse."""
    n, c = a.shape
    return a.reshape(n // 8, c, 8).transpose(0, 2, 1).reshape(n, c)


def interleaved_kernels() -> bool:
    """True when the extension runs weights in the interleaved layout (`cpu_kernel.interleave`): 4-bit products with an
    int16 kernel (the extension's `gemm_isa`, whatever PIXTRAL_MLX_QMV_GEMM says)."""
    return available() and hasattr(_ext, "gemm_isa") and bool(_ext.gemm_isa())


def interleaving() -> bool:
    """`interleaves`' part that does not depend on the layer: the setting, the kernel in use, the prompt product."""
    setting = _interleave_setting()
    if setting in ("0", "off", "no", "false") or not gemm_isa():  # (gemm_isa implies interleaved_kernels)
        return False
    return setting in ("1", "on", "yes", "true") or _ext.isa() == "avx512vl-vnni"


def interleaves(layer: Any) -> bool:
    """True when `backend.prepare` stores this quantized linear layer's weights interleaved (`cpu_kernel.interleave`): 8
    output rows share each 32-byte load, so the rows of a batch share the unpacking of the codes (batched decode
    1.9x faster at 4 and 8 rows on Zen 4, one row no slower: benchmarks/README.md).

    4-bit affine weights with biases, groups of a multiple of 64, output rows a multiple of 8, prompt chunks
    multiplied from the codes (`multiplies_from_codes`), and by default the kernel this was measured with
    (`avx512vl-vnni`, Zen 4); `PIXTRAL_MLX_QMV_INTERLEAVE=on` takes it wherever an int16 kernel runs (AVX2 and
    Intel AVX-512: unmeasured), `=off` never."""
    return (
        interleaving()
        and multiplies_from_codes(layer)
        and layer.group_size % 64 == 0
        and layer.weight.ndim == 2
        and layer.weight.shape[0] % 8 == 0
    )


def quantized_matmul(
    x: Any, w: Any, scales: Any, biases: Any, *, group_size: int, bits: int, interleaved: bool = False
) -> Any:
    """A prompt chunk's `x @ dequantize(w).T` straight from 4-bit codes (csrc/qmv/gemm_int16.cpp; on interleaved
    weights the matvec in passes of at most MAX_ROWS rows, which is faster there at every size), or None where
    it does not apply (see `gemm_isa`; 4-bit affine weights with biases only, more than MAX_ROWS rows of x,
    float x, the CPU as the default device). x is rounded to int16 per row and group as the int16 matvec rounds
    it (an output moves by about 2e-5 of the largest); each row's result is the same whatever rows come with
    it. Float32 result (x's dtype when x and the scales agree, as `quantized_matvec`)."""
    import mlx.core as mx

    if bits != 4 or not gemm_isa() or _kernel_rows(x, w, scales, biases, group_size, bits) <= MAX_ROWS:
        return None
    xf = x if x.dtype == mx.float32 else x.astype(mx.float32)
    y = _ext.quantized_matvec(xf, w, scales, biases, group_size=group_size, bits=4, interleaved=interleaved)
    return _result_dtype(y, x, scales)


def multiplies_from_codes(layer: Any) -> bool:
    """True when a prompt chunk through this quantized linear layer runs from its codes (`quantized_matmul`) rather
    than on dequantized weights: 4-bit affine with biases, and the product in use (`gemm_isa`)."""
    return layer.bits == 4 and layer.mode == "affine" and "biases" in layer and bool(gemm_isa())


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def huge_pages(arrays: list[Any]) -> str:
    """Back the (evaluated) arrays' memory with transparent huge pages; returns what was done, in words.

    Linux only, through the extension (`madvise` MADV_HUGEPAGE, then MADV_COLLAPSE on Linux 6.1+ to
    move what is already there). The values do not change. Skipped, with the reason in the phrase,
    when `PIXTRAL_MLX_HUGE_PAGES=off`, without the extension, or when the kernel refuses.
    """
    global _pages
    import mlx.core as mx

    setting = os.environ.get("PIXTRAL_MLX_HUGE_PAGES", "").strip().lower()
    if setting in ("0", "off", "no", "false"):
        _pages = "weights in 4 KiB pages (PIXTRAL_MLX_HUGE_PAGES=off)"
        return _pages
    ext = _load()
    if ext is None or not hasattr(ext, "huge_pages"):
        return ""
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    mx.eval(arrays)
    total, advised, collapsed, err = ext.huge_pages(arrays, True)
    why = f" ({os.strerror(err)})" if err else ""
    if collapsed:
        _pages = f"weights in 2 MiB pages: {_size(collapsed)} of {_size(total)}"
    elif advised:
        _pages = f"weights marked for 2 MiB pages, not moved now{why}"
    else:
        _pages = f"weights in 4 KiB pages{why or ' (no array spans a 2 MiB page)'}"
    return _pages


def quantized_matvec(
    x: Any, w: Any, scales: Any, biases: Any, *, group_size: int, bits: int, interleaved: bool = False
) -> Any:
    """`mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)`, affine mode.

    x is (..., K) with at most MAX_ROWS rows in all for one pass over the weights (up to
    MAX_SPLIT_ROWS rows run as several passes, balanced by the extension on interleaved weights; more rows go to
    mx.quantized_matmul). The kernel
    computes in float32; the result has mx.quantized_matmul's dtype (float32 for float32 x).
    Shapes or modes the kernel does not cover (no biases, other bit widths, a non-CPU default
    device) go to mx.quantized_matmul. interleaved: w, scales and biases in `interleave`'s layout (they go back to
    MLX's for mx.quantized_matmul, and the kernel needs `interleaved_kernels()`).
    """
    import mlx.core as mx

    def fallback() -> Any:
        ws = (w, scales, biases)
        if interleaved:
            ws = tuple(deinterleave(a) for a in ws)
        return mx.quantized_matmul(x, *ws, transpose=True, group_size=group_size, bits=bits)

    if not available() or bits not in (4, 8) or (interleaved and not interleaved_kernels()):
        return fallback()
    rows = _kernel_rows(x, w, scales, biases, group_size, bits)
    if rows < 1 or rows > MAX_SPLIT_ROWS:
        return fallback()
    xf = x if x.dtype == mx.float32 else x.astype(mx.float32)
    kw = {"group_size": group_size, "bits": bits, "interleaved": interleaved}
    if rows <= MAX_ROWS or interleaved:  # the extension runs interleaved weights' rows in passes itself
        y = _ext.quantized_matvec(xf, w, scales, biases, **kw)
    else:
        flat = xf.reshape(rows, x.shape[-1])
        parts = [
            _ext.quantized_matvec(flat[i : i + MAX_ROWS], w, scales, biases, **kw) for i in range(0, rows, MAX_ROWS)
        ]
        y = mx.concatenate(parts, axis=0).reshape(*x.shape[:-1], w.shape[0])
    return _result_dtype(y, x, scales)


def _kernel_rows(x: Any, w: Any, scales: Any, biases: Any, group_size: int, bits: int) -> int:
    """The rows of x the extension would take for this product (its operands' shapes, dtypes and device), or 0 where
    they do not fit it (then MLX's own op runs)."""
    import mlx.core as mx

    if biases is None or group_size % 32 != 0:
        return 0
    k = x.shape[-1] if x.ndim else 0
    float_types = (mx.float32, mx.float16, mx.bfloat16)
    if (
        k == 0
        or k % group_size != 0
        or w.ndim != 2
        or w.dtype != mx.uint32
        or w.shape[1] * 32 != k * bits
        or scales.dtype not in float_types
        or biases.dtype != scales.dtype
        or x.dtype not in float_types
        or mx.default_device() != mx.cpu
    ):
        return 0
    return x.size // k


def _result_dtype(y: Any, x: Any, scales: Any) -> Any:
    """The extension's float32 result in mx.quantized_matmul's dtype: type promotion of x and scales (for these
    float types: the common dtype when they agree, else float32)."""
    import mlx.core as mx

    return y if x.dtype != scales.dtype or x.dtype == mx.float32 else y.astype(x.dtype)


def prefill_available() -> bool:
    """True when the prefill kernels (`dequantize`, `attention`, `swiglu`, `gelu`, `quantized_decode_attention`,
    `logsumexp`) can run: the extension is in use and has them."""
    return available() and hasattr(_ext, "attention")


def _head_dim_ok(d: int) -> bool:
    """The attention kernels' head_dim: a multiple of 16, one 512-bit or two 256-bit vectors (any on the portable
    code), at most 256 (csrc/qmv/prefill.h kMaxHeadDim)."""
    return d % (16 if _ext.prefill_isa() != "scalar" else 1) == 0 and d <= 256


def dequantize(w: Any, scales: Any, biases: Any, *, group_size: int, bits: int) -> Any:
    """The float32 weights of an affine 2/4/8-bit quantized matrix through the extension's multithreaded
    AVX2 kernel: bit for bit `mx.dequantize` on MLX's CPU (the product and the sum rounded apart), ~2x
    faster than MLX's single-threaded elementwise ops on 2 cores. None where it does not apply (no
    extension, other modes or widths, no biases, column-strided views, a non-CPU default device)."""
    import mlx.core as mx

    if (
        not prefill_available()
        or biases is None
        or bits not in (2, 4, 8)
        or group_size % 32 != 0
        or w.ndim != 2
        or w.dtype != mx.uint32
        or scales.dtype != biases.dtype
        or scales.dtype not in (mx.float32, mx.float16, mx.bfloat16)
        or mx.default_device() != mx.cpu
    ):
        return None
    return _ext.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def dense_available() -> bool:
    """True when float weights can go through the extension (`dense_matvec`, `widen`): it is in use and has them."""
    return available() and hasattr(_ext, "dense_matvec")


def dense_matvec(x: Any, w: Any) -> Any:
    """`x @ w.T` for a few rows of float32 x and a (N, K) float32, bfloat16 or float16 weight, in float32: each weight
    read once for all rows (passes of up to MAX_ROWS over each block of rows), on every core, a 16-bit weight widened
    exactly as it is read. MLX's CPU GEMM (BLAS) reads a float32 weight for one row of x at a fraction of the memory
    bandwidth (measured 5 against 32 GB/s on a 2-core EPYC; docs/CPU.md). A row of x gets the same bits alone and in a
    batch. None where it does not apply (no extension, other dtypes or shapes, a non-CPU default device)."""
    import mlx.core as mx

    if (
        not dense_available()
        or x.dtype != mx.float32
        or x.ndim < 1
        or w.ndim != 2
        or w.dtype not in (mx.float32, mx.bfloat16, mx.float16)
        or x.shape[-1] != w.shape[1]
        or x.size == 0
        or mx.default_device() != mx.cpu
    ):
        return None
    return _ext.dense_matvec(x, w)


# Rows of x from which a 16-bit weight's product goes to the BLAS GEMM on the widened matrix, by the dense kernels in
# use: below, `dense_matvec` is faster (its passes of 8 rows, 4 with 16 registers, reuse each block of weights from
# L2). Measured on a 2-core Zen 4, three Pixtral MLP matrices in bf16 (matvec against widening + GEMM): 128 rows 320
# against 398 ms and 192 rows 514 against 544 with 32 registers (avx512vl); 16 registers (avx2, passes of 4 rows;
# OpenBLAS's Haswell GEMM, OPENBLAS_CORETYPE=Haswell) 64 rows 207 against 235, 96 rows 308 against 316; 512-bit
# vectors run as halves there (avx512) 64 rows 248 against 246. Float32 weights (no widening to save) go to the GEMM
# from 16 rows (`cpu.DEQUANT_MIN_TOKENS`): at 64 rows the matvec took 288 against 213 ms.
DENSE_GEMM_ROWS = {"avx512vl": 128, "avx512": 48, "avx2": 64}


def dense_gemm_rows(dtype: Any) -> int:
    """Rows of x from which `cpu.DenseLinear` multiplies a weight of `dtype` with the GEMM rather than `dense_matvec`
    (16, `cpu.DEQUANT_MIN_TOKENS`, for float32 weights, other kernels and where the extension is not in use; `cpu`
    imports this module, so the value is written out, and tests/test_dense.py holds the two equal)."""
    import mlx.core as mx

    if dtype == mx.float32 or not dense_available():
        return 16
    return DENSE_GEMM_ROWS.get(_ext.dense_isa(), 16)


def widen(w: Any) -> Any:
    """A bfloat16 or float16 array as float32 (the same values) over the extension's threads, for the GEMM of a prompt
    chunk: MLX's `astype` runs on one thread (a 14336 x 5120 matrix: 140 against 12 ms once the buffer is reused).
    Other dtypes as they are; `astype` where the extension is not in use."""
    import mlx.core as mx

    if w.dtype not in (mx.bfloat16, mx.float16):
        return w
    if not dense_available() or mx.default_device() != mx.cpu:
        return w.astype(mx.float32)
    return _ext.widen(w)


def swiglu(gate: Any, up: Any) -> Any:
    """`silu(gate) * up` (mlx-lm's compiled `swiglu`, the vision MLP's `nn.silu(g) * u`) for float32 arrays of one
    shape through the extension: MLX's own sigmoid and exp, operation for operation, so bit for bit MLX's CPU
    result, on every core and 8 lanes at a time (MLX's CPU runs its compiled elementwise kernels on one thread,
    one element at a time: 0.4 s for a 1024² image's 4,096 × 4,096). None where it does not apply (no extension,
    other dtypes or shapes, a non-CPU default device)."""
    import mlx.core as mx

    if not prefill_available() or not hasattr(_ext, "swiglu") or mx.default_device() != mx.cpu:
        return None
    if gate.dtype != mx.float32 or up.dtype != mx.float32 or gate.shape != up.shape:
        return None
    return _ext.swiglu(gate, up)


def gelu(x: Any) -> Any:
    """MLX's exact `nn.gelu`, x (1 + erf(x / sqrt 2)) / 2 (the adapter's activation, Pixtral's and Mistral3's), for
    a float32 array through the extension: MLX's own erf and exp, operation for operation, so bit for bit MLX's CPU
    result, on every core and 8 lanes at a time (MLX's CPU runs it one element at a time: 138 ms for a 512² image's
    1,024 × 5,120 activations, 3 ms here). None where it does not apply (no extension, another dtype, a non-CPU
    default device)."""
    import mlx.core as mx

    if not prefill_available() or not hasattr(_ext, "gelu") or mx.default_device() != mx.cpu:
        return None
    if x.dtype != mx.float32:
        return None
    return _ext.gelu(x)


def logsumexp(x: Any) -> Any:
    """`mx.logsumexp(x, axis=-1, keepdims=True)` for float32, float16 or bfloat16 x through the extension: MLX's
    CPU algorithm (the maximum, MLX's exp, the exponentials summed in index order, log + max), bit for bit, with
    the exponentials 8 lanes at a time and the rows over the thread pool. MLX's CPU runs it one element at a time
    with a libm fma call per polynomial term: ~1.7 ms for a row of 131,072 logits, ~0.3 ms here. None where it
    does not apply (no extension, other dtypes, an empty array, a non-CPU default device or stream)."""
    import mlx.core as mx

    if not prefill_available() or not hasattr(_ext, "logsumexp") or mx.default_device() != mx.cpu:
        return None
    if x.dtype not in (mx.float32, mx.float16, mx.bfloat16) or x.ndim < 1 or x.size == 0:
        return None
    return _ext.logsumexp(x)


def decode_attention(q: Any, k: Any, v: Any, *, scale: float) -> Any:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale)` for one float32 query per head, (B, H, 1, D), over
    float32 (B, Hkv, L, D) keys and values (a KV cache; GQA): `quantized_decode_attention`'s kernel reading the
    rows where they are, per (batch, kv head), on every core. The same values up to float32 rounding (~1e-7).
    None where it does not apply (no extension, other dtypes or head_dim, a non-CPU default device)."""
    import mlx.core as mx

    if not prefill_available() or not hasattr(_ext, "decode_attention") or mx.default_device() != mx.cpu:
        return None
    d = q.shape[-1]
    if any(a.dtype != mx.float32 or a.ndim != 4 for a in (q, k, v)) or q.shape[2] != 1 or not _head_dim_ok(d):
        return None
    if k.shape != v.shape or k.shape[-1] != d or q.shape[1] % k.shape[1]:
        return None
    return _ext.decode_attention(q, k, v, scale=scale)


def quantized_decode_attention(q: Any, keys: Any, values: Any, *, scale: float, group_size: int, bits: int) -> Any:
    """mlx-lm's `quantized_scaled_dot_product_attention` (no mask) for one float32 query per head, (B, H, 1, D),
    over a `QuantizedKVCache`'s `(codes, scales, biases)` keys and values: per (batch, kv head) the keys are
    dequantized 64 at a time into a small buffer (bit for bit MLX's values), scored against the kv head's query
    heads, softmaxed, and the values summed the same way, on every core. mlx-lm's path runs two
    `mx.quantized_matmul`s, slow on MLX's CPU. The same values up to float32 rounding (~1e-7). None where it does
    not apply (no extension, other dtypes, bits or head_dim, a non-CPU default device)."""
    import mlx.core as mx

    if not prefill_available() or not hasattr(_ext, "quantized_decode_attention") or mx.default_device() != mx.cpu:
        return None
    d = q.shape[-1]
    if q.dtype != mx.float32 or q.ndim != 4 or q.shape[2] != 1 or bits not in (4, 8) or not _head_dim_ok(d):
        return None
    if group_size % 32 or d % group_size or len(keys) != 3 or len(values) != 3:
        return None
    return _ext.quantized_decode_attention(q, *keys, *values, scale=scale, group_size=group_size, bits=bits)


def attention(q: Any, k: Any, v: Any, *, scale: float, causal: bool) -> Any:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale, mask=None or "causal")` for float32 (B, H, Lq, D)
    queries and (B, Hkv, Lk, D) keys and values (GQA), by the extension's blocked kernel: per block of 64 queries
    of one head it walks the keys 256 at a time with an online softmax (FlashAttention's), so the score matrix is
    never written out and the work runs on every core (csrc/qmv/prefill_avx2.cpp). The same values up to float32
    rounding (~1e-6). None where it does not apply (no extension, other dtypes, head_dim not a multiple of the
    kernel's 16 or above 256, a non-CPU default device)."""
    import mlx.core as mx

    if not prefill_available() or mx.default_device() != mx.cpu:
        return None
    if any(a.dtype != mx.float32 or a.ndim != 4 for a in (q, k, v)):
        return None
    if not _head_dim_ok(q.shape[-1]) or q.shape[1] % k.shape[1] or (causal and q.shape[2] > k.shape[2]):
        return None
    return _ext.attention(q, k, v, scale=scale, causal=causal)
