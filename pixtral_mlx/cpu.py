"""CPU-only module classes and helpers; `backend.prepare()` swaps them in on the CPU backend.

The model files (`model.py`, `vision.py`) know nothing about devices. On MLX's CPU backend:
- quantized layers send prefill (many tokens) through a dequantized BLAS GEMM, ~10x faster than
  `quantized_matmul` there; decode (a few tokens) keeps the quantized kernel, which reads 4x fewer bytes,
  with its output rows split over one CPU stream per core;
- prefill dequantizes each weight in one row block per stream (MLX's elementwise kernels use one thread);
- attention over many queries (vision, and a decoder prompt chunk) runs in blocks of queries with its heads
  split over the same streams (the CPU softmax runs on one thread), never holding the whole score matrix and,
  for causal prompts, never computing the masked half;
- with the C++ extension (`cpu_kernel`), prefill dequantizes through its multithreaded AVX2 kernel, that
  attention is one fused kernel call (online softmax over key blocks; no score matrix at all) and the MLPs'
  SwiGLU runs on every core;
- several prompts prefilled together (`generate.prefill_many`) share each weight's dequantization
  (`shared_dequantization`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, ministral3

from . import cpu_kernel
from .models.pixtral.vision import Attention, FeedForward

# Below this many tokens a quantized matmul keeps the quantized kernel (decode, short prefills).
DEQUANT_MIN_TOKENS = 16
# The blocked attention (`blocked_attention`): queries go in blocks of at most ATTENTION_BLOCK rows, fewer where
# a block's scores (all heads against every key) would pass BLOCK_SCORES_BYTES. A 1024² image: 16 heads x 1,024
# x 4,096 patches, 256 MB per block against 1 GB at once; a 4,160-token image prompt in the decoder: blocks of
# 504 queries (32 heads), against 1.1 GB for a 2,048-token chunk. The memory plan counts one block.
ATTENTION_BLOCK = 1024
BLOCK_SCORES_BYTES = 1 << 28
MIN_ATTENTION_BLOCK = 16
PROMPT_ATTENTION_MIN = 64  # decoder queries from which a prompt chunk's attention goes through blocked_attention
_local = threading.local()


def cpu_streams() -> list[Any]:
    """One CPU stream per core for this thread, or [] on one core.

    MLX runs each CPU stream on its own thread, while single kernels (quantized matmul, the
    attention softmax) run on one: splitting independent rows or heads over these streams uses
    every core. Streams are per thread in MLX, so each thread gets its own set.
    """
    streams = getattr(_local, "streams", None)
    if streams is None:
        n = min(os.cpu_count() or 1, 8)
        streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []
        _local.streams = streams
    return streams


def splits(n: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges cutting n items into at most `parts` nearly equal pieces."""
    b = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]


def dequantize_affine(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """`mx.dequantize` for affine 2/4/8-bit weights as shifts, masks and one multiply-add: the same values,
    ~2x faster on the CPU backend."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, cols*bits/32, 32/bits)
    # In float32 whatever the scales' dtype (the CPU keeps the checkpoint's bf16 scales): the same
    # values as casting the scales first.
    q = q.reshape(w.shape[0], -1, group_size).astype(mx.float32)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(w.shape[0], -1)


# Inside `shared_dequantization()`: the float32 weight blocks each DequantizingQuantizedLinear made, by id (lazy).
_shared: dict[int, list[mx.array]] | None = None


@contextmanager
def shared_dequantization() -> Iterator[None]:
    """While it is open, every prompt chunk through a DequantizingQuantizedLinear multiplies with one and the same
    (lazy) dequantized weight: the graphs of several prompts built inside it share that node, and evaluated
    together they dequantize each weight once (`generate.prefill_many`). The same values as apart."""
    global _shared
    saved, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = saved


def dequantizes(model: Any) -> bool:
    """True when `model`'s decoder prefill dequantizes its weights (the CPU classes on a quantized model) or widens
    them (16-bit float weights, `widens`)."""
    layers = model.layers
    return bool(layers) and any(
        isinstance(m, DequantizingQuantizedLinear) or widens(m) for _, m in layers[0].named_modules()
    )


def dequantized_sizes(module: Any, rows: int | None = None) -> list[int]:
    """Elements of each weight matrix in `module` that a CPU prompt chunk of `rows` rows (any, for None) turns into
    float32: every quantized linear layer's, but for 4-bit affine ones multiplied from their codes
    (`cpu_kernel.multiplies_from_codes`); and every 16-bit `DenseLinear`'s it widens (`widens`; from
    `cpu_kernel.dense_gemm_rows` rows on), but the output layer's, which only ever sees the last position (an
    embedding table's rows are gathered, never widened)."""
    return [
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in module.named_modules()
        if isinstance(m, nn.QuantizedLinear) and not cpu_kernel.multiplies_from_codes(m)
    ] + [
        m.weight.size
        for name, m in module.named_modules()
        if isinstance(m, DenseLinear)
        and widens(m)
        and not name.endswith("lm_head")
        and (rows is None or rows >= cpu_kernel.dense_gemm_rows(m.weight.dtype))
    ]


