"""Where one decode token's time goes, by op class, at Pixtral-12B's real widths on the CPU backend.

    python benchmarks/decode_profile.py CHECKPOINT [--layers 40] [--repeats 7] [--contexts 0 1024 4096]

CHECKPOINT is a real-width 4-bit MLX checkpoint of any depth (benchmarks/out/checkpoints/mlx-4bit, 1 layer, made
by run.py's synthetic writer and our converter), loaded with `pixtral_mlx.load` (CPU classes, bf16 scales). Each
op class of one decode step runs on its own on the checkpoint's first decoder layer, evaluated, best of
--repeats: the quantized matvecs (q/k/v/o, gate/up/down, lm_head), RMSNorm, RoPE, the SiLU gate and residual
adds, attention over a KV cache of each --contexts length (unquantized, 8- and 4-bit: mlx-lm's caches, as
`Options(kv_bits=...)` makes them), mlx-lm's log-softmax and the samplers (greedy, top-p), the logits
processors (logit_bias, penalties), and detokenization. Per-layer items count --layers times. Graph
construction is the Python time of building a 2-layer step's graph, halved (an upper bound per layer); eval
scheduling is the primitives a layer adds (counted with `mx.export_to_dot`) times MLX's cost per primitive (a
chain of tiny adds).
The whole one-layer step (one lazy graph, one eval) is printed next to the sum of its parts, and the whole
step against a cache of the largest context per KV setting (`kvcache.make_layers`). Figures are CPU time of
the process (all threads; the machine is shared, so wall time is mostly CPU share) and wall time; the share is
of the CPU total.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pixtral_mlx  # noqa: F401  (before mlx: it chooses the BLAS)

# isort: split
import mlx.core as mx
import mlx.nn as nn

from pixtral_mlx import backend, cpu


def cpu_s() -> float:
    return time.process_time()  # all threads, at the clock's resolution (getrusage's is a scheduler tick)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(best CPU seconds, best wall seconds) of `fn()` evaluated, after one warm-up run."""
    mx.eval(fn())
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = cpu_s(), time.perf_counter()
        mx.eval(fn())
        wall.append(time.perf_counter() - w)
        cpu.append(cpu_s() - c)
    return min(cpu), min(wall)


