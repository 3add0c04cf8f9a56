"""Profiling experiments behind the benchmark's recommendations (monkeypatches, nothing edited).

    python benchmarks/run.py --keep-checkpoints          # leaves OUT/checkpoints/mlx-4bit
    python benchmarks/experiments.py kernels             # one 14336x5120 matrix, no checkpoint needed
    python benchmarks/experiments.py compare --model benchmarks/out/checkpoints/mlx-4bit \
        --patches fast-dequant dequant-streams+lm-attention-streams

`compare` runs the benchmark's `ours` job (same plan, same extrapolation) on a checkpoint as the library is,
then with patches installed before loading, in alternating processes, and prints the full-depth figures:
- `fast-dequant`: the affine 4/8-bit dequantization of `DequantizingQuantizedLinear`'s prefill path as
  shifts, masks and a multiply-add in MLX ops instead of `mx.dequantize` (~2x faster on CPU, bit-identical);
- `dequant-streams`: the same, row blocks dequantized on the CPU streams (`backend.cpu_streams`);
- `lm-attention-streams`: the decoder's prompt attention (mlx-lm's) split by kv-head groups over the streams.
Two earlier patches (decode matmuls split by rows, vision attention split by heads, over one CPU stream per
core) were adopted by the library in c405613. `kernels` times the pieces on one 14336x5120 matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


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


def cpu_streams() -> list[Any]:
    """The library's per-thread CPU streams (one per core; [] off the CPU backend)."""
    from pixtral_mlx import backend

    return backend.cpu_streams()


def _row_splits(n: int, parts: int) -> list[tuple[int, int]]:
    b = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]