def dequantized_bytes(layer: Any) -> int:
    """Bytes of the largest float32 weight a prompt chunk dequantizes (or widens, from 16 bits) in `layer` (a decoder
    layer; 0 when none: 4-bit weights multiplied from their codes dequantize nothing)."""
    return 4 * max(dequantized_sizes(layer), default=0)


_reuse_lock = threading.Lock()
_reuse_open = 0  # reusing_buffers blocks open now (threads may overlap)
_reuse_limit = 0  # the cache limit they set
_reuse_saved = 0  # the limit before the first of them


@contextmanager
def reusing_buffers(limit: int) -> Iterator[None]:
    """While open, MLX keeps up to `limit` bytes of freed buffers for reuse (the last block to close clears them).

    A prompt chunk on the CPU dequantizes every layer's weights into float32 buffers (Pixtral-12B: 293 MB per
    FFN matrix) that the next layer needs again in the same sizes. MLX's CPU allocator keeps only 32 MB of
    freed buffers by default, so each went back to the OS and the next was faulted in and zeroed again.
    Measured on a 2-core Xeon: one real-width layer's seven dequantizations 118-128 -> 72-76 ms, the layer
    with its GEMMs at 256 tokens 687-724 -> 603-671 ms. (The vision tower's activations showed no difference.)
    The limit is the process's: overlapping blocks (threads) keep the largest, and the last to close puts the
    old one back. `limit` <= 0: nothing changes."""
    global _reuse_open, _reuse_limit, _reuse_saved
    if limit <= 0:
        yield
        return
    with _reuse_lock:
        if _reuse_open == 0:
            _reuse_saved, _reuse_limit = mx.set_cache_limit(limit), limit
        elif limit > _reuse_limit:
            mx.set_cache_limit(limit)
            _reuse_limit = limit
        _reuse_open += 1
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_open -= 1
            if _reuse_open == 0:
                mx.set_cache_limit(_reuse_saved)
                mx.clear_cache()


class DequantizingQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that sends many-token inputs through a dequantized BLAS GEMM (CPU only).

    On the CPU backend `quantized_matmul` runs at ~2 GFLOP/s while the BLAS GEMM runs at ~100:
    for prefill, dequantizing the layer's weights first is ~10x faster. One-token decode keeps
    the quantized kernel, which reads 4x fewer bytes. `backend.prepare` installs this class.
    4-bit weights with the extension's int16 kernels skip the dequantization: `cpu_kernel.quantized_matmul`
    multiplies from the codes with int16 x, up to twice the float32 GEMM's rate (docs/CPU.md).
    """

    def _operands(self) -> tuple[mx.array, mx.array, mx.array | None]:
        """weight, scales and biases in MLX's layout (the fallback paths' operands)."""
        return self["weight"], self["scales"], self.get("biases")

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] < DEQUANT_MIN_TOKENS:
            return self._few_tokens(x, cpu_streams())
        y = None
        if cpu_kernel.multiplies_from_codes(self):  # 4-bit: the product from the codes, nothing dequantized
            y = cpu_kernel.quantized_matmul(
                x, self["weight"], self["scales"], self["biases"], group_size=self.group_size, bits=self.bits
            )
        if y is None:
            y = self._many_tokens(x, cpu_streams())
        if "bias" in self:
            y = y + self["bias"]
        return y

    def _many_tokens(self, x: mx.array, streams: list[Any]) -> mx.array:
        """Prefill: dequantize, then one BLAS GEMM (per block of output rows, see `_weight_blocks`)."""
        blocks = self._weight_blocks(streams)
        if len(blocks) == 1:
            return x @ blocks[0].astype(x.dtype).T
        return mx.concatenate([x @ w.astype(x.dtype).T for w in blocks], axis=-1)

    def _weight_blocks(self, streams: list[Any]) -> list[mx.array]:
        """The float32 weights, in blocks of output rows. With the extension, one block from its multithreaded
        kernel. Without it, the dequantization is elementwise work that MLX's CPU backend runs on one thread,
        so with several streams the output rows are cut into one block per stream, each dequantized on its own
        stream (thread), and each block's GEMM runs on the caller's stream (BLAS uses every core): the same
        values, the dequantization in 1/cores of the time. Inside `shared_dequantization`, made once."""
        if _shared is not None and id(self) in _shared:
            return _shared[id(self)]
        weight, scales, biases = self._operands()
        rows = weight.shape[0]
        w = None
        if self.mode == "affine" and biases is not None:
            w = cpu_kernel.dequantize(weight, scales, biases, group_size=self.group_size, bits=self.bits)
        if w is not None:  # the extension's kernel: every core, no per-stream split needed
            blocks = [w]
        elif len(streams) < 2 or rows < 2 * len(streams):
            blocks = [self._dequantized()]
        else:
            blocks = []
            for st, (lo, hi) in zip(streams, splits(rows, len(streams))):
                with mx.stream(st):
                    blocks.append(self._dequantized(lo, hi))
        if _shared is not None:
            _shared[id(self)] = blocks
        return blocks

    def _dequantized(self, lo: int = 0, hi: int | None = None) -> mx.array:
        """The float32 weights of output rows [lo, hi) (all rows by default)."""
        w, scales, biases = self._operands()
        if lo or hi is not None:
            w, scales = w[lo:hi], scales[lo:hi]
            biases = None if biases is None else biases[lo:hi]
        if self.mode != "affine" or self.bits not in (2, 4, 8) or biases is None:
            if self.mode == "affine" and scales.dtype != mx.float32:  # bf16 scales: dequantize in float32
                scales = scales.astype(mx.float32)
                biases = None if biases is None else biases.astype(mx.float32)
            return mx.dequantize(w, scales, biases, group_size=self.group_size, bits=self.bits, mode=self.mode)
        return dequantize_affine(w, scales, biases, self.group_size, self.bits)

    def _few_tokens(self, x: mx.array, streams: list[Any]) -> mx.array:
        """The quantized kernel: the C++ CPU matvec when built (`cpu_kernel`), else mx.quantized_matmul with
        its output rows split over the CPU streams (one thread each)."""
        w, s, b = self._operands()
        if self.mode == "affine" and b is not None and cpu_kernel.available():
            y = cpu_kernel.quantized_matvec(x, w, s, b, group_size=self.group_size, bits=self.bits)
            return y + self["bias"] if "bias" in self else y
        if self.mode == "affine" and s.dtype != x.dtype:  # the checkpoint's bf16 scales (`backend.prepare`), float32 x
            s = s.astype(x.dtype)
            b = None if b is None else b.astype(x.dtype)
        if len(streams) < 2:
            y = mx.quantized_matmul(
                x, w, s, b, transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode
            )
            return y + self["bias"] if "bias" in self else y
        parts = []
        for st, (lo, hi) in zip(streams, splits(w.shape[0], len(streams))):
            with mx.stream(st):
                parts.append(
                    mx.quantized_matmul(
                        x,
                        w[lo:hi],
                        s[lo:hi],
                        None if b is None else b[lo:hi],
                        transpose=True,
                        group_size=self.group_size,
                        bits=self.bits,
                        mode=self.mode,
                    )
                )
        y = mx.concatenate(parts, axis=-1)
        if "bias" in self:
            y = y + self["bias"]
        return y


class InterleavedQuantizedLinear(DequantizingQuantizedLinear):
    """A DequantizingQuantizedLinear whose 4-bit weight, scales and biases are stored interleaved
    (`cpu_kernel.interleave`): one 32-byte load of the weights holds codes of 8 output rows, so the few rows of a
    decode batch share every unpacking and each group's scaling is one vector operation for 8 outputs. Decode and
    prompt chunks run in the extension on this layout (`cpu_kernel.quantized_matvec` / `quantized_matmul` with
    interleaved=True); a row of x gets the same bits from both. Where the extension cannot take it (switched off after
    loading, a float kernel selected, PIXTRAL_MLX_QMV_GEMM=off), the inherited paths run on the weights put back in
    MLX's layout (a copy per call). `backend.prepare` installs it where `cpu_kernel.interleaves`."""

    def _operands(self) -> tuple[mx.array, mx.array, mx.array | None]:
        back = cpu_kernel.deinterleave
        return back(self["weight"]), back(self["scales"]), back(self["biases"])

    def __call__(self, x: mx.array) -> mx.array:
        if not cpu_kernel.interleaved_kernels():
            return super().__call__(x)
        operands = (x, self["weight"], self["scales"], self["biases"])
        kw = {"group_size": self.group_size, "bits": self.bits, "interleaved": True}
        if x.size // x.shape[-1] < DEQUANT_MIN_TOKENS:
            y = cpu_kernel.quantized_matvec(*operands, **kw)
        else:
            y = cpu_kernel.quantized_matmul(*operands, **kw)
            if y is None:  # PIXTRAL_MLX_QMV_GEMM=off: dequantize for BLAS
                y = self._many_tokens(x, cpu_streams())
        return y + self["bias"] if "bias" in self else y

    @classmethod
    def convert(cls, layer: DequantizingQuantizedLinear) -> None:
        """Store `layer`'s weight, scales and biases interleaved, evaluated now (one layer's copy at a time), and
        make it this class."""
        arrays = {k: cpu_kernel.interleave(layer[k]) for k in ("weight", "scales", "biases")}
        mx.eval(arrays)
        layer.update(arrays)
        layer.__class__ = cls


