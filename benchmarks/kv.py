"""KV-cache bits at Pixtral-12B's real widths: bytes per token, decode speed, and the longest context in 16 GB.

    python benchmarks/kv.py [--contexts 4096 32768] [--tokens 16] [--json out.json]

- KV bytes per token, measured from mlx-lm's caches (`nbytes` / positions) filled at the real widths
  (8 KV heads of 128), in bfloat16 (Metal) and float32 (this CPU backend), unquantized and at 8 and 4 bits.
- Decode speed: 2 full-width decoder layers (5120 wide, 4-bit weights, random) decode one token against a
  cache filled to each context length; the time per token is scaled by 40/2 to the 40-layer decoder (the
  embedding and the output head are left out: they do not depend on the KV bits).
- The longest context that fits in 16 GB with 4-bit weights: the memory plan (`pixtral_mlx.memory`) of a
  text prompt of N tokens on Metal, with the weights of the whole 4-bit model (measured from its parameters,
  built lazily: nothing is allocated), the measured KV bytes per token, and a 16 GB Mac's recommended working
  set (11,453,251,584 bytes, what Metal reports on 16 GB M-series Macs), searched by bisection.

Standalone (not part of benchmarks/run.py): a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pixtral_mlx  # noqa: E402,F401  (preloads the optimized BLAS before mlx)

LAYERS = 40
WORKING_SET_16GB = 11_453_251_584
SETTINGS = [(None, "16 (bf16/fp32)"), (8, "8"), (4, "4")]


def make_cache(bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    return KVCache() if bits is None else QuantizedKVCache(group_size=64, bits=bits)


def fill(cache, n, dtype, chunk=4096):
    import mlx.core as mx

    for lo in range(0, n, chunk):
        k = mx.random.normal((1, 8, min(chunk, n - lo), 128)).astype(dtype)
        cache.update_and_fetch(k, k * 0.5)
        mx.eval(cache.state)


def kv_bytes_per_token():
    import mlx.core as mx

    out = {}
    for dtype in (mx.bfloat16, mx.float32):
        for bits, _ in SETTINGS:
            cache = make_cache(bits)
            fill(cache, 1024, dtype)  # a multiple of the 256-position allocation step: no spare room
            out[f"{str(dtype).split('.')[-1]}/{bits or 16}"] = cache.nbytes / 1024 * LAYERS  # 1024 positions
    return out


def swap_cpu_classes(model):
    """The library's CPU classes (`backend.prepare`'s swap: the decode kernel, `cpu.decode_attention`, the quantized
    KV kernel), so that the timings are those of what the library runs."""
    from pixtral_mlx import backend

    if backend.on_cpu():
        from pixtral_mlx.cpu import install

        install(model)


def decode_speed(contexts, tokens):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from pixtral_mlx.models.pixtral.args import TEXT_DEFAULTS

    args = llama.ModelArgs.from_dict({**TEXT_DEFAULTS, "model_type": "llama", "num_hidden_layers": 2,
                                      "vocab_size": 256, "tie_word_embeddings": False})  # fmt: skip
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    model.set_dtype(mx.float32)  # CPU: compute in float32 (backend.compute_dtype)
    mx.eval(model.parameters())
    swap_cpu_classes(model)
    rows = []
    for ctx in contexts:
        for bits, label in SETTINGS:
            caches = [make_cache(bits) for _ in model.model.layers]
            for c in caches:
                fill(c, ctx, mx.float32)
            h = mx.random.normal((1, 1, args.hidden_size))
            times = []
            for i in range(tokens + 2):
                tic = time.perf_counter()
                x = h
                for layer, c in zip(model.model.layers, caches):
                    x = layer(x, mask=None, cache=c)
                mx.eval(x)
                if i >= 2:  # warm-up
                    times.append(time.perf_counter() - tic)
            per_token = sorted(times)[len(times) // 2] * LAYERS / 2
            rows.append({"context": ctx, "kv_bits": label, "s_per_token_40_layers": per_token,
                         "tokens_per_s": 1 / per_token})  # fmt: skip
            del caches
    return rows


def longest_context(limit=WORKING_SET_16GB):
    """Bisection on the memory plan's total for a text prompt (max_tokens 512) on Metal in bf16."""
    import mlx.core as mx
    import mlx.nn as nn

    from pixtral_mlx import backend, memory
    from pixtral_mlx.models.pixtral.args import TEXT_DEFAULTS, VISION_DEFAULTS, PixtralArgs
    from pixtral_mlx.models.pixtral.model import Model
    from pixtral_mlx.pipeline import Pixtral
    from pixtral_mlx.prompt import Prompt

    model = Model(PixtralArgs.from_hf_config({"text_config": TEXT_DEFAULTS, "vision_config": VISION_DEFAULTS}))
    nn.quantize(model, group_size=64, bits=4)  # what `convert -q` makes; lazily built, never evaluated
    model.set_dtype(mx.bfloat16)
    pixtral = Pixtral(model, encoder=None)
    # Plan as on Metal (fused attention, bf16 KV), then put the CPU back for the decode timings.
    saved = backend.on_cpu, os.environ.get(memory.LIMIT_ENV)
    backend.on_cpu = lambda: False
    os.environ[memory.LIMIT_ENV] = str(limit / 1e9)
    out = {"weights_gb": memory.weights_bytes(model) / 1e9, "limit_gb": limit / 1e9}
    try:
        for bits, label in SETTINGS:
            lo, hi = 1, 131_072 - 512
            while lo < hi:
                mid = (lo + hi + 1) // 2
                plan = memory.estimate(pixtral, Prompt(tokens=[1] * mid), keep=0, max_tokens=512, kv_bits=bits,
                                       kv_group_size=64)  # fmt: skip
                lo, hi = (mid, hi) if plan.fits else (lo, mid - 1)
            out[f"kv {label}"] = lo + 512
    finally:
        backend.on_cpu = saved[0]
        if saved[1] is None:
            os.environ.pop(memory.LIMIT_ENV, None)
        else:
            os.environ[memory.LIMIT_ENV] = saved[1]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = {"kv_bytes_per_token": kv_bytes_per_token(), "longest_context_16gb": longest_context()}
    print("KV cache, bytes per token (40 layers):")
    for k, v in result["kv_bytes_per_token"].items():
        print(f"  {k:>14}: {v:9,.0f}")
    print("Longest context in 16 GB (4-bit weights, Metal's 16 GB working set, memory plan):")
    for k, v in result["longest_context_16gb"].items():
        print(f"  {k:>14}: {v:,.2f}" if isinstance(v, float) else f"  {k:>14}: {v:,} tokens")
    result["decode"] = decode_speed(args.contexts, args.tokens)
    print("Decode, 40 layers extrapolated from 2 (CPU, 4-bit weights, float32):")
    for r in result["decode"]:
        print(f"  context {r['context']:>6,}  kv {r['kv_bits']:>14}: {r['tokens_per_s']:6.2f} tok/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
