"""Where prefill and vision time goes, per operation, against the f32 GEMM peak measured in the same run.

    python benchmarks/op_profile.py [--tokens 1024] [--image 1024] [--repeats 3] [--json OUT.json]

One decoder layer (4-bit, group 64, bf16 scales, as a converted checkpoint loads) and one vision layer (f32)
at Pixtral-12B's real widths (docs/MODEL.md §2), random weights in memory, on the library's CPU classes
(`backend.prepare`'s swap). Every operation of one prefill chunk (a text prompt and an image prompt of the
same length: the [IMG] rows merged into the embeddings) and of one vision pass is run on its own, evaluated,
best of --repeats, and grouped into classes: dequantize, GEMM per projection, attention (QKᵀ, softmax and
mask, PV, as separate products; and the fused call the library makes), norms, RoPE, embedding/merge, other.
The layer is then timed whole as the library runs it (one lazy graph), which is what the % of peak uses:
useful FLOPs (projections, causal attention) ÷ time ÷ peak. The peak is `timing.gemm_peak` (mx.matmul on
large f32 shapes, best of N). Nothing is written to disk except --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from timing import best, gemm_peak  # noqa: E402

import pixtral_mlx  # noqa: E402,F401  (before mlx: the BLAS preload)

TEXT = {"dim": 5120, "ffn": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "vocab": 131072}
VISION = {"dim": 1024, "ffn": 4096, "heads": 16, "head_dim": 64, "patch": 16}


def decoder_layer(group_size: int = 64, bits: int = 4) -> Any:
    """One mlx-lm llama block at Pixtral-12B's widths, quantized, with the CPU classes swapped in."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from pixtral_mlx import cpu

    t = TEXT
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=t["dim"],
        num_hidden_layers=1,
        intermediate_size=t["ffn"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t["kv_heads"],
        head_dim=t["head_dim"],
        rms_norm_eps=1e-5,
        vocab_size=t["vocab"],
        rope_theta=1e9,
    )
    block = llama.TransformerBlock(args)
    for _, m in block.named_modules():  # small weights, as trained ones
        if isinstance(m, nn.Linear):
            m.weight = mx.random.normal(m.weight.shape) * 0.02
    nn.quantize(block, group_size=group_size, bits=bits)
    swap(block, cpu)
    mx.eval(block.parameters())
    return block


def swap(module: Any, cpu: Any) -> None:
    """What `backend.prepare` does on the CPU: scales and biases in the checkpoint's bf16, the CPU classes."""
    import mlx.core as mx
    import mlx.nn as nn

    for _, m in module.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales, m.biases = m.scales.astype(mx.bfloat16), m.biases.astype(mx.bfloat16)
    cpu.install(module)


def vision_layer() -> Any:
    import mlx.core as mx
    import mlx.nn as nn

    from pixtral_mlx import cpu
    from pixtral_mlx.models.pixtral.args import VisionArgs
    from pixtral_mlx.models.pixtral.vision import PixtralVisionModel

    v = VISION
    args = VisionArgs(
        hidden_size=v["dim"],
        intermediate_size=v["ffn"],
        num_attention_heads=v["heads"],
        num_hidden_layers=1,
        image_size=1024,
        patch_size=v["patch"],
        rope_theta=10000.0,
    )
    model = PixtralVisionModel(args)
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight = mx.random.normal(m.weight.shape) * 0.02
    swap(model, cpu)
    mx.eval(model.parameters())
    return model