def _float_weight(layer: Any, w: mx.array, dtype: Any) -> mx.array:
    """`w` in `dtype` for a GEMM: a 16-bit weight widened (`cpu_kernel.widen`, every core); inside
    `shared_dequantization`, once for every prompt chunk that multiplies with it."""
    if w.dtype == dtype:
        return w
    if _shared is not None and id(layer) in _shared:
        return _shared[id(layer)][0]
    wide = cpu_kernel.widen(w) if dtype == mx.float32 else w.astype(dtype)
    if _shared is not None:
        _shared[id(layer)] = [wide]
    return wide


def _dense(layer: Any, x: mx.array, w: mx.array, bias: mx.array | None) -> mx.array:
    """`x @ w.T (+ bias)`: a decode step and short prompt chunks through the extension's float-weight matvec
    (`cpu_kernel.dense_matvec`, which reads a 16-bit weight as it is stored; below `cpu_kernel.dense_gemm_rows`
    rows), longer chunks through the BLAS GEMM on the widened weight."""
    if x.size // x.shape[-1] < cpu_kernel.dense_gemm_rows(w.dtype):
        y = cpu_kernel.dense_matvec(x, w)
        if y is not None:
            return y if bias is None else y + bias
    w = _float_weight(layer, w, x.dtype)
    return x @ w.T if bias is None else mx.addmm(bias, x, w.T)


