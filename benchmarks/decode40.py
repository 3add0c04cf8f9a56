"""End-to-end decode at the full 40 decoder layers on the CPU: `python benchmarks/decode40.py CHECKPOINT`.

`run.py` times decode at depths 1 and 2 and extrapolates. On a machine whose last-level cache holds a
good part of a 2-layer model (this one reports 480 MB of L3), the shallow depths read partly from cache
and the extrapolation is off. This script measures the real thing instead: it loads a (few-layer,
real-width) 4-bit checkpoint made by `run.py`'s synthetic writer and our converter, replaces its decoder
layers with 40 freshly quantized random layers of the same shape (4-bit, group 64, bf16 scales, as our
converter writes them), prepares them exactly as `pixtral_mlx.load` does (CPU classes, huge pages), and
times greedy decode through the library's token loop (`stream_tokens`), next to the memory-bandwidth
bound measured in the same process (numpy sums over 1 and 2 threads, as `qmv.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

import pixtral_mlx  # noqa: F401  (before mlx: it chooses the BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from qmv import bandwidth  # this folder: the same bound qmv.py prints

from pixtral_mlx import backend, cpu_kernel
from pixtral_mlx.cpu import install
from pixtral_mlx.generate import Options, stream_tokens


def bound_gbps() -> float:
    return bandwidth(1 << 30, 2, 5)["bound_gbps"]


LAYERS = 40


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a 4-bit MLX checkpoint at the real widths (any depth)")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    if not backend.on_cpu():
        print("this measures the CPU backend", file=sys.stderr)
        return 1
    px = pixtral_mlx.load(args.checkpoint)
    lm = px.model.language_model
    block = type(lm.model.layers[0])
    t = time.perf_counter()
    layers = []
    for i in range(LAYERS):
        blk = block(lm.args)  # float weights, lazy: replaced below before anything evaluates them
        nn.quantize(blk, group_size=64, bits=4)
        blk.set_dtype(mx.float32)
        for j, (_, m) in enumerate(blk.named_modules()):
            if isinstance(m, nn.QuantizedLinear):  # random codes and bf16 scales, as our converter writes them
                key = mx.random.key(1000 * i + j)
                k1, k2, k3 = mx.random.split(key, 3)
                n, words = m.weight.shape
                hi, lo = mx.random.randint(0, 1 << 16, (2, n, words), dtype=mx.uint32, key=k1)
                shape = m.scales.shape
                m.update(
                    {
                        "weight": (hi << 16) | lo,
                        "scales": (mx.random.normal(shape, key=k2) * 0.01).astype(mx.bfloat16),
                        "biases": (mx.random.normal(shape, key=k3) * 0.01).astype(mx.bfloat16),
                    }
                )
        mx.eval(blk.parameters())
        install(blk)  # the CPU classes, and the weights laid out as load lays them out
        layers.append(blk)
    lm.model.layers = layers
    mx.clear_cache()
    print(f"built {LAYERS} random 4-bit layers in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    pages = backend.place_weights(px.model)
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
    pages += f"; AnonHugePages {meminfo.get('AnonHugePages', '?').strip()}"
    ext = cpu_kernel.extension()
    missed: dict[str, int] = {}
    for name, a in tree_flatten(px.model.parameters()):
        total, advised, collapsed, err = ext.huge_pages([a], True)
        if total - collapsed > 4 << 20:
            top = ".".join(name.split(".")[:3])
            missed[top] = missed.get(top, 0) + total - collapsed
    if missed:
        pages += "; not in 2 MiB pages: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in missed.items())
    print(f"{pages} ({time.perf_counter() - t:.0f} s)", flush=True)
    decoder = sum(v.nbytes for _, v in tree_flatten([layer.parameters() for layer in layers]))
    head = sum(v.nbytes for _, v in tree_flatten(lm.lm_head.parameters()))
    token_bytes = decoder + head
    print(
        f"bytes read per token: {token_bytes / 1e9:.2f} GB (40 layers {decoder / 1e9:.2f} + lm_head {head / 1e9:.2f})"
    )
    print(f"device: {backend.device_name()}", flush=True)

    bw0 = bound_gbps()
    prompt = px.encode([{"role": "user", "content": "Write a long story about the sea."}])
    cache = px.model.make_cache()
    steps = stream_tokens(
        px.model,
        px.encoder.detokenizer(),
        prompt.tokens,
        px.embeddings(prompt),
        cache,
        eos_id=-1,
        options=Options(max_tokens=args.tokens + 2, temperature=0.0, top_p=1.0),
    )
    stamps = [time.perf_counter() for _ in steps]
    per_token = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))
    bw1 = bound_gbps()
    bw = max(bw0, bw1)
    bound = bw * 1e9 / token_bytes
    med, best = per_token[len(per_token) // 2], per_token[0]
    print(f"memory read: {bw0:.1f} GB/s before, {bw1:.1f} GB/s after -> bound {bound:.2f} tokens/s")
    print(
        f"decode @40 layers ({len(per_token)} tokens): median {1 / med:.2f} tokens/s ({100 / med / bound:.1f}% of the "
        f"bound), best {1 / best:.2f} tokens/s ({100 / best / bound:.1f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