class Profile:
    """Rows of (class, op, seconds, flops), each op timed on its own (inputs evaluated first)."""

    def __init__(self, repeats: int):
        self.repeats = repeats
        self.rows: list[dict] = []

    def time(self, cls: str, op: str, f: Callable[[], Any], flops: float = 0.0) -> Any:
        import mlx.core as mx

        times = []
        for _ in range(self.repeats):  # the first run is timed too: on a busy machine every run costs
            t = time.perf_counter()
            out = f()
            mx.eval(out)
            times.append(time.perf_counter() - t)
        self.rows.append({"class": cls, "op": op, "s": min(times), "flops": flops})
        return out

    def by_class(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rows:
            out[r["class"]] = out.get(r["class"], 0.0) + r["s"]
        return out


def attention_parts(p: Profile, q: Any, k: Any, v: Any, scale: float, causal: bool) -> None:
    """The attention as three separate products (what an unfused CPU attention does), for the profile."""
    import mlx.core as mx

    B, H, T, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        mx.eval(k, v)
    s = p.time("attention", "QKᵀ (scores)", lambda: (q * scale) @ k.swapaxes(-1, -2), 2 * B * H * T * T * D)
    mask = mx.tril(mx.ones((T, T), dtype=mx.bool_)) if causal else None

    def soft() -> Any:
        return mx.softmax(mx.where(mask, s, -mx.inf) if causal else s, axis=-1, precise=True)

    w = p.time("softmax", "mask + softmax", soft)
    p.time("attention", "PV", lambda: w @ v, 2 * B * H * T * T * D)


def dequantized(lin: Any) -> Any:
    """A quantized projection's float32 weights as the library's prefill makes them (`_weight_blocks`: the
    extension's kernel where it applies, else per-row-block MLX ops), as one matrix."""
    import mlx.core as mx

    from pixtral_mlx import cpu

    blocks = lin._weight_blocks(cpu.cpu_streams())
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks)