class DenseLinear(nn.Linear):
    """nn.Linear on the CPU backend (`backend.prepare` installs it). A decode step's few rows go through the
    extension's float-weight matvec, which reads each weight once for all rows on every core: MLX's BLAS GEMM reads
    a float32 weight for one row at ~5 GB/s, a sixth of the bandwidth of the 2-core EPYC it was measured on. With the
    extension, `backend.prepare` keeps a bfloat16/float16 checkpoint's weights as they are (half the bytes of float32
    copies, the same values): the matvec widens them as it reads them, and a prompt chunk widens the matrix for the
    GEMM (`_float_weight`), so prompts get the products they got from float32 copies."""

    def __call__(self, x: mx.array) -> mx.array:
        return _dense(self, x, self["weight"], self["bias"] if "bias" in self else None)


class DenseEmbedding(nn.Embedding):
    """nn.Embedding on the CPU backend: rows of a 16-bit table (kept as stored, like `DenseLinear`'s weights) come out
    as float32, the same values; `as_linear` (a tied output layer) goes the `DenseLinear` way."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = self["weight"][x]
        return rows if rows.dtype == mx.float32 else rows.astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return _dense(self, x, self["weight"], None)


def widens(module: Any) -> bool:
    """True for a CPU float layer whose weights a prompt chunk widens (a 16-bit `DenseLinear` or `DenseEmbedding`)."""
    return isinstance(module, (DenseLinear, DenseEmbedding)) and module.weight.dtype != mx.float32


def vision_buffers(model: Any) -> Any:
    """`reusing_buffers` for one vision encoding: twice the largest float32 weight the vision tower and the adapter
    widen (the adapter's 5120 x 5120 one for Pixtral-12B, 105 MB; MLX keeps 32 MB of freed buffers by default, and a
    fresh buffer is faulted in and zeroed: measured 30 against 3 ms for that matrix)."""
    parts = [getattr(model, name, None) for name in ("vision_tower", "multi_modal_projector")]
    largest = max(
        (m.weight.size for part in parts if part is not None for _, m in part.named_modules() if widens(m)), default=0
    )
    return reusing_buffers(8 * largest)


def attention_block(heads: int, keys: int, dtype_size: int) -> int:
    """Query rows per block of `blocked_attention` against `keys` keys: ATTENTION_BLOCK, fewer where the
    block's scores would pass BLOCK_SCORES_BYTES (long contexts)."""
    rows = BLOCK_SCORES_BYTES // max(heads * keys * dtype_size, 1)
    return int(max(MIN_ATTENTION_BLOCK, min(ATTENTION_BLOCK, rows)))


def fused_attention(head_dim: int, dtype: Any) -> bool:
    """Whether `blocked_attention` of this head width and dtype goes through the extension's fused kernel, which
    holds no scores (what the memory plan counts)."""
    step = 16 if cpu_kernel.prefill_available() and cpu_kernel.extension().prefill_isa() != "scalar" else 1
    return cpu_kernel.prefill_available() and dtype == mx.float32 and head_dim % step == 0 and head_dim <= 256


