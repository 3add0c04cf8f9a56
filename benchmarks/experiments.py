"""Profiling experiments behind the benchmark's recommendations (monkeypatches, nothing edited).

    python benchmarks/run.py --keep-checkpoints          # leaves OUT/checkpoints/mlx-4bit
    python benchmarks/experiments.py kernels             # one 14336x5120 matrix, no checkpoint needed
    python benchmarks/experiments.py compare --model benchmarks/out/checkpoints/mlx-4bit \
        --patches fast-dequant fast-dequant+decode-streams+attention-streams

`compare` runs the benchmark's `ours` job (same plan, same extrapolation) on a checkpoint as the library is,
then with patches installed before loading, in alternating processes, and prints the full-depth figures:
- `fast-dequant`: the affine 4/8-bit dequantization of `DequantizingQuantizedLinear` as shifts, masks and a
  multiply-add in MLX ops instead of `mx.dequantize` (whose CPU kernel is ~2x slower), bit-identical;
- `decode-streams`: few-token quantized matmuls split by output rows over one CPU stream per core (MLX runs
  each CPU stream on its own thread; its CPU kernels are single-threaded);
- `attention-streams`: attention split by heads over the same streams (the CPU softmax is single-threaded and
  its exp dominates the vision encoder at 1024²).
`kernels` times the pieces on one 14336x5120 matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pixtral_mlx  # noqa: E402  (BLAS preload before mlx)


def now() -> float:
    return time.perf_counter()


def best(f: Callable[[], Any], repeats: int = 3) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = now()
        f()
        ts.append(now() - t)
    return min(ts)


def fast_dequantize(w: Any, scales: Any, biases: Any, group_size: int, bits: int) -> Any:
    """mx.dequantize for affine 4/8-bit, as elementwise MLX ops (bit-identical values)."""
    import mlx.core as mx

    rows = w.shape[0]
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, cols*bits/32, 32/bits)
    q = q.reshape(rows, -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(rows, -1)


_STREAMS: list[Any] = []


def cpu_streams() -> list[Any]:
    """One stream per core, created once: MLX runs each CPU stream on its own thread."""
    import mlx.core as mx

    if not _STREAMS:
        _STREAMS.extend(mx.new_stream(mx.default_device()) for _ in range(max(os.cpu_count() or 1, 1)))
    return _STREAMS


def _row_splits(n: int, parts: int) -> list[tuple[int, int]]:
    b = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]


def split_sdpa(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None, **kw: Any) -> Any:
    """mx.fast.scaled_dot_product_attention with the kv-head groups spread over the CPU streams.

    The CPU fallback materializes the scores and runs a single-threaded softmax whose exp dominates
    (16 x 4096 x 4096 scores: ~4 s); heads are independent, so each core takes a share.
    """
    import mlx.core as mx

    streams = cpu_streams()
    hk = k.shape[1]
    if len(streams) < 2 or hk < 2 or kw.get("sinks") is not None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, **kw)
    rep = q.shape[1] // hk
    outs = []
    for st, (a, b) in zip(streams, _row_splits(hk, min(len(streams), hk))):
        m = mask
        if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] == q.shape[1]:
            m = mask[:, a * rep:b * rep]
        with mx.stream(st):
            outs.append(mx.fast.scaled_dot_product_attention(q[:, a * rep:b * rep], k[:, a:b], v[:, a:b],
                                                             scale=scale, mask=m))
    return mx.concatenate(outs, axis=1)


def patched_linear_call(self: Any, x: Any) -> Any:
    """`DequantizingQuantizedLinear.__call__` with the patches in `ACTIVE`."""
    import mlx.core as mx
    import mlx.nn as nn
    from pixtral_mlx import backend

    tokens = x.size // x.shape[-1]
    streams = cpu_streams() if "decode-streams" in ACTIVE else []
    if tokens < backend.DEQUANT_MIN_TOKENS:
        if len(streams) < 2:
            return nn.QuantizedLinear.__call__(self, x)
        # Few tokens: the quantized kernel, output rows split over the CPU streams.
        w, s, b = self["weight"], self["scales"], self["biases"]
        ys = []
        for st, (lo, hi) in zip(streams, _row_splits(w.shape[0], len(streams))):
            with mx.stream(st):
                ys.append(mx.quantized_matmul(x, w[lo:hi], s[lo:hi], b[lo:hi], transpose=True,
                                              group_size=self.group_size, bits=self.bits, mode=self.mode))
        y = mx.concatenate(ys, axis=-1)
    else:
        if "fast-dequant" in ACTIVE and self.mode == "affine" and self.bits in (4, 8):
            w = fast_dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        else:
            w = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                              bits=self.bits, mode=self.mode)
        y = x @ w.astype(x.dtype).T
    if "bias" in self:
        y = y + self["bias"]
    return y


def patched_vision_attention(self: Any, x: Any, cos: Any, sin: Any, bounds: list[int]) -> Any:
    """`pixtral_mlx.vision.Attention.__call__` with `split_sdpa`."""
    import mlx.core as mx
    from pixtral_mlx.vision import rotate_half

    B, L, _ = x.shape
    q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
               for p in (self.q_proj, self.k_proj, self.v_proj))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = mx.concatenate([split_sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale=self.scale)
                          for s, e in zip(bounds[:-1], bounds[1:])], axis=2)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def patched_lm_sdpa(queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any,
                    sinks: Any = None) -> Any:
    """mlx-lm's `scaled_dot_product_attention` with `split_sdpa` for prompts (several queries)."""
    from mlx_lm.models import base

    if hasattr(cache, "bits") or queries.shape[2] == 1:
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    return split_sdpa(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


PATCHES = {
    "fast-dequant": "dequantize with shifts/masks in MLX ops instead of mx.dequantize (CPU prefill path)",
    "decode-streams": "few-token quantized matmuls split by output rows over one CPU stream per core",
    "attention-streams": "attention (vision and decoder prompts) split by heads over one CPU stream per core",
}
ACTIVE: set[str] = set()


def apply(names: list[str]) -> None:
    """Install the named patches (call before loading the model)."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown patch {sorted(unknown)[0]!r}; known: {', '.join(PATCHES)}")
    ACTIVE.update(names)
    from pixtral_mlx import model as pm

    if ACTIVE & {"fast-dequant", "decode-streams"}:
        pm.DequantizingQuantizedLinear.__call__ = patched_linear_call
    if "attention-streams" in ACTIVE:
        from mlx_lm.models import llama
        from pixtral_mlx import vision

        vision.Attention.__call__ = patched_vision_attention
        llama.scaled_dot_product_attention = patched_lm_sdpa


def use_fast_dequantize(on: bool) -> None:
    """Toggle `fast-dequant` alone (the in-process experiments below)."""
    from pixtral_mlx.model import DequantizingQuantizedLinear

    if not hasattr(DequantizingQuantizedLinear, "_original_call"):
        DequantizingQuantizedLinear._original_call = DequantizingQuantizedLinear.__call__
    if on:
        ACTIVE.add("fast-dequant")
        DequantizingQuantizedLinear.__call__ = patched_linear_call
    else:
        ACTIVE.discard("fast-dequant")
        DequantizingQuantizedLinear.__call__ = DequantizingQuantizedLinear._original_call


# ---------------------------------------------------------------------------------------------

def kernels(args: argparse.Namespace) -> dict:
    """One decoder FFN matrix (14336 x 5120): dequantization, prefill GEMM, decode GEMV."""
    import mlx.core as mx

    O, I = 14336, 5120
    w = mx.random.normal((O, I)) * 0.02
    wq, s, b = mx.quantize(w, 64, 4)
    mx.eval(wq, s, b)
    del w
    out: dict[str, Any] = {"matrix": [O, I]}
    ref = mx.dequantize(wq, s, b, group_size=64, bits=4)
    out["fast_equals_mx_dequantize"] = bool(mx.array_equal(ref, fast_dequantize(wq, s, b, 64, 4)).item())
    out["max_abs_diff"] = float(mx.abs(ref - fast_dequantize(wq, s, b, 64, 4)).max().item())
    del ref
    out["mx_dequantize_s"] = best(lambda: mx.eval(mx.dequantize(wq, s, b, group_size=64, bits=4)))
    out["fast_dequantize_s"] = best(lambda: mx.eval(fast_dequantize(wq, s, b, 64, 4)))
    for m in (1, 4, 16, 128):
        x = mx.random.normal((m, I))
        mx.eval(x)
        out[f"quantized_matmul_{m}_s"] = best(lambda: mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True,
                                                                                  group_size=64, bits=4)))
    x = mx.random.normal((128, I))
    wd = mx.dequantize(wq, s, b, group_size=64, bits=4)
    mx.eval(x, wd)
    out["gemm_128_s"] = best(lambda: mx.eval(x @ wd.T))
    del wd
    # Decode: the same GEMV split over two CPU streams (each stream has its own thread).
    x = mx.random.normal((1, I))
    h = O // 2
    halves = [(wq[:h], s[:h], b[:h]), (wq[h:], s[h:], b[h:])]
    mx.eval(x, halves)
    streams = [mx.new_stream(mx.default_device()) for _ in range(2)]

    def two() -> None:
        ys = []
        for st, (a, c, d) in zip(streams, halves):
            with mx.stream(st):
                ys.append(mx.quantized_matmul(x, a, c, d, transpose=True, group_size=64, bits=4))
        mx.eval(ys)

    out["quantized_matmul_1_two_streams_s"] = best(two)
    out["weight_bytes_4bit"] = wq.nbytes + s.nbytes + b.nbytes
    out["gemv_gbps"] = out["weight_bytes_4bit"] / out["quantized_matmul_1_s"] / 1e9
    return out


def compare(args: argparse.Namespace) -> dict:
    """The benchmark's `ours` job on one checkpoint, as is and with patches, in alternating processes."""
    import tempfile

    import run

    model = Path(args.model)
    config = json.loads((model / "config.json").read_text())
    L, M = config["text_config"]["num_hidden_layers"], config["vision_config"]["num_hidden_layers"]
    settings = dict(run.SETTINGS["quick" if args.quick else "default"])
    params = {"n_kv_heads": config["text_config"]["num_key_value_heads"], "head_dim": config["text_config"]["head_dim"]}
    variants = [("as is", [])] + [(" + ".join(p), p) for p in (x.split("+") for x in args.patches)]
    work = Path(tempfile.mkdtemp(prefix="experiments-"))
    out: dict[str, Any] = {"model": str(model), "layers": [L, M], "patches": PATCHES, "runs": {}}
    for rep in range(args.repeats):
        for name, patches in variants:
            spec = {"kind": "ours", "label": f"exp-{len(out['runs'])}", "model": str(model), "text_layers": L,
                    "vision_layers": M, "settings": settings, "chat": True, "patches": patches,
                    "extra_prompt_tokens": args.extra_tokens}
            raw = run.run_job(spec, work)
            out["runs"].setdefault(name, []).append({"raw": raw, "summary": run.summarize(raw, L, M, params)})
    out["table"] = _compare_table(out)
    return out


def _best(runs: list[dict], path: tuple[str, ...], lower: bool) -> float | None:
    vals = []
    for r in runs:
        v: Any = r["summary"]
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(v)
    if not vals:
        return None
    return min(vals) if lower else max(vals)


def _compare_table(out: dict) -> str:
    rows = [("vision 512², s @24", ("vision_512", "full_s"), True),
            ("vision 1024², s @24", ("vision_1024", "full_s"), True),
            ("prefill text, tok/s @40", ("prefill_text", "full_tps"), False),
            ("prefill 512² image prompt, tok/s @40", ("prefill_image", "full_tps"), False),
            ("decode, tok/s @40", ("decode", "full_tps"), False),
            ("chat turn 1 (1024² image), s @40/24", ("chat", "full", "first_s"), True),
            ("chat turn 2, s @40/24", ("chat", "full", "second_s"), True),
            ("turn 2 ÷ turn 1 @40/24", ("chat", "full", "ratio"), True)]
    names = list(out["runs"])
    lines = ["| metric (best of runs) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, path, lower in rows:
        vals = [_best(out["runs"][n], path, lower) for n in names]
        base = vals[0]
        cells = []
        for v in vals:
            if v is None:
                cells.append("—")
            elif base and v is not vals[0]:
                gain = (base / v) if lower else (v / base)
                cells.append(f"{v:.4g} ({gain:.2f}×)")
            else:
                cells.append(f"{v:.4g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kernels", "compare"])
    ap.add_argument("--model", default=str(HERE / "out" / "checkpoints" / "mlx-4bit"),
                    help="an MLX checkpoint (compare); run.py --keep-checkpoints leaves one")
    ap.add_argument("--patches", nargs="*", default=["fast-dequant", "fast-dequant+decode-streams+attention-streams"],
                    help=f"variants to compare, each a '+'-joined list of: {', '.join(PATCHES)}")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of every variant (best kept)")
    ap.add_argument("--extra-tokens", type=int, nargs="*", default=[], help="also prefill prompts of these lengths")
    ap.add_argument("--quick", action="store_true", help="the benchmark's --quick settings")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args()
    res = {"kernels": kernels, "compare": compare}[args.what](args)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    if "table" in res:
        print(res["table"])
    else:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