def project(p: Profile, name: str, lin: Any, x: Any, tokens: int) -> Any:
    """One quantized projection of a prompt chunk as the library runs it: with 4-bit weights and an int16 kernel,
    one product from the codes (`cpu_kernel.quantized_matmul`, a "GEMM" row); else a dequantize row, then the
    BLAS GEMM on the float32 weights."""
    from pixtral_mlx import cpu_kernel

    if cpu_kernel.multiplies_from_codes(lin):
        return p.time("GEMM", f"{name} (from the codes)", lambda: lin(x), 2 * tokens * lin.weight.size * 32 // lin.bits)
    w = p.time("dequantize", name, lambda: dequantized(lin), 0)
    return p.time("GEMM", name, lambda: x @ w.T, 2 * tokens * w.size)


def profile_decoder(block: Any, tokens: int, image: bool, repeats: int) -> dict:
    """One prefill chunk of `tokens` tokens through one decoder layer, op by op, then whole."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import KVCache
    from mlx_lm.models.llama import swiglu

    from pixtral_mlx import cpu

    t = TEXT
    p = Profile(repeats)
    embed = nn.QuantizedEmbedding(t["vocab"], t["dim"], group_size=64, bits=4)
    mx.eval(embed.parameters())
    ids = mx.random.randint(1000, t["vocab"], (1, tokens))
    if image:  # [IMG] rows replaced by vision features, as Model.embed does
        is_img = mx.arange(tokens)[None, :, None] % 33 != 32
        feats = mx.random.normal((1, tokens, t["dim"])) * 0.02
        mx.eval(feats)
        x = p.time("embedding/merge", "embed + merge", lambda: mx.where(is_img, feats, embed(ids)))
    else:
        x = p.time("embedding/merge", "embed", lambda: embed(ids))
    attn, mlp = block.self_attn, block.mlp
    h = p.time("norms", "input norm", lambda: block.input_layernorm(x))
    outs = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        outs[name] = project(p, name, getattr(attn, name), h, tokens)
    B, T = 1, tokens

    def heads(a: Any, n: int) -> Any:
        return a.reshape(B, T, n, -1).transpose(0, 2, 1, 3)

    q = p.time("other", "reshape q/k/v to heads", lambda: heads(outs["q_proj"], t["heads"]))
    k, v = heads(outs["k_proj"], t["kv_heads"]), heads(outs["v_proj"], t["kv_heads"])
    mx.eval(k, v)
    q = p.time("RoPE", "RoPE q", lambda: attn.rope(q))
    k = p.time("RoPE", "RoPE k", lambda: attn.rope(k))
    attention_parts(p, q, k, v, attn.scale, causal=True)
    pairs = T * (T + 1) / 2
    o = p.time(
        "attention (fused call)",
        "cpu.blocked_attention causal",
        lambda: cpu.blocked_attention(q, k, v, attn.scale, causal=True),
        4 * t["heads"] * pairs * t["head_dim"],
    )
    o = p.time("other", "heads back to rows", lambda: o.transpose(0, 2, 1, 3).reshape(B, T, -1))
    r = project(p, "o_proj", attn.o_proj, o, tokens)
    hh = p.time("other", "residual add", lambda: x + r)
    h2 = p.time("norms", "post-attention norm", lambda: block.post_attention_layernorm(hh))
    ffn = {}
    for name in ("gate_proj", "up_proj"):
        ffn[name] = project(p, name, getattr(mlp, name), h2, tokens)
    g = p.time("other", "SwiGLU", lambda: cpu.gated(swiglu, ffn["gate_proj"], ffn["up_proj"]))
    r = project(p, "down_proj", mlp.down_proj, g, tokens)
    p.time("other", "residual add", lambda: hh + r)
    proj_flops = sum(r["flops"] for r in p.rows if r["class"] == "GEMM")
    useful = proj_flops + 4 * t["heads"] * pairs * t["head_dim"]

    def whole() -> Any:
        return block(x, mask="causal", cache=KVCache())

    with cpu.reusing_buffers(2 * cpu.dequantized_bytes(block)):  # as generate.prefill feeds a chunk
        whole_s = best(lambda: mx.eval(whole()), repeats)
    return {"rows": p.rows, "by_class": p.by_class(), "layer_s": whole_s, "useful_flops": useful}


def profile_vision(model: Any, size: int, repeats: int) -> dict:
    """One vision pass over a size² image (one layer at the real widths, plus patch conv and ln_pre)."""
    import mlx.core as mx
    import mlx.nn as nn

    from pixtral_mlx import cpu
    from pixtral_mlx.models.pixtral.vision import rope_2d, rotate_half

    v = VISION
    p = Profile(repeats)
    img = mx.random.uniform(shape=(size, size, 3))
    mx.eval(img)
    n = (size // v["patch"]) ** 2
    conv_flops = 2 * n * 3 * v["patch"] ** 2 * v["dim"]
    x = p.time("GEMM", "patch conv", lambda: model.patch_conv(img[None]).reshape(1, -1, v["dim"]), conv_flops)
    x = p.time("norms", "ln_pre", lambda: model.ln_pre(x))
    grid = [(size // v["patch"], size // v["patch"])]
    cos, sin = p.time("RoPE", "2-D RoPE tables", lambda: rope_2d(grid, model.args))
    layer = model.transformer.layers[0]
    attn, ff = layer.attention, layer.feed_forward
    h = p.time("norms", "attention norm", lambda: layer.attention_norm(x))
    qkv = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(attn, name)
        qkv[name] = p.time("GEMM", name, lambda lin=lin: lin(h), 2 * n * lin.weight.size)

    def heads(a: Any) -> Any:
        return a.reshape(1, n, v["heads"], -1).transpose(0, 2, 1, 3)

    q = p.time("other", "reshape q/k/v to heads", lambda: heads(qkv["q_proj"]))
    k, vv = heads(qkv["k_proj"]), heads(qkv["v_proj"])
    mx.eval(k, vv)
    q = p.time("RoPE", "RoPE q", lambda: q * cos + rotate_half(q) * sin)
    k = p.time("RoPE", "RoPE k", lambda: k * cos + rotate_half(k) * sin)
    attention_parts(p, q, k, vv, attn.scale, causal=False)
    att_flops = 4 * v["heads"] * n * n * v["head_dim"]
    o = p.time("attention (fused call)", f"{type(attn).__name__}._attend", lambda: attn._attend(q, k, vv), att_flops)
    o = p.time("other", "heads back to rows", lambda: o.transpose(0, 2, 1, 3).reshape(1, n, -1))
    r = p.time("GEMM", "o_proj", lambda: attn.o_proj(o), 2 * n * attn.o_proj.weight.size)
    hh = p.time("other", "residual add", lambda: x + r)
    h2 = p.time("norms", "ffn norm", lambda: layer.ffn_norm(hh))
    g = p.time("GEMM", "gate_proj", lambda: ff.gate_proj(h2), 2 * n * ff.gate_proj.weight.size)
    u = p.time("GEMM", "up_proj", lambda: ff.up_proj(h2), 2 * n * ff.up_proj.weight.size)
    gu = p.time("other", "SwiGLU", lambda: cpu.gated(lambda a, b: nn.silu(a) * b, g, u))
    r = p.time("GEMM", "down_proj", lambda: ff.down_proj(gu), 2 * n * ff.down_proj.weight.size)
    p.time("other", "residual add", lambda: hh + r)
    layer_flops = sum(r["flops"] for r in p.rows if r["class"] == "GEMM" and r["op"] != "patch conv") + att_flops
    bounds = [0, n]
    layer_s = best(lambda: mx.eval(layer(x, cos, sin, bounds)), repeats)
    return {
        "rows": p.rows,
        "by_class": p.by_class(),
        "layer_s": layer_s,
        "useful_flops": layer_flops,
        "patches": n,
    }


@contextmanager
def old_paths() -> Iterator[None]:
    """The CPU classes as they were before issue 24's changes: one dequantization per weight on one thread,
    mlx-lm's single attention call for a prompt chunk, one attention call per image in the vision tower."""
    from pixtral_mlx import cpu
    from pixtral_mlx.models.pixtral.vision import Attention

    saved = (
        cpu.PROMPT_ATTENTION_MIN,
        cpu.StreamSplitAttention._attend,
        cpu.DequantizingQuantizedLinear._many_tokens,
        cpu.SWIGLU_KERNEL_MIN_ROWS,
    )

    def many(self: Any, x: Any, streams: list[Any]) -> Any:
        return x @ self._dequantized().astype(x.dtype).T

    def attend(self: Any, q: Any, k: Any, v: Any) -> Any:  # the old class: heads over the streams, one call each
        import mlx.core as mx

        streams = cpu.cpu_streams()
        if len(streams) < 2:
            return Attention._attend(self, q, k, v)
        parts = []
        for st, (a, b) in zip(streams, cpu.splits(self.n_heads, len(streams))):
            with mx.stream(st):
                parts.append(mx.fast.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=self.scale))
        return mx.concatenate(parts, axis=1)

    cpu.PROMPT_ATTENTION_MIN, cpu.StreamSplitAttention._attend = 10**9, attend
    cpu.DequantizingQuantizedLinear._many_tokens = many
    cpu.SWIGLU_KERNEL_MIN_ROWS = 10**9
    try:
        yield
    finally:
        cpu.PROMPT_ATTENTION_MIN, cpu.StreamSplitAttention._attend = saved[0], saved[1]
        cpu.DequantizingQuantizedLinear._many_tokens = saved[2]
        cpu.SWIGLU_KERNEL_MIN_ROWS = saved[3]