def blocked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` (mask None or "causal") without the full score matrix.

    MLX's CPU attention materializes the scores of all heads and queries at once and runs its softmax on
    one thread. Here the queries go in blocks of ATTENTION_BLOCK rows (fewer against very many keys:
    `attention_block`, which the memory plan counts), and each block's kv-head groups
    (a kv head with its query heads, GQA) go one per CPU stream, so the scores in flight are a block's and
    every core runs a softmax. Causal (queries are the last q.shape[2] positions of the keys, as mlx-lm
    lays out a prompt chunk after its cache): a block reads only the keys up to its last query, so the
    masked half of a fresh prompt's scores is never computed. Each row's softmax is the same; only the
    order of float sums inside the matrix products can differ from the one-call result.
    """
    fused = cpu_kernel.attention(q, k, v, scale=scale, causal=causal)
    if fused is not None:  # the extension's kernel: no scores in memory at all, softmax vectorized
        return fused
    n_q, n_k, n_kv = q.shape[2], k.shape[2], k.shape[1]
    rep = q.shape[1] // n_kv
    streams = cpu_streams() or [None]
    groups = splits(n_kv, min(len(streams), n_kv))
    offset = n_k - n_q  # keys before the first query (the cache)
    out: list[mx.array] = []
    parts: list[mx.array] = []
    block = attention_block(q.shape[1], n_k, q.dtype.size)
    for lo, hi in splits(n_q, -(-n_q // block)):
        end = offset + hi if causal else n_k
        mask = None
        if causal:
            mask = mx.arange(offset + lo, offset + hi)[:, None] >= mx.arange(end)[None]
        # A block starts once the previous one is done: left to itself MLX's scheduler computes every block's
        # scores before the first softmax, holding them all at once.
        qb = mx.depends(q[:, :, lo:hi], parts) if parts else q[:, :, lo:hi]
        parts = []
        for st, (a, b) in zip(streams, groups):
            with mx.stream(st) if st is not None else nullcontext():
                parts.append(
                    mx.fast.scaled_dot_product_attention(
                        qb[:, a * rep : b * rep], k[:, a:b, :end], v[:, a:b, :end], scale=scale, mask=mask
                    )
                )
        out.append(mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
    return mx.concatenate(out, axis=2) if len(out) > 1 else out[0]


def decode_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """One decode query per sequence against its KV cache (no mask): each kv head's query heads as the rows of
    one matrix product (GQA), so the keys and values are read once for them rather than once per query head,
    and the kv-head groups split over the CPU streams. The same values as `mx.fast.scaled_dot_product_attention`
    (only the order of float sums differs); measured here 2-2.5x faster at 1K-4K cached tokens, where attention
    over the cache costs as much as a layer's matvecs (benchmarks/decode_profile.py)."""
    if q.shape[2] == 1:
        fused = cpu_kernel.decode_attention(q, k, v, scale=scale)
        if fused is not None:  # the extension's kernel: the rows read once, the softmax vectorized
            return fused
    b, h, n_q, d = q.shape
    n_kv = k.shape[1]
    qg = (q * scale).reshape(b, n_kv, (h // n_kv) * n_q, d)  # a kv head's query heads, one after the other
    streams = cpu_streams() or [None]
    parts = []
    for st, (lo, hi) in zip(streams, splits(n_kv, min(len(streams), n_kv))):
        with mx.stream(st) if st is not None else nullcontext():
            scores = qg[:, lo:hi] @ k[:, lo:hi].swapaxes(-1, -2)
            parts.append(mx.softmax(scores, axis=-1, precise=True) @ v[:, lo:hi])
    out = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return out.reshape(b, h, n_q, d)


class StreamSplitAttention(Attention):
    """Vision attention, per image, in blocks of queries with its heads split over the CPU streams
    (`blocked_attention`): never an image's whole score matrix (4,096 patches x 16 heads: 1 GB)."""

    def _attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return blocked_attention(q, k, v, self.scale, causal=False)


def attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float, mask: Any) -> mx.array:
    """mlx-lm's `scaled_dot_product_attention` for the decoders on the CPU: a prompt chunk's causal attention by
    `blocked_attention` (the masked half of a long image prompt's scores never computed, the rest never held at
    once, the softmax on every core), one query without a mask (decode) by `decode_attention`, or over a quantized
    KV cache by the extension's `quantized_decode_attention`; quantized prompt chunks and explicit masks (batches)
    keep mlx-lm's call."""
    causal = isinstance(mask, str) and mask == "causal"
    quantized = hasattr(cache, "bits")
    if quantized and queries.shape[2] == 1 and mask is None:
        out = cpu_kernel.quantized_decode_attention(
            queries, keys, values, scale=scale, group_size=cache.group_size, bits=cache.bits
        )
        if out is not None:
            return out
    if queries.shape[2] >= PROMPT_ATTENTION_MIN and (mask is None or causal) and not quantized:
        return blocked_attention(queries, keys, values, scale, causal=causal)
    if queries.shape[2] == 1 and mask is None and not quantized:
        return decode_attention(queries, keys, values, scale)
    return llama.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask)


# RoPE from a table of cos and sin per position (`rope`): positions are computed in blocks of this many.
ROPE_TABLE_BLOCK = 4096
_rope_tables: dict[tuple[int, float, float], tuple[mx.array, mx.array]] = {}
_rope_lock = threading.Lock()


def _rope_table(dims: int, base: float, scale: float, positions: int) -> tuple[mx.array, mx.array]:
    """(C, S), each (P, dims) with P >= positions: C = [cos, cos] and S = [-sin, sin] of every position, read from
    `mx.fast.rope` itself (applied to ones in the first half and zeros in the second, it returns cos · 1 - 0 · sin
    and 1 · sin + 0 · cos: exactly its cos and sin). One table per (dims, base, scale), shared by all layers."""
    key = (dims, base, scale)
    with _rope_lock:
        table = _rope_tables.get(key)
        if table is not None and table[0].shape[0] >= positions:
            return table
        p = -(-positions // ROPE_TABLE_BLOCK) * ROPE_TABLE_BLOCK
        half = dims // 2
        basis = mx.concatenate([mx.ones((1, 1, p, half)), mx.zeros((1, 1, p, half))], axis=-1)
        t = mx.fast.rope(basis, dims, traditional=False, base=base, scale=scale, offset=0)[0, 0]
        cos, sin = t[:, :half], t[:, half:]
        table = (mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1))
        mx.eval(table)
        _rope_tables[key] = table
        return table


def rope(module: Any, x: mx.array, offset: Any) -> mx.array:
    """`module(x, offset=offset)` for mlx-lm's RoPE modules; for a plain `nn.RoPE` over whole float32 heads at an
    integer offset (Pixtral's decoder), bit for bit the same values from a shared table of cos and sin:
    x · C + [x2, x1] · S, 5 operations where MLX's CPU `fast.rope` builds ~35 (it has no CPU kernel: it computes
    the angles, their cos and sin on every call), 100 µs instead of 213 µs a call at one token, twice a layer."""
    if (
        type(module) is not nn.RoPE
        or module.traditional
        or module.dims != x.shape[-1]
        or module.dims % 2
        or not isinstance(offset, int)
        or x.dtype != mx.float32
        or x.ndim != 4
    ):
        return module(x, offset=offset)
    length = x.shape[-2]
    c, s = _rope_table(module.dims, float(module.base), float(module.scale), offset + length)
    half = module.dims // 2
    rotated = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * c[offset : offset + length] + rotated * s[offset : offset + length]


def _project(attn: Any, x: mx.array, cache: Any) -> tuple[mx.array, mx.array, mx.array, int]:
    """What mlx-lm's llama and Ministral 3 attentions (mlx-lm 0.32) do before their attention call: the queries
    and the (cache's) keys and values, by head, RoPE applied at the cache's offset; and that offset."""
    B, L, _ = x.shape
    queries, keys, values = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    queries = queries.reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    offset = 0 if cache is None else cache.offset
    queries, keys = rope(attn.rope, queries, offset), rope(attn.rope, keys, offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    return queries, keys, values, offset


class BlockedPromptAttention(llama.Attention):
    """mlx-lm's llama attention (Pixtral-12B's and Mistral Small's decoder) with the CPU's `attention`: mlx-lm's
    `Attention.__call__` (mlx-lm 0.32) with the attention call swapped."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        queries, keys, values, _ = _project(self, x, cache)
        output = attention(queries, keys, values, cache, self.scale, mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1))


class BlockedMinistral3Attention(ministral3.Attention):
    """mlx-lm's Ministral 3 attention (YaRN RoPE, llama-4 query scaling) with the CPU's `attention`: mlx-lm's
    `Attention.__call__` (mlx-lm 0.32) with the attention call swapped."""

    def __call__(self, x: mx.array, attn_scale: Any = None, mask: Any = None, cache: Any = None) -> mx.array:
        queries, keys, values, offset = _project(self, x, cache)
        if attn_scale is None:
            attn_scale = ministral3._get_llama_4_attn_scale(
                x.shape[1], offset, self.scaling_beta, self.original_max_position_embeddings
            ).astype(x.dtype)
        output = attention(queries * attn_scale, keys, values, cache, self.scale, mask)
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(*x.shape[:2], -1))


# Rows (tokens, patches) from which an MLP's gated activation goes through the extension's kernel: every row, since
# the decode step's one row of 14,336 took 477 µs through mlx-lm's compiled `swiglu` (MLX's CPU runs a compiled
# elementwise kernel one element at a time) and 102 µs through the kernel, call and eval included (an `a + b` of the
# same shape: 39 µs), the same values bit for bit: 15 ms of a 40-layer token.
SWIGLU_KERNEL_MIN_ROWS = 1


def gated(fn: Any, gate: mx.array, up: mx.array) -> mx.array:
    """fn(gate, up) = silu(gate) * up, through `cpu_kernel.swiglu` (every core, bit for bit the same values) for
    prompt chunks and images; fn itself where the kernel does not apply."""
    if gate.size // gate.shape[-1] >= SWIGLU_KERNEL_MIN_ROWS:
        out = cpu_kernel.swiglu(gate, up)
        if out is not None:
            return out
    return fn(gate, up)


def _silu_gate(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class KernelFeedForward(FeedForward):
    """The vision MLP with its gated activation through the extension's kernel (`gated`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated(_silu_gate, self.gate_proj(x), self.up_proj(x)))


class KernelMLP(llama.MLP):
    """mlx-lm's llama MLP (mlx-lm 0.32) with its compiled `swiglu` through the extension's kernel (`gated`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated(llama.swiglu, self.gate_proj(x), self.up_proj(x)))


class KernelMinistral3MLP(ministral3.MLP):
    """mlx-lm's ministral3 MLP (Ministral 3), the same change as `KernelMLP`."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gated(ministral3.swiglu, self.gate_proj(x), self.up_proj(x)))


class KernelGELU(nn.GELU):
    """The adapter's exact GELU through the extension's kernel (`cpu_kernel.gelu`: every core, bit for bit the same
    values); MLX's own for the approximations and where the kernel does not apply."""

    def __call__(self, x: mx.array) -> mx.array:
        if self._approx == "none":
            out = cpu_kernel.gelu(x)
            if out is not None:
                return out
        return super().__call__(x)


# The decoder attention classes whose prompt chunks go through `blocked_attention` (the memory plan counts one block).
BLOCKED_DECODER_ATTENTION = (BlockedPromptAttention, BlockedMinistral3Attention)

# Model classes and their CPU replacements (same parameters, so a class swap is enough).
REPLACEMENTS: dict[type, type] = {
    nn.QuantizedLinear: DequantizingQuantizedLinear,
    nn.Linear: DenseLinear,
    nn.Embedding: DenseEmbedding,
    Attention: StreamSplitAttention,
    llama.Attention: BlockedPromptAttention,
    ministral3.Attention: BlockedMinistral3Attention,
    FeedForward: KernelFeedForward,
    llama.MLP: KernelMLP,
    ministral3.MLP: KernelMinistral3MLP,
    nn.GELU: KernelGELU,
}


def install(model: Any) -> None:
    """Swap in the CPU classes (`REPLACEMENTS`), then store the weights of the quantized layers
    `cpu_kernel.interleaves` interleaved (`InterleavedQuantizedLinear`, one layer at a time): what `backend.prepare`
    does on the CPU once the scales are in place, and what the benchmarks that build layers themselves call."""
    for _, module in model.named_modules():
        if type(module) in REPLACEMENTS:
            module.__class__ = REPLACEMENTS[type(module)]
    for _, module in model.named_modules():
        if type(module) is DequantizingQuantizedLinear and cpu_kernel.interleaves(module):
            InterleavedQuantizedLinear.convert(module)