def filled(kind: Any, n: int, kv_heads: int, head_dim: int) -> Any:
    """A fresh cache of `kind` holding `n` random positions (float32, as the CPU computes keys)."""
    cache = kind()
    if n:
        k = mx.random.normal((1, kv_heads, n, head_dim)) * 0.5
        v = mx.random.normal((1, kv_heads, n, head_dim))
        cache.update_and_fetch(k, v)
        mx.eval(cache.state)
    return cache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--layers", type=int, default=40, help="decoder layers the per-layer items count for")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 1024, 4096])
    args = ap.parse_args()
    if not backend.on_cpu():
        print("this measures the CPU backend", file=sys.stderr)
        return 1
    from mlx_lm.models.base import scaled_dot_product_attention
    from mlx_lm.models.cache import KVCache, QuantizedKVCache
    from mlx_lm.sample_utils import make_sampler

    from pixtral_mlx.generate import Penalties, sampling_processors
    from pixtral_mlx.kvcache import make_layers
    from pixtral_mlx.turn import Options

    px = pixtral_mlx.load(args.checkpoint)
    lm = px.model.language_model
    layer = lm.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    dim, heads, kvh = lm.args.hidden_size, attn.n_heads, attn.n_kv_heads
    hd = dim // heads if not getattr(lm.args, "head_dim", None) else lm.args.head_dim
    L, R = args.layers, args.repeats
    mx.random.seed(0)
    x = mx.random.normal((1, 1, dim))
    h_in = mx.random.normal((1, 1, attn.o_proj.weight.shape[1] * 32 // attn.o_proj.bits))
    f_in = mx.random.normal((1, 1, mlp.down_proj.weight.shape[1] * 32 // mlp.down_proj.bits))
    q = mx.random.normal((1, heads, 1, hd))
    k1 = mx.random.normal((1, kvh, 1, hd))
    logits = mx.random.normal((1, lm.args.vocab_size)) * 3
    mx.eval(x, h_in, f_in, q, k1, logits)
    ctx = max(args.contexts)
    print(f"device: {backend.device_name()}; load: {os.getloadavg()[0]:.1f}; repeats {R}; x{L} layers", flush=True)

    rows: list[tuple[str, int, float, float]] = []  # (name, count per token, cpu s, wall s)

    def add(name: str, count: int, fn: Callable[[], Any]) -> None:
        c, w = timed(fn, R)
        rows.append((name, count, c, w))
        print(f"  {name:<44} {c * 1e3:8.3f} ms cpu {w * 1e3:8.3f} ms wall  x{count}", flush=True)

    print("one op at a time (one evaluation each):")
    for n in ("q_proj", "k_proj", "v_proj"):
        add(f"matvec {n}", L, lambda n=n: getattr(attn, n)(x))
    add("matvec o_proj", L, lambda: attn.o_proj(h_in))
    for n in ("gate_proj", "up_proj"):
        add(f"matvec {n}", L, lambda n=n: getattr(mlp, n)(x))
    add("matvec down_proj", L, lambda: mlp.down_proj(f_in))
    add("matvec lm_head", 1, lambda: lm.lm_head(x))
    add("RMSNorm (2 per layer + final)", 2 * L + 1, lambda: layer.input_layernorm(x))
    add("RoPE (q and k)", L, lambda: (attn.rope(q, offset=ctx), attn.rope(k1, offset=ctx)))
    add("SiLU gate x up", L, lambda: nn.silu(f_in) * f_in)
    add("residual adds (2 per layer)", 2 * L, lambda: x + x)
    add("embedding lookup", 1, lambda: lm.model.embed_tokens(mx.array([[1000]])))
    caches = {
        "f32 KV (CPU keys are f32)": KVCache,
        "8-bit KV": lambda: QuantizedKVCache(64, 8),
        "4-bit KV": lambda: QuantizedKVCache(64, 4),
    }
    attention: dict[tuple[str, int], tuple[float, float]] = {}
    for label, kind in caches.items():
        for n in args.contexts:
            cache = filled(kind, n, kvh, hd)

            def attend(cache: Any = cache) -> Any:
                keys, values = (cache.keys, cache.values) if cache.offset else (None, None)
                if keys is None:
                    return q
                if isinstance(cache, QuantizedKVCache):
                    keys = tuple(t[..., : cache.offset, :] for t in keys)
                    values = tuple(t[..., : cache.offset, :] for t in values)
                else:
                    keys, values = keys[..., : cache.offset, :], values[..., : cache.offset, :]
                # A fresh query each call: mlx-lm's quantized attention scales its queries in place (`*=`).
                return scaled_dot_product_attention(q * 1.0, keys, values, cache=cache, scale=attn.scale, mask=None)

            attention[label, n] = timed(attend, R)
            c, w = attention[label, n]
            print(f"  attention {label} @{n:<6} {c * 1e3:8.3f} ms cpu {w * 1e3:8.3f} ms wall  x{L}", flush=True)
    for n in args.contexts:  # the same f32 attention as the library's decode path: two GQA-grouped matmuls
        k, v = mx.random.normal((1, kvh, max(n, 1), hd)), mx.random.normal((1, kvh, max(n, 1), hd))
        mx.eval(k, v)
        attention["f32, grouped GQA matmuls", n] = timed(lambda k=k, v=v: cpu.decode_attention(q, k, v, attn.scale), R)
    base = [n for n in args.contexts if n == 0] or [min(args.contexts)]
    rows.append((f"attention over the KV cache (@{base[0]}, f32)", L, *attention[next(iter(caches)), base[0]]))
    add("log-softmax over the vocabulary (mlx-lm)", 1, lambda: logits - mx.logsumexp(logits, keepdims=True))
    greedy, top_p = make_sampler(0.0), make_sampler(0.7, top_p=0.9)
    add("sampling: greedy (argmax)", 1, lambda: greedy(logits))
    add("sampling: top-p 0.9, T 0.7", 1, lambda: top_p(logits))
    procs = sampling_processors(Options(logit_bias={100: 2.0, 200: -1.0}), lm.args.vocab_size)
    history = mx.array(list(range(1000, 1064)))
    add("logits processors: logit_bias", 1, lambda: procs[0](history, logits))
    pen = Penalties(0.5, 0.5)
    pen.calls = 32
    add("logits processors: penalties (32 generated)", 1, lambda: pen(history, logits))

    detok = px.encoder.detokenizer()
    ids = [int(t) for t in mx.random.randint(1000, 100000, (512,)).tolist()]
    c, w = cpu_s(), time.perf_counter()
    for t in ids:
        detok.add(t)
    rows.append(("detokenization (1 token)", 1, (cpu_s() - c) / len(ids), (time.perf_counter() - w) / len(ids)))

    # The whole one-layer step as the library runs it: embed, layer, norm, lm_head, log-softmax, argmax.
    cache = filled(KVCache, base[0], kvh, hd)

    def step() -> Any:
        out = lm(mx.array([[1000]]), cache=[cache])[:, -1, :]
        cache.offset -= 1  # the same context every time
        return greedy(out - mx.logsumexp(out, keepdims=True))

    whole_c, whole_w = timed(step, R)
    step_parts = [r for r in rows if not r[0].startswith(("sampling: top-p", "logits processors", "detokenization"))]
    one_layer = sum(c * (n // L + n % L) for _, n, c, _ in step_parts)  # one layer, one head
    print(
        f"whole 1-layer step: {whole_c * 1e3:.2f} ms cpu ({whole_w * 1e3:.2f} wall); its parts timed alone "
        f"{one_layer * 1e3:.2f} ms (the difference is mostly noise at this load)",
        flush=True,
    )
    # Graph construction and evaluation: the Python that builds a layer's graph (2 layers less 1) and the
    # primitives it adds (counted with export_to_dot) times MLX's cost per evaluated primitive (a chain of tiny adds).
    counts, builds = [], []
    for depth in (1, 2):
        lm.model.layers = [layer] * depth
        caches_d = [filled(KVCache, base[0], kvh, hd) for _ in range(depth)]
        spent = []
        for _ in range(R):
            c0 = cpu_s()
            out = lm(mx.array([[1000]]), cache=caches_d)
            spent.append(cpu_s() - c0)
            mx.eval(out)  # (else the next call's graph would hold this one's, through the caches)
            for cd in caches_d:
                cd.offset -= 1
        builds.append(min(spent))
        out = lm(mx.array([[1000]]), cache=caches_d)
        dot = io.StringIO()
        mx.export_to_dot(dot, out)
        counts.append(dot.getvalue().count("shape=rectangle"))
    lm.model.layers = [layer]
    per_layer_ops, build = counts[1] - counts[0], builds[1] / 2  # (an upper bound: the head's share included)
    chain = 256
    tiny = mx.zeros((1, dim))
    mx.eval(tiny)

    def chained() -> Any:
        y = tiny
        for _ in range(chain):
            y = y + 1.0
        return y

    per_op = timed(chained, R)[0] / chain
    print(f"graph: {per_layer_ops} primitives per layer ({counts[0]} in the 1-layer step), {per_op * 1e6:.1f} us each")
    rows.append(("graph build (Python; 2-layer step / 2)", L, build, build))
    sched = per_layer_ops * per_op
    rows.append((f"eval scheduling ({per_layer_ops} primitives/layer)", L, sched, sched))

    total = sum(c * n for name, n, c, _ in rows if not name.startswith(("sampling: top-p", "logits processors")))
    print(f"\nper token at {L} layers (greedy; CPU ms of the process, load {os.getloadavg()[0]:.1f}):")
    print("| item | count | CPU ms/token | wall ms/token | share |\n|---|---:|---:|---:|---:|")
    for name, n, c, w in rows:
        optional = name.startswith(("sampling: top-p", "logits processors"))
        share = "(opt.)" if optional else f"{100 * c * n / total:.1f}%"
        print(f"| {name} | {n} | {c * n * 1e3:.2f} | {w * n * 1e3:.2f} | {share} |")
    mat = sum(c * n for name, n, c, _ in rows if name.startswith("matvec"))
    print(f"| **total (greedy)** | | {total * 1e3:.1f} | | matvecs {100 * mat / total:.1f}% |")
    outside = [(c * n, name) for name, n, c, _ in rows if not name.startswith(("matvec", "sampling: top-p", "logits"))]
    print(f"largest outside the matvecs: {max(outside)[1]} ({max(outside)[0] * 1e3:.2f} ms)")
    print(f"\nattention per token at {L} layers (CPU ms), by KV cache and context:")
    print("| KV | " + " | ".join(f"@{n}" for n in args.contexts) + " |")
    print("|---|" + "---:|" * len(args.contexts))
    for label in [*caches, "f32, grouped GQA matmuls"]:
        print(f"| {label} | " + " | ".join(f"{attention[label, n][0] * L * 1e3:.1f}" for n in args.contexts) + " |")
    print(f"\nwhole 1-layer decode step @{ctx} by KV bits (kvcache.make_layers, as Options(kv_bits) makes them):")
    for bits in (None, 8, 4):
        layers = make_layers(px.model, bits, 64)
        kind = type(layers[0])
        cache = filled(kind if bits is None else (lambda bits=bits: QuantizedKVCache(64, bits)), ctx, kvh, hd)

        def kv_step(cache: Any = cache) -> Any:
            out = lm(mx.array([[1000]]), cache=[cache])[:, -1, :]
            cache.offset -= 1
            return greedy(out - mx.logsumexp(out, keepdims=True))

        c, w = timed(kv_step, R)
        print(f"  kv_bits {bits}: {c * 1e3:.2f} ms cpu, {w * 1e3:.2f} ms wall (load {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
