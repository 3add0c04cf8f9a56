"""What the benchmarks time with: best-of-N wall time, and memory read bandwidth measured one way for all.

The bandwidth pieces are numpy sums of one float32 buffer on one thread and split over N threads, and an MLX
sum. `qmv.py`'s `bandwidth` (the decode bound; `decode40.py` uses it too) and `measure.py`'s "bandwidth"
job (which `run.py` turns into its bound) both measure with them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import pixtral_mlx  # noqa: F401  (before mlx, which mlx_sum_gbps imports: the BLAS preload)


def best(f: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of `repeats` timed calls of f, after one untimed call (on a shared machine
    best-of filters the interference)."""
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def numpy_sums(b: np.ndarray, threads: int, repeats: int) -> dict:
    """Read GB/s of `b.sum()` on one thread, and of the sums of b split into `threads` parts, one thread each."""
    out = {"numpy_sum_gbps": b.nbytes / best(b.sum, repeats) / 1e9}
    parts = np.array_split(b, threads)

    def par() -> None:
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    out["numpy_threads"] = threads
    out["numpy_threads_sum_gbps"] = b.nbytes / best(par, repeats) / 1e9
    return out


def mlx_sum_gbps(a: Any, repeats: int) -> float:
    """Read GB/s of an MLX sum of the (evaluated) array a, on the default device."""
    import mlx.core as mx

    return a.nbytes / best(lambda: mx.eval(a.sum()), repeats) / 1e9


GEMM_PEAK_SHAPES = ((4096, 4096, 4096), (2048, 5120, 14336))  # (m, k, n): square, and a prefill-sized FFN


def gemm_peak(repeats: int, shapes: tuple[tuple[int, int, int], ...] = GEMM_PEAK_SHAPES) -> dict:
    """The f32 GEMM peak of this machine as MLX reaches it: `mx.matmul` on large f32 shapes, best of `repeats`
    for each, the fastest shape kept. Issue 24's prefill and vision ratios are taken against it."""
    import mlx.core as mx

    out: dict[str, Any] = {"gflops": 0.0, "shapes": {}}
    for m, k, n in shapes:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        rate = 2 * m * k * n / best(lambda a=a, b=b: mx.eval(a @ b), repeats) / 1e9
        out["shapes"][f"{m}x{k}x{n}"] = rate
        if rate > out["gflops"]:
            out["gflops"], out["shape"] = rate, f"{m}×{k} @ {k}×{n}"
        del a, b
    return out
