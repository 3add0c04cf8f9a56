"""Prefill and decode of the Mistral3 family at real widths: Mistral Small 3.x- and Ministral 3 8B-shaped models.

    python benchmarks/family.py [--text-layers 2] [--bits 4] [--out benchmarks/out/family] [--tiny]

The method is run.py's (README.md): for each model a synthetic checkpoint in Mistral's official layout (the real
widths from `pixtral_mlx.catalog`, random bf16 weights, `--text-layers` decoder layers and one vision layer) is
converted with our converter (`--bits`, groups of 64), then measured in its own process by measure.py's job
"ours" (text prefill of a long prompt, image-prompt prefill with cached features, greedy decode), at decoder
depths 1 and L. Full-depth figures are extrapolated per layer to the model's own depth (40 for Mistral Small, 34
for Ministral 3 8B): t(1) + (N - 1) x per-layer. Writes family.json and family.md to --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (this folder: run_job, per_layer, SETTINGS, fmt, gb)
import synthetic  # noqa: E402

from pixtral_mlx.catalog import MISTRAL3_VISION, find  # noqa: E402

MODELS = ("mistral-small-3.1", "ministral-3-8b")
# Ministral 3's params.json blocks (FAMILY.md §3.2, "Official params.json form")
YARN = {"original_max_position_embeddings": 16384, "factor": 16, "apply_scale": False, "beta": 32, "alpha": 1}
TINY = {"hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "vision": 64, "vision_ffn": 128}


def params(name: str, text_layers: int, tiny: bool = False) -> dict:
    """params.json of a `name`-shaped Mistral3 model (catalog widths) with `text_layers` decoder layers and one
    vision layer; Ministral 3 with its YaRN and llama-4 blocks (FAMILY.md §3.2)."""
    m = find(name)
    assert m is not None and m.vision is not None, name
    t, v = m.text, m.vision
    hidden, ffn, heads, kv, hd = (
        (TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"])
        if tiny
        else (t.hidden, t.ffn, t.heads, t.kv_heads, t.head_dim)
    )
    p: dict[str, Any] = {
        "dim": hidden,
        "hidden_dim": ffn,
        "n_heads": heads,
        "n_kv_heads": kv,
        "head_dim": hd,
        "vocab_size": t.vocab,  # the real vocabulary, so that tekken works
        "norm_eps": 1e-5,
        "n_layers": text_layers,
        "tied_embeddings": t.tied,
        "vision_encoder": {
            **synthetic.FULL_VISION,
            "hidden_size": TINY["vision"] if tiny else v.hidden,
            "intermediate_size": TINY["vision_ffn"] if tiny else v.ffn,
            "num_attention_heads": 4 if tiny else v.heads,
            "num_hidden_layers": 1,
            "image_size": 1540,
            "max_image_size": 1540,
            "patch_size": v.patch,
            "adapter_bias": False,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": v.merge,
            "add_pre_mm_projector_layer_norm": True,
        },
    }
    if name.startswith("ministral-3"):
        p.update(
            rope_theta=1e6,
            max_position_embeddings=m.context,
            yarn=YARN,
            llama_4_scaling={"original_max_position_embeddings": 16384, "beta": 0.1},
        )
    else:
        p.update(rope_theta=1e9, max_position_embeddings=m.context)
    return p


def tensor_shapes(p: dict) -> list[tuple[str, tuple[int, ...]]]:
    """synthetic.py's Pixtral tensors, Mistral3's way: no adapter biases, the norm and the 2x2 patch merger."""
    shapes = [(k, s) for k, s in synthetic.tensor_shapes(p) if not k.startswith("vision_language_adapter.w_")]
    if p["tied_embeddings"]:
        shapes = [(k, s) for k, s in shapes if k != "output.weight"]
    vd, d, s = p["vision_encoder"]["hidden_size"], p["dim"], p["vision_encoder"]["spatial_merge_size"]
    return shapes + [
        ("pre_mm_projector_norm.weight", (vd,)),
        ("patch_merger.merging_layer.weight", (vd, vd * s * s)),
        ("vision_language_adapter.w_in.weight", (d, vd)),
        ("vision_language_adapter.w_out.weight", (d, d)),
    ]


def write_checkpoint(folder: Path, name: str, text_layers: int, tiny: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    p = params(name, text_layers, tiny)
    synthetic.write_safetensors(folder / "consolidated.safetensors", tensor_shapes(p))
    (folder / "params.json").write_text(json.dumps(p, indent=2))
    shutil.copyfile(synthetic.tekken_json(), folder / "tekken.json")  # the loader gives it the model's image settings
    return {"params": p, "bytes": (folder / "consolidated.safetensors").stat().st_size}


def full_depth(seconds: dict, L: int, n: int) -> float:
    """Seconds at `n` decoder layers from the times at depth 1 and depth L (run.py's prefill rule, any depth)."""
    return seconds["1"] + (n - 1) * run.per_layer(seconds, 1, L)


def summarize(r: dict, L: int, n: int) -> dict:
    """Measured (depth L) and full-depth (n layers) prefill and decode of one measure.py result."""
    if "error" in r:
        return {"error": r["error"]}
    out: dict[str, Any] = {"decode_kernel": r.get("decode_kernel"), "compute_dtype": r.get("compute_dtype")}
    # other processes on the machine slow a job down: the share of the CPUs it got while it ran
    if r.get("process_cpu_s") and r.get("process_wall_s"):
        out["cpu_share"] = r["process_cpu_s"] / (r["process_wall_s"] * (os.cpu_count() or 1))
    for key in ("prefill_text", "prefill_image"):
        p = r.get(key)
        if not p or p.get("skipped"):
            continue
        full = full_depth(p["seconds"], L, n)
        out[key] = {
            "tokens": p["tokens"],
            "measured_tps": p["tokens"] / p["seconds"][str(L)],
            "full_s": full,
            "full_tps": p["tokens"] / full,
            "per_layer_s": run.per_layer(p["seconds"], 1, L),
        }
    d = r["decode"]["seconds_per_token"]
    full, layer, _ = run.decode_full(r["decode"]["samples"], L, n)  # run.py's paired estimate, at n layers
    out["decode"] = {
        "measured_tps": 1 / d[str(L)],
        "full_s_per_token": full,
        "full_tps": 1 / full,
        "per_layer_s": layer,
    }
    w = r["memory"]["weights"]
    out["weights"] = {
        "measured_bytes": w["total"],
        "text_layer_bytes": w["text_layer"],
        "full_bytes": w["total"] + (n - L) * w["text_layer"] + (MISTRAL3_VISION.layers - 1) * w["vision_layer"],
    }
    return out


def markdown(res: dict) -> str:
    L, bits = res["text_layers"], res["bits"]
    s = res["system"]
    lines = [
        f"Measured on {s['platform']}, {s['cpus']} CPUs, load average {s['load_start']} at start; mlx {s['mlx']}; "
        f"{bits}-bit (groups of 64), {L} decoder layers + 1 vision layer, extrapolated to the model's depth "
        f"({res['settings']['prompt_tokens']}-token text prompt; decode greedy, "
        f"{res['settings']['decode_tokens']} tokens).",
        "",
        f"| model | layers × dim, FFN, heads | text prefill tok/s @{L} | **@full** | image-prompt prefill tok/s "
        f"@full (tokens) | decode tok/s @{L} | **decode tok/s @full** | weights @full GB | CPU share of the job |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        r, p = m["summary"], m["checkpoint"]["params"]
        shape = f"{m['full_layers']} × {p['dim']}, {p['hidden_dim']}, {p['n_heads']}/{p['n_kv_heads']}"
        if "error" in r:
            lines.append(f"| {name} | {shape} | error: {r['error']} |||||||")
            continue
        pt, pi, d = r.get("prefill_text", {}), r.get("prefill_image", {}), r["decode"]
        image = f"{run.fmt(pi.get('full_tps'))} ({pi.get('tokens', '—')})" if pi else "—"
        lines.append(
            f"| {name} | {shape} | {run.fmt(pt.get('measured_tps'))} | **{run.fmt(pt.get('full_tps'))}** | {image} | "
            f"{run.fmt(d['measured_tps'])} | **{run.fmt(d['full_tps'])}** | {run.gb(r['weights']['full_bytes'])} | "
            f"{format(r['cpu_share'], '.0%') if 'cpu_share' in r else '—'} |"
        )
    kernel = next((m["summary"].get("decode_kernel") for m in res["models"].values() if "summary" in m), None)
    lines += [
        "",
        f"Decode kernel: {kernel}. CPU share: the CPU time the measuring process got over its wall time and the "
        f"machine's CPUs (100% on an idle machine; less means other work slowed every figure). Total run time: "
        f"{res['total_wall_s'] / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-layers", type=int, default=2, help="decoder layers in each synthetic checkpoint (≥ 2)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8), help="quantization of the converted models")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "family", help="where family.json/.md go")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which shapes to measure")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test: tiny widths
    args = ap.parse_args(argv)
    if args.text_layers < 2:
        ap.error("per-layer extrapolation needs --text-layers ≥ 2")
    L = args.text_layers
    settings = dict(run.SETTINGS["tiny" if args.tiny else "quick"])
    t_start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = Path(tempfile.mkdtemp(prefix="jobs-", dir=out))
    res: dict[str, Any] = {
        "text_layers": L,
        "bits": args.bits,
        "settings": settings,
        "system": {
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "load_start": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "mlx": metadata.version("mlx"),
        },
        "models": {},
    }
    try:
        for name in args.models:
            work = out / "checkpoints" / name
            shutil.rmtree(work, ignore_errors=True)
            run.log(f"[family] {name}: synthetic checkpoint, {L} decoder layers …")
            ck = write_checkpoint(work / "official", name, L, args.tiny)
            conv = run.run_job(
                {
                    "kind": "convert",
                    "label": f"{name}-convert",
                    "source": str(work / "official"),
                    "output": str(work / "mlx"),
                    "quantize": True,
                    "bits": args.bits,
                },
                jobs,
            )
            full_layers = find(name).text.layers  # type: ignore[union-attr]
            entry: dict[str, Any] = {"checkpoint": ck, "convert": conv, "full_layers": full_layers}
            if (work / "mlx" / "config.json").exists():  # which decoder the converter made of it
                entry["decoder"] = json.loads((work / "mlx" / "config.json").read_text())["text_config"]["model_type"]
            if "error" in conv:
                entry["summary"] = {"error": conv["error"]}
            else:
                spec = {
                    "kind": "ours",
                    "label": f"{name}-ours",
                    "model": str(work / "mlx"),
                    "text_layers": L,
                    "vision_layers": 1,
                    "settings": settings,
                    "measure_vision": False,
                }
                entry["raw"] = run.run_job(spec, jobs)
                entry["summary"] = summarize(entry["raw"], L, full_layers)
            res["models"][name] = entry
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(jobs, ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    res["total_wall_s"] = time.perf_counter() - t_start
    (out / "family.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "family.md").write_text(md)
    print(md)
    return 0 if all("error" not in m["summary"] for m in res["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