def compare(block: Any, vision: Any, tokens: int, size: int, repeats: int) -> dict:
    """Whole layers with the old and the new CPU paths, alternating (old, new, old, new, ...) so that both see
    the same machine; best of `repeats` each. Decoder: a fresh chunk of `tokens` and a second chunk behind a
    cache of `tokens` (a long image prompt); vision: one size² image."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from pixtral_mlx.models.pixtral.vision import rope_2d

    x = mx.random.normal((1, tokens, TEXT["dim"])) * 0.5
    n = (size // VISION["patch"]) ** 2
    xv = mx.random.normal((1, n, VISION["dim"])) * 0.5
    cos, sin = rope_2d([(size // VISION["patch"],) * 2], vision.args)
    mx.eval(x, xv, cos, sin)

    def second_chunk() -> Any:
        cache = KVCache()
        mx.eval(block(x, mask="causal", cache=cache), cache.state)
        t = time.perf_counter()
        mx.eval(block(x, mask="causal", cache=cache))
        return time.perf_counter() - t

    cases = {
        f"decoder layer, fresh {tokens}-token chunk": lambda: mx.eval(block(x, mask="causal", cache=KVCache())),
        f"decoder layer, {tokens}-token chunk after {tokens} cached": second_chunk,
        f"vision layer, {size}² ({n} patches)": lambda: mx.eval(vision.transformer.layers[0](xv, cos, sin, [0, n])),
    }
    out = {}
    for name, f in cases.items():
        samples: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(repeats):
            for which in ("old", "new"):
                with old_paths() if which == "old" else nullcontext():
                    t = time.perf_counter()
                    r = f()
                    samples[which].append(r if isinstance(r, float) else time.perf_counter() - t)
        out[name] = {k: min(v) for k, v in samples.items()} | {"samples": samples}
        print(f"{name}: old {out[name]['old']:.2f} s, new {out[name]['new']:.2f} s", file=sys.stderr, flush=True)
    return out


def report(title: str, r: dict, peak: float) -> list[str]:
    total = sum(x["s"] for x in r["rows"] if x["class"] != "attention (fused call)")
    lines = [f"## {title}", "", "| class | op | ms | GFLOP/s | % of peak | share of ops |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        rate = x["flops"] / x["s"] / 1e9 if x["flops"] else None
        share = "" if x["class"] == "attention (fused call)" else f"{100 * x['s'] / total:.1f} %"
        lines.append(
            f"| {x['class']} | {x['op']} | {1e3 * x['s']:.1f} | {'' if rate is None else f'{rate:.0f}'} | "
            f"{'' if rate is None else f'{100 * rate / peak:.0f} %'} | {share} |"
        )
    lines += ["", "| class | ms | share |", "|---|---|---|"]
    for c, s in sorted(r["by_class"].items(), key=lambda kv: -kv[1]):
        if c != "attention (fused call)":
            lines.append(f"| {c} | {1e3 * s:.1f} | {100 * s / total:.1f} % |")
    rate = r["useful_flops"] / r["layer_s"] / 1e9
    lines += [
        "",
        f"Whole layer as the library runs it: {1e3 * r['layer_s']:.0f} ms, {r['useful_flops'] / 1e9:.1f} GFLOP "
        f"useful → {rate:.0f} GFLOP/s = **{100 * rate / peak:.0f} % of the f32 GEMM peak** "
        f"(ops one by one add up to {1e3 * total:.0f} ms).",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="prefill chunk length (default 1024)")
    ap.add_argument("--image", type=int, default=1024, help="vision image side in pixels (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per op")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    ap.add_argument("--skip", nargs="*", default=[], choices=["text", "image", "vision"])
    ap.add_argument("--compare", action="store_true", help="only time whole layers, old CPU paths against new")
    args = ap.parse_args(argv)
    import os

    import mlx.core as mx

    from pixtral_mlx import backend

    peak = gemm_peak(args.repeats)
    out: dict[str, Any] = {"peak": peak, "load_start": os.getloadavg()}
    lines = [
        f"# Per-operation profile — {backend.device_name()}",
        "",
        f"f32 GEMM peak in this run: **{peak['gflops']:.0f} GFLOP/s** ({peak['shape']}, best of {args.repeats}); "
        f"load average at start {out['load_start'][0]:.1f}. Every op: best of {args.repeats}.",
        "",
    ]
    if args.compare:
        r = compare(decoder_layer(), vision_layer(), args.tokens, args.image, args.repeats)
        out["compare"] = r
        lines += ["| whole layer | old paths, s | new paths, s | new ÷ old |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['old']:.2f} | {v['new']:.2f} | {v['new'] / v['old']:.2f} |" for k, v in r.items()]
        lines.append("")
    elif "text" not in args.skip or "image" not in args.skip:
        block = decoder_layer()
        for kind in ("text", "image"):
            if kind not in args.skip:
                r = profile_decoder(block, args.tokens, kind == "image", args.repeats)
                out[f"prefill_{kind}"] = r
                title = f"Prefill chunk, {kind} prompt, {args.tokens} tokens, one 4-bit decoder layer"
                lines += report(title, r, peak["gflops"])
                print("\n".join(report(title, r, peak["gflops"])), file=sys.stderr, flush=True)
        del block
        mx.clear_cache()
    if "vision" not in args.skip and not args.compare:
        r = profile_vision(vision_layer(), args.image, args.repeats)
        out["vision"] = r
        lines += report(f"Vision, {args.image}² image ({r['patches']} patches), one f32 layer", r, peak["gflops"])
    out["load_end"] = os.getloadavg()
    lines.append(f"Load average at end: {out['load_end'][0]:.1f}.")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