def split_sdpa(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None, **kw: Any) -> Any:
    """mx.fast.scaled_dot_product_attention with the kv-head groups spread over the CPU streams.

    The CPU fallback materializes the scores and runs a single-threaded softmax whose exp dominates;
    heads are independent, so each core takes a share (GQA: a kv head with its query heads).
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
            m = mask[:, a * rep : b * rep]
        with mx.stream(st):
            outs.append(
                mx.fast.scaled_dot_product_attention(q[:, a * rep : b * rep], k[:, a:b], v[:, a:b], scale=scale, mask=m)
            )
    return mx.concatenate(outs, axis=1)


_ORIGINAL: dict[str, Any] = {}


def patched_linear_call(self: Any, x: Any) -> Any:
    """`DequantizingQuantizedLinear.__call__`, prefill path changed by the patches in `ACTIVE`."""
    import mlx.core as mx

    from pixtral_mlx import backend

    if x.size // x.shape[-1] < backend.DEQUANT_MIN_TOKENS or not (self.mode == "affine" and self.bits in (4, 8)):
        return _ORIGINAL["linear"](self, x)  # the library's own path (decode: split over the streams)
    streams = cpu_streams() if "dequant-streams" in ACTIVE else []
    if len(streams) >= 2:
        # Dequantize row blocks on the CPU streams (the elementwise kernels are single-threaded).
        ws = []
        for st, (lo, hi) in zip(streams, _row_splits(self["weight"].shape[0], len(streams))):
            with mx.stream(st):
                ws.append(
                    fast_dequantize(
                        self["weight"][lo:hi], self["scales"][lo:hi], self["biases"][lo:hi], self.group_size, self.bits
                    )
                )
        y = mx.concatenate([x @ w.astype(x.dtype).T for w in ws], axis=-1)
    else:
        w = fast_dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        y = x @ w.astype(x.dtype).T
    if "bias" in self:
        y = y + self["bias"]
    return y


def patched_lm_sdpa(
    queries: Any, keys: Any, values: Any, cache: Any, scale: float, mask: Any, sinks: Any = None
) -> Any:
    """mlx-lm's `scaled_dot_product_attention` with `split_sdpa` for prompts (several queries)."""
    from mlx_lm.models import base

    if hasattr(cache, "bits") or queries.shape[2] == 1:
        return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    return split_sdpa(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


PATCHES = {
    "fast-dequant": "prefill path: dequantize with shifts/masks in MLX ops instead of mx.dequantize",
    "dequant-streams": "prefill path: fast-dequant of row blocks on the CPU streams (implies fast-dequant)",
    "lm-attention-streams": "decoder prompt attention split by kv-head groups over the CPU streams",
}
# Adopted by the library in c405613 (measured here before): decode quantized matmuls split by rows
# and vision attention split by heads over the CPU streams.
ACTIVE: set[str] = set()


def apply(names: list[str]) -> None:
    """Install exactly the named patches (the others are removed); can be called at any time."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown patch {sorted(unknown)[0]!r}; known: {', '.join(PATCHES)}")
    from mlx_lm.models import llama

    from pixtral_mlx import model as pm

    _ORIGINAL.setdefault("linear", pm.DequantizingQuantizedLinear.__call__)
    _ORIGINAL.setdefault("lm_sdpa", llama.scaled_dot_product_attention)
    pm.DequantizingQuantizedLinear.__call__ = _ORIGINAL["linear"]
    llama.scaled_dot_product_attention = _ORIGINAL["lm_sdpa"]
    ACTIVE.clear()
    ACTIVE.update(names)

    if ACTIVE & {"fast-dequant", "dequant-streams"}:
        pm.DequantizingQuantizedLinear.__call__ = patched_linear_call
    if "lm-attention-streams" in ACTIVE:
        llama.scaled_dot_product_attention = patched_lm_sdpa


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
        out[f"quantized_matmul_{m}_s"] = best(
            lambda: mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4))
        )
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
            spec = {
                "kind": "ours",
                "label": f"exp-{len(out['runs'])}",
                "model": str(model),
                "text_layers": L,
                "vision_layers": M,
                "settings": settings,
                "chat": True,
                "patches": patches,
                "extra_prompt_tokens": args.extra_tokens,
            }
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
    rows = [
        ("vision 512², s @24", ("vision_512", "full_s"), True),
        ("vision 1024², s @24", ("vision_1024", "full_s"), True),
        ("prefill text, tok/s @40", ("prefill_text", "full_tps"), False),
        ("prefill 512² image prompt, tok/s @40", ("prefill_image", "full_tps"), False),
        ("decode, tok/s @40", ("decode", "full_tps"), False),
        ("chat turn 1 (1024² image), s @40/24", ("chat", "full", "first_s"), True),
        ("chat turn 2, s @40/24", ("chat", "full", "second_s"), True),
        ("turn 2 ÷ turn 1 @40/24", ("chat", "full", "ratio"), True),
    ]
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


def ab(args: argparse.Namespace) -> dict:
    """In one process, one loaded model: prefill times with the patch sets switched round by round.

    Much less exposed to other processes than `compare` (every variant sees the same moments of the
    machine's load, and the minimum over rounds is kept). Prompts: ~1K text tokens and a 1024² image
    prompt (4170 tokens, vision features cached), at depth 1 and L; per-layer = t(L) - t(1) / (L - 1).
    """
    from measure import Ours, image_message, text_of_tokens

    rt = Ours(args.model)
    L = len(rt.text_layers)
    text = rt.encode([{"role": "user", "content": text_of_tokens(lambda m: rt.encode(m).tokens, args.tokens)}])
    image = rt.encode(image_message(1024, 7))
    rt.features(image)
    variants = [("as is", [])] + [(" + ".join(p), p) for p in (x.split("+") for x in args.patches)]
    samples: dict[str, dict[str, list[float]]] = {n: {} for n, _ in variants}
    rt.generate(text, max_tokens=1)  # warm-up
    for r in range(args.repeats):
        for name, patches in variants:
            apply(patches)
            for label, prompt in (("text", text), ("image", image)):
                for depth in (1, L):
                    rt.set_depth(text=depth)
                    t = rt.generate(prompt, max_tokens=1)["ttft_s"]
                    samples[name].setdefault(f"{label}@{depth}", []).append(t)
            print(
                f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples[name].items()),
                file=sys.stderr,
                flush=True,
            )
    apply([])
    out: dict[str, Any] = {"layers": L, "tokens": {"text": len(text), "image": len(image)}, "samples": samples}
    lines = [
        f"| per decoder layer (min of {args.repeats} rounds) | " + " | ".join(n for n, _ in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for label in ("text", "image"):
        per = {n: (min(v[f"{label}@{L}"]) - min(v[f"{label}@1"])) / (L - 1) for n, v in samples.items()}
        base = per["as is"]
        cells = [f"{per[n]:.2f} s" + ("" if n == "as is" else f" ({base / per[n]:.2f}×)") for n, _ in variants]
        lines.append(f"| prefill {out['tokens'][label]} tokens | " + " | ".join(cells) + " |")
        out[f"per_layer_{label}"] = per
    out["table"] = "\n".join(lines)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kernels", "compare", "ab"])
    ap.add_argument(
        "--model",
        default=str(HERE / "out" / "checkpoints" / "mlx-4bit"),
        help="an MLX checkpoint (compare); run.py --keep-checkpoints leaves one",
    )
    ap.add_argument(
        "--patches",
        nargs="*",
        default=["fast-dequant", "dequant-streams", "lm-attention-streams", "dequant-streams+lm-attention-streams"],
        help=f"variants to compare, each a '+'-joined list of: {', '.join(PATCHES)}",
    )
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs/rounds of every variant (best kept)")
    ap.add_argument("--tokens", type=int, default=1024, help="ab: text prompt length")
    ap.add_argument("--extra-tokens", type=int, nargs="*", default=[], help="also prefill prompts of these lengths")
    ap.add_argument("--quick", action="store_true", help="the benchmark's --quick settings")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args()
    res = {"kernels": kernels, "compare": compare, "ab": ab}[args.what](args)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    if "table" in res:
        print(res["table"])
    else:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
