"""Library changes under test for `experiments.py` (`compare`, `ab`) and the benchmark's `ours` job.

Each patch swaps one method of a CPU-backend class (`pixtral_mlx.cpu`) or of mlx-lm, installed before
a model is loaded; nothing in the library is edited. Measured, not adopted:
- `dequant-streams`: the CPU prefill path dequantizes row blocks on the CPU streams (the elementwise
  kernels are single-threaded);
- `lm-attention-streams`: the decoder's prompt attention (mlx-lm's) split by kv-head groups over the streams.
Adopted by the library earlier: decode matmuls split by rows and vision attention split by heads over the
CPU streams (c405613), and the shift-and-mask dequantization (`cpu.dequantize_affine`, 14cbd96).
"""

from __future__ import annotations

from typing import Any

PATCHES = {
    "dequant-streams": "prefill path: row blocks dequantized on the CPU streams",
    "lm-attention-streams": "decoder prompt attention split by kv-head groups over the CPU streams",
}
ACTIVE: set[str] = set()
_ORIGINAL: dict[str, Any] = {}


def split_sdpa(q: Any, k: Any, v: Any, *, scale: float, mask: Any = None, **kw: Any) -> Any:
    """mx.fast.scaled_dot_product_attention with the kv-head groups spread over the CPU streams.

    The CPU fallback materializes the scores and runs a single-threaded softmax whose exp dominates;
    heads are independent, so each core takes a share (GQA: a kv head with its query heads).
    """
    import mlx.core as mx

    from pixtral_mlx.cpu import cpu_streams, splits

    streams = cpu_streams()
    hk = k.shape[1]
    if len(streams) < 2 or hk < 2 or kw.get("sinks") is not None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, **kw)
    rep = q.shape[1] // hk
    outs = []
    for st, (a, b) in zip(streams, splits(hk, min(len(streams), hk))):
        m = mask
        if isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[1] == q.shape[1]:
            m = mask[:, a * rep : b * rep]
        with mx.stream(st):
            outs.append(
                mx.fast.scaled_dot_product_attention(q[:, a * rep : b * rep], k[:, a:b], v[:, a:b], scale=scale, mask=m)
            )
    return mx.concatenate(outs, axis=1)


def patched_linear_call(self: Any, x: Any) -> Any:
    """`DequantizingQuantizedLinear.__call__` with its prefill dequantization split over the CPU streams."""
    import mlx.core as mx

    from pixtral_mlx import cpu

    streams = cpu.cpu_streams()
    if x.size // x.shape[-1] < cpu.DEQUANT_MIN_TOKENS or not (self.mode == "affine" and self.bits in (4, 8)):
        return _ORIGINAL["linear"](self, x)  # the library's own path (decode: split over the streams)
    if len(streams) < 2:
        return _ORIGINAL["linear"](self, x)
    ws = []
    for st, (lo, hi) in zip(streams, cpu.splits(self["weight"].shape[0], len(streams))):
        with mx.stream(st):
            w, s, b = self["weight"][lo:hi], self["scales"][lo:hi], self["biases"][lo:hi]
            ws.append(cpu.dequantize_affine(w, s, b, self.group_size, self.bits))
    y = mx.concatenate([x @ w.astype(x.dtype).T for w in ws], axis=-1)
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


def apply(names: list[str]) -> None:
    """Install exactly the named patches (the others are removed); can be called at any time."""
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown patch {sorted(unknown)[0]!r}; known: {', '.join(PATCHES)}")
    from mlx_lm.models import llama

    from pixtral_mlx.cpu import DequantizingQuantizedLinear as Layer

    _ORIGINAL.setdefault("linear", Layer.__call__)
    _ORIGINAL.setdefault("lm_sdpa", llama.scaled_dot_product_attention)
    Layer.__call__ = _ORIGINAL["linear"]
    llama.scaled_dot_product_attention = _ORIGINAL["lm_sdpa"]
    ACTIVE.clear()
    ACTIVE.update(names)
    if "dequant-streams" in ACTIVE:
        Layer.__call__ = patched_linear_call
    if "lm-attention-streams" in ACTIVE:
        llama.scaled_dot_product_attention = patched_lm_sdpa
