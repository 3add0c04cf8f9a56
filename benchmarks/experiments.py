"""Profiling experiments behind the benchmark's recommendations (patches from `patches.py`, nothing edited).

    python benchmarks/run.py --keep-checkpoints          # leaves OUT/checkpoints/mlx-4bit
    python benchmarks/experiments.py kernels             # one 14336x5120 matrix, no checkpoint needed
    python benchmarks/experiments.py compare --model benchmarks/out/checkpoints/mlx-4bit \
        --patches dequant-streams lm-attention-streams dequant-streams+lm-attention-streams

`compare` runs the benchmark's `ours` job (same plan, same extrapolation) on a checkpoint as the library is,
then with patches installed before loading, in alternating processes, and prints the full-depth figures;
`ab` switches patch sets round by round in one process. `kernels` times the pieces on one 14336x5120
matrix (mx.dequantize against the library's `cpu.dequantize_affine`, quantized matmul, GEMM, GEMV).
The patches and what was adopted are listed in `patches.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from patches import PATCHES, apply  # noqa: E402
from timing import best  # noqa: E402

import pixtral_mlx  # noqa: E402,F401  (before any mlx import below: on Linux it preloads the BLAS)

KERNEL_REPEATS = 3  # timed runs per piece in `kernels` (best of)


# ---------------------------------------------------------------------------------------------


def kernels(args: argparse.Namespace) -> dict:
    """One decoder FFN matrix (14336 x 5120): dequantization, prefill GEMM, decode GEMV."""
    import mlx.core as mx

    from pixtral_mlx.cpu import dequantize_affine

    rows, cols = 14336, 5120
    w = mx.random.normal((rows, cols)) * 0.02
    wq, s, b = mx.quantize(w, 64, 4)
    mx.eval(wq, s, b)
    del w
    out: dict[str, Any] = {"matrix": [rows, cols]}
    ref = mx.dequantize(wq, s, b, group_size=64, bits=4)
    out["fast_equals_mx_dequantize"] = bool(mx.array_equal(ref, dequantize_affine(wq, s, b, 64, 4)).item())
    out["max_abs_diff"] = float(mx.abs(ref - dequantize_affine(wq, s, b, 64, 4)).max().item())
    del ref
    out["mx_dequantize_s"] = best(lambda: mx.eval(mx.dequantize(wq, s, b, group_size=64, bits=4)), KERNEL_REPEATS)
    out["fast_dequantize_s"] = best(lambda: mx.eval(dequantize_affine(wq, s, b, 64, 4)), KERNEL_REPEATS)
    for m in (1, 4, 16, 128):
        xm = mx.random.normal((m, cols))
        mx.eval(xm)
        out[f"quantized_matmul_{m}_s"] = best(
            lambda xm=xm: mx.eval(mx.quantized_matmul(xm, wq, s, b, transpose=True, group_size=64, bits=4)),
            KERNEL_REPEATS,
        )
    x = mx.random.normal((128, cols))
    wd = mx.dequantize(wq, s, b, group_size=64, bits=4)
    mx.eval(x, wd)
    out["gemm_128_s"] = best(lambda: mx.eval(x @ wd.T), KERNEL_REPEATS)
    # Decode: the same GEMV split over two CPU streams (each stream has its own thread).
    x = mx.random.normal((1, cols))
    h = rows // 2
    halves = [(wq[:h], s[:h], b[:h]), (wq[h:], s[h:], b[h:])]
    mx.eval(x, halves)
    streams = [mx.new_stream(mx.default_device()) for _ in range(2)]

    def two() -> None:
        ys = []
        for st, (a, c, d) in zip(streams, halves):
            with mx.stream(st):
                ys.append(mx.quantized_matmul(x, a, c, d, transpose=True, group_size=64, bits=4))
        mx.eval(ys)

    out["quantized_matmul_1_two_streams_s"] = best(two, KERNEL_REPEATS)
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
    for _ in range(args.repeats):
        for name, patch_names in variants:
            spec = {
                "kind": "ours",
                "label": f"exp-{len(out['runs'])}",
                "model": str(model),
                "text_layers": L,
                "vision_layers": M,
                "settings": settings,
                "chat": True,
                "patches": patch_names,
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
        for name, patch_names in variants:
            apply(patch_names)
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


def vision(args: argparse.Namespace) -> dict:
    """The vision encoder at Pixtral-12B's widths (random weights, 2 layers, CPU classes as the library
    installs them): several images in one `encode_images` call against one call per image."""
    from pixtral_mlx import backend  # first: it preloads the optimized BLAS before mlx is imported
    from pixtral_mlx.models.pixtral.args import VISION_DEFAULTS, PixtralArgs
    from pixtral_mlx.models.pixtral.model import Model

    cfg = {"vision_config": {**VISION_DEFAULTS, "num_hidden_layers": 2}, "text_config": {"num_hidden_layers": 1,
           "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 64}}  # fmt: skip
    import mlx.core as mx

    model = Model(PixtralArgs.from_hf_config(cfg))
    backend.prepare(model)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    cases = [(8, 128), (4, 256), (2, 512), (4, 512), (2, 1024)]
    rows = ["| images | one call, s | one call per image, s | per image ÷ one call |", "|---|---|---|---|"]
    out: dict[str, Any] = {}
    for n, side in cases:
        imgs = [rng.standard_normal((3, side, side)).astype(np.float32) for _ in range(n)]
        together = best(lambda imgs=imgs: mx.eval(model.encode_images(imgs)), args.repeats)
        apart = best(lambda imgs=imgs: mx.eval([model.encode_images([i]) for i in imgs]), args.repeats)
        out[f"{n}x{side}"] = {"one_call_s": together, "per_image_s": apart}
        rows.append(f"| {n} × {side}² | {together:.3f} | {apart:.3f} | {apart / together:.2f}× |")
    out["table"] = "\n".join(rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kernels", "compare", "ab", "vision"])
    ap.add_argument(
        "--model",
        default=str(HERE / "out" / "checkpoints" / "mlx-4bit"),
        help="an MLX checkpoint (compare); run.py --keep-checkpoints leaves one",
    )
    ap.add_argument(
        "--patches",
        nargs="*",
        default=["dequant-streams", "lm-attention-streams", "dequant-streams+lm-attention-streams"],
        help=f"variants to compare, each a '+'-joined list of: {', '.join(PATCHES)}",
    )
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs/rounds of every variant (best kept)")
    ap.add_argument("--tokens", type=int, default=1024, help="ab: text prompt length")
    ap.add_argument("--extra-tokens", type=int, nargs="*", default=[], help="also prefill prompts of these lengths")
    ap.add_argument("--quick", action="store_true", help="the benchmark's --quick settings")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = ap.parse_args()
    res = {"kernels": kernels, "compare": compare, "ab": ab, "vision": vision}[args.what](args)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=str))
    if "table" in res:
        print(res["table"])
    else:
        print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
