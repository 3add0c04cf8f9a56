"""The CPU decode matvec, measured on its own: `python benchmarks/qmv.py [--scales bf16|f32] [--json OUT]`.

In one process and one run:
1. memory read bandwidth (numpy sums over 1 and N threads, an MLX sum): the bound decode is held to;
2. every Pixtral-12B decoder matrix (and lm_head) in 4-bit g64 at one token: time and GB/s of the
   qmv kernel (pixtral_mlx.cpu_kernel), of mx.quantized_matmul, and of mx.quantized_matmul split
   over CPU streams (the path decode took before the kernel);
3. decode tokens/s extrapolated to 40 layers + lm_head from those times, next to the bound
   (bytes read per token / bandwidth);
4. rows of x = 1, 2, 4, 8 (batched decoding) through the kernel: time per pass over the weights, in the layout load
   gives the weights (`cpu_kernel.interleaving()`: interleaved, `cpu_kernel.interleave`) and, where that is the
   interleaved one, also in MLX's row-major layout, in the same minutes;
5. prefill (128 tokens through DequantizingQuantizedLinear) with the kernel switched on and off:
   prefill does not use it, so the two must match.

Weights are random packed codes with random scales: speed does not depend on the values. Each matrix
is allocated in as many copies as it takes to exceed --cold-mb (default 1 GiB, above the last-level
cache) and one timing runs them all in turn, so weights come from memory as in real decode, not from
a cache warmed by the previous repeat. Times are the best of --repeats runs (the machine is shared;
best-of filters the interference). As at load (`backend.place_weights`), the copies are backed by huge
pages (`--pages 4k` leaves them in 4 KiB pages, to show what that costs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import pixtral_mlx  # noqa: F401  (before mlx: the BLAS preload)
from pixtral_mlx import backend, cpu, cpu_kernel

# isort: split
import mlx.core as mx  # after pixtral_mlx on purpose
from timing import best, mlx_sum_gbps, numpy_sums  # this folder

LAYERS = 40
HIDDEN, Q_OUT, KV_OUT, FFN, VOCAB = 5120, 4096, 1024, 14336, 131072
# (name, out_features N, in_features K, times per token)
SHAPES = [
    ("q_proj", Q_OUT, HIDDEN, LAYERS),
    ("k_proj", KV_OUT, HIDDEN, LAYERS),
    ("v_proj", KV_OUT, HIDDEN, LAYERS),
    ("o_proj", HIDDEN, Q_OUT, LAYERS),
    ("gate_proj", FFN, HIDDEN, LAYERS),
    ("up_proj", FFN, HIDDEN, LAYERS),
    ("down_proj", HIDDEN, FFN, LAYERS),
    ("lm_head", VOCAB, HIDDEN, 1),
]
BITS, GROUP = 4, 64


def bandwidth(n_bytes: int, threads: int, repeats: int) -> dict:
    """Memory read GB/s (numpy over 1 and `threads` threads, an MLX sum) and the best of them: the bound."""
    b = np.ones(n_bytes // 4, dtype=np.float32)
    out = {"bytes": b.nbytes, **numpy_sums(b, threads, repeats)}
    a = mx.random.uniform(shape=(n_bytes // 4,))
    mx.eval(a)
    out["mlx_sum_gbps"] = mlx_sum_gbps(a, repeats)
    out["bound_gbps"] = max(out["numpy_threads_sum_gbps"], out["numpy_sum_gbps"], out["mlx_sum_gbps"])
    return out


def weights(n: int, k: int, sdtype: Any, seed: int) -> tuple[Any, Any, Any]:
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    hi, lo = mx.random.randint(0, 1 << 16, (2, n, k * BITS // 32), dtype=mx.uint32, key=k1)
    w = (hi << 16) | lo
    scales = (mx.random.normal((n, k // GROUP), key=k2) * 0.01).astype(sdtype)
    biases = (mx.random.normal((n, k // GROUP), key=k3) * 0.01).astype(sdtype)
    mx.eval(w, scales, biases)
    return w, scales, biases


def qmv(x: Any, w: Any, s: Any, b: Any) -> Any:
    return cpu_kernel.quantized_matvec(x, w, s, b, group_size=GROUP, bits=BITS, interleaved=INTERLEAVED)


def qmv_row_major(x: Any, w: Any, s: Any, b: Any) -> Any:
    return cpu_kernel.quantized_matvec(x, w, s, b, group_size=GROUP, bits=BITS)


INTERLEAVED = False  # main(): the weights in the layout load gives them (random codes: the values do not matter)


def qmm(x: Any, w: Any, s: Any, b: Any) -> Any:
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=GROUP, bits=BITS)


def timed(f: Callable[..., Any], x: Any, copies: list[tuple], repeats: int, *extra: Any) -> float:
    """Seconds per call of f(x, w, s, b, *extra), cycling through the copies of (w, s, b)."""

    def run() -> None:
        for wsb in copies:
            mx.eval(f(x, *wsb, *extra))

    return best(run, repeats) / len(copies)


def split_quantized_matmul(x: Any, w: Any, s: Any, b: Any, streams: list[Any]) -> Any:
    """What decode did before the kernel (model.py's fallback): output rows over the CPU streams."""
    parts = []
    for st, (lo, hi) in zip(streams, cpu.splits(w.shape[0], len(streams))):
        with mx.stream(st):
            parts.append(
                mx.quantized_matmul(x, w[lo:hi], s[lo:hi], b[lo:hi], transpose=True, group_size=GROUP, bits=BITS)
            )
    return mx.concatenate(parts, axis=-1)


def prefill_check(sdtype: Any, repeats: int) -> dict:
    """128 tokens through a gate_proj-sized DequantizingQuantizedLinear, kernel on and off."""
    import mlx.nn as nn

    from pixtral_mlx.cpu import DequantizingQuantizedLinear

    layer = nn.QuantizedLinear(HIDDEN, FFN, bias=False, group_size=GROUP, bits=BITS)
    layer.weight, layer.scales, layer.biases = weights(FFN, HIDDEN, sdtype, seed=7)
    layer.__class__ = DequantizingQuantizedLinear
    x = mx.random.normal((1, 128, HIDDEN))
    out = {}
    for setting in ("on", "off"):
        if setting == "off":
            os.environ["PIXTRAL_MLX_QMV"] = "off"
        out[f"kernel_{setting}_s"] = best(lambda: mx.eval(layer(x)), repeats)
    os.environ.pop("PIXTRAL_MLX_QMV", None)
    out["ratio_on_over_off"] = out["kernel_on_s"] / out["kernel_off_s"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", choices=["bf16", "f32"], default="bf16", help="dtype of scales and biases")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=2, help="repeats of the (slow) mx.quantized_matmul paths")
    ap.add_argument("--no-ref", action="store_true", help="skip the mx.quantized_matmul timings")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--cold-mb", type=int, default=1024, help="bytes of weight copies cycled per timing")
    ap.add_argument("--pages", choices=["huge", "4k"], default="huge", help="weights in huge pages, as at load")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    global INTERLEAVED
    INTERLEAVED = cpu_kernel.interleaving()
    sdtype = mx.bfloat16 if args.scales == "bf16" else mx.float32
    if not cpu_kernel.available():
        print(f"qmv kernel not available: {cpu_kernel.reason()}", file=sys.stderr)
        return 1
    cpus = os.cpu_count() or 1
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {cpus} CPUs, load {os.getloadavg()[0]:.1f}",
        "mlx": mx.__version__,
        "blas": backend.BLAS_NOTE,
        "kernel": cpu_kernel.describe(),
        "scales": args.scales,
        "format": f"{BITS}-bit, group size {GROUP}, {args.scales} scales and biases",
        "pages": args.pages,
    }
    print(f"# qmv benchmark: {res['kernel']}; {res['format']}; weights in {args.pages} pages; {res['machine']}")

    bw = bandwidth(args.bandwidth_mb << 20, max(2, cpus), args.repeats)
    res["bandwidth"] = bw
    print(
        f"memory read: numpy {bw['numpy_sum_gbps']:.1f} GB/s (1 thread), {bw['numpy_threads_sum_gbps']:.1f} GB/s "
        f"({bw['numpy_threads']} threads), mlx sum {bw['mlx_sum_gbps']:.1f} GB/s -> bound {bw['bound_gbps']:.1f} GB/s",
        flush=True,
    )

    streams = cpu.cpu_streams()
    rows = []
    x = mx.random.normal((1, HIDDEN))
    print(f"\n{'matrix':10} {'N x K':>14} {'MB':>7} | {'qmv ms':>8} {'GB/s':>6} | ", end="")
    print(f"{'qmm ms':>8} {'GB/s':>6} | {'split ms':>8} {'GB/s':>6} | {'speed-up':>8}", flush=True)
    cache: dict[tuple[int, int], dict] = {}
    for i, (name, n, k, per_token) in enumerate(SHAPES):
        if (n, k) in cache:  # k_proj and v_proj, gate and up: same shape, same times
            rows.append({**cache[(n, k)], "name": name, "per_token": per_token})
            r = rows[-1]
        else:
            copies = [weights(n, k, sdtype, seed=100 * i)]
            nbytes = sum(a.nbytes for a in copies[0])
            while len(copies) * nbytes < args.cold_mb << 20:
                copies.append(weights(n, k, sdtype, seed=100 * i + len(copies)))
            if args.pages == "huge":  # what load does to the model's weights
                pages = cpu_kernel.huge_pages([a for c in copies for a in c])
            else:
                pages = "4 KiB pages"
            x = mx.random.normal((1, k))
            mx.eval(x)
            r = {
                "name": name,
                "pages": pages,
                "n": n,
                "k": k,
                "bytes": nbytes,
                "per_token": per_token,
                "copies": len(copies),
            }
            r["qmv_s"] = timed(qmv, x, copies, args.repeats)
            if not args.no_ref:  # slow: one copy (it is far from any cache effect)
                r["qmm_s"] = timed(qmm, x, copies[:1], args.ref_repeats)
                if len(streams) > 1:
                    r["split_s"] = timed(split_quantized_matmul, x, copies[:1], args.ref_repeats, streams)
            if name in ("gate_proj", "lm_head"):
                r["rows"] = {}
                r["rows_row_major"] = {}
                for m in (1, 2, 4, 8):
                    xm = mx.random.normal((m, k))
                    mx.eval(xm)
                    r["rows"][m] = timed(qmv, xm, copies, args.repeats)
                    if INTERLEAVED:  # the same bytes read as MLX lays them out (as if they were not interleaved)
                        r["rows_row_major"][m] = timed(qmv_row_major, xm, copies, args.repeats)
            del copies
            mx.clear_cache()
            cache[(n, k)] = r
            rows.append(r)

        def cell(key: str, r: dict = r) -> str:
            t = r.get(key)
            return f"{t * 1e3:8.2f} {r['bytes'] / t / 1e9:6.2f}" if t else f"{'-':>8} {'-':>6}"

        speed = f"{r['split_s'] / r['qmv_s']:7.1f}x" if r.get("split_s") else f"{'-':>8}"
        print(
            f"{name:10} {f'{n}x{k}':>14} {r['bytes'] / 1e6:7.1f} | {cell('qmv_s')} | {cell('qmm_s')} | "
            f"{cell('split_s')} | {speed}",
            flush=True,
        )
    res["matrices"] = rows

    # Bandwidth again: other work on a shared machine comes and goes; the bound is the better of the two.
    bw_end = bandwidth(args.bandwidth_mb << 20, max(2, cpus), args.repeats)
    res["bandwidth_end"] = bw_end
    print(f"\nmemory read again: {bw_end['bound_gbps']:.1f} GB/s (start: {bw['bound_gbps']:.1f} GB/s)")
    bw = bw if bw["bound_gbps"] >= bw_end["bound_gbps"] else bw_end
    token_bytes = sum(r["bytes"] * r["per_token"] for r in rows)
    bound_tps = bw["bound_gbps"] * 1e9 / token_bytes
    decode: dict[str, Any] = {"bytes_per_token": token_bytes, "bound_tokens_per_s": bound_tps}
    print(f"\ndecode at {LAYERS} layers + lm_head: {token_bytes / 1e9:.2f} GB of weights per token")
    print(f"  bound ({bw['bound_gbps']:.1f} GB/s): {bound_tps:.2f} tokens/s")
    paths = [("qmv_s", "qmv kernel"), ("split_s", "mx.quantized_matmul over streams"), ("qmm_s", "mx.quantized_matmul")]
    for key, label in paths:
        if all(r.get(key) for r in rows):
            t = sum(r[key] * r["per_token"] for r in rows)
            decode[key.replace("_s", "_tokens_per_s")] = 1 / t
            print(
                f"  {label:34}: {1 / t:6.2f} tokens/s, {token_bytes / t / 1e9:5.1f} GB/s, "
                f"{100 * (1 / t) / bound_tps:5.1f}% of the bound"
            )
    print("  (matrix products only: attention, norms and sampling add a little)")
    res["decode"] = decode

    layout = "interleaved" if INTERLEAVED else "row-major"
    print(f"\nrows of x through the kernel (one pass over the weights for all rows), {layout} weights:")
    with_rows = {r["name"]: r["rows"] for r in rows if r.get("rows")}
    for name, times in with_rows.items():
        t1 = times[1]
        cells = ", ".join(f"M={m}: {t * 1e3:.2f} ms ({t / t1:.2f}x)" for m, t in times.items())
        print(f"  {name:10} {cells}")
    res["rows_of_x"] = with_rows
    res["layout"] = layout
    row_major = {r["name"]: r["rows_row_major"] for r in rows if r.get("rows_row_major")}
    if row_major:
        print("the same rows, row-major weights (MLX's layout), in the same minutes:")
        for name, times in row_major.items():
            t1 = times[1]
            cells = ", ".join(
                f"M={m}: {t * 1e3:.2f} ms ({t / t1:.2f}x; interleaved {t / with_rows[name][m]:.2f}x faster)"
                for m, t in times.items()
            )
            print(f"  {name:10} {cells}")
        res["rows_of_x_row_major"] = row_major

    pf = prefill_check(sdtype, args.repeats)
    res["prefill_128_tokens"] = pf
    print(
        f"\nprefill, 128 tokens through gate_proj (dequantize + BLAS): kernel on {pf['kernel_on_s'] * 1e3:.1f} ms, "
        f"off {pf['kernel_off_s'] * 1e3:.1f} ms (ratio {pf['ratio_on_over_off']:.2f}; the prefill path does not "
        "use the kernel)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
