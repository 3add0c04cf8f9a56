"""Token generation on top of mlx-lm's `generate_step`, samplers and KV caches.

What every turn shares lives here: the `PromptCache` (a KV cache and the tokens it holds, reused by
longest common prefix), the context check, and `stream_tokens`, which prefills a token/embedding
sequence into a cache in chunks (logits only for the last position) and decodes. The options and the
`Chunk`/`Reply` carriers are in `turn.py`; `Pixtral.plan_turn` and `Pixtral.run_turn` (`pipeline.py`) are
the one turn path on top of both, and `stream_batch` here decodes several sequences together. Callers load,
prefill and decode on one thread (MLX streams are per thread). See docs/ARCHITECTURE.md.

One module on purpose, though about 300 lines: one decode loop (`prefill`, `_decode`, stop strings) shared by
`stream_tokens` and `stream_batch`, and the `PromptCache` both fill.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, wired_limit
from mlx_lm.models.cache import trim_prompt_cache

from .config import CONTEXT_LENGTH
from .errors import ContextError, PromptError
from .memory import PREFILL_STEP
from .reasoning import Splitter
from .turn import Chunk, Options, Reply, Stats, collect

__all__ = [
    "Chunk",
    "Options",
    "PromptCache",
    "Reply",
    "Stats",
    "check_context",
    "collect",
    "Penalties",
    "prefill",
    "sampling_processors",
    "stream_batch",
    "stream_tokens",
]


def check_context(
    n_prompt: int, max_tokens: int, context: int = CONTEXT_LENGTH, *, context_used: int | None = None
) -> int:
    """Raise if the prompt does not fit; return how many tokens may still be generated.

    `context_used` (a conversation's tokens before this turn) makes the message speak of the turn
    and the conversation rather than of one prompt.
    """
    if n_prompt < context:
        return min(max_tokens, context - n_prompt)
    if context_used is not None:
        raise ContextError(
            f"this turn needs {n_prompt - min(n_prompt, context_used):,} more tokens and the conversation would "
            f"reach {n_prompt:,} of the {context:,}-token context; remove images, undo turns or start a new chat."
        )
    raise ContextError(
        f"the prompt is {n_prompt:,} tokens, over the model's {context:,}-token context; "
        "remove images or text (or set a smaller max_edge)."
    )


def common_prefix(a: list[Any], b: list[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prompt_keys(tokens: list[int], images: list[Any], image_token_id: int) -> list[Hashable]:
    """What each position of a prompt feeds the model: its token id, or for an image token the image's
    content digest and the feature row. Two images of one size give the same tokens, not the same keys."""
    rows = iter([(img.digest, k) for img in images for k in range(img.grid[0] * img.grid[1])])
    return [next(rows) if t == image_token_id else t for t in tokens]


class PromptCache:
    """A KV cache (one entry per decoder layer) and the tokens whose keys and values it holds.

    A new prompt reuses the longest common prefix: `reusable(tokens, keys)` says how much (at least
    the last token is always prefilled again, to get its logits), `trim(keep)` drops the rest.
    `kv_bits`/`kv_group_size`: the layers are mlx-lm's `QuantizedKVCache` (which trims like `KVCache`).
    """

    def __init__(self, layers: list[Any], kv_bits: int | None = None, kv_group_size: int = 64):
        self.layers = layers
        self.tokens: list[int] = []
        self.keys: list[Hashable] = []  # `prompt_keys` of `tokens`, set with them
        self.kv_bits = kv_bits
        self.kv_group_size = kv_group_size

    @property
    def nbytes(self) -> int:
        """Bytes the layers have allocated (keys, values, and scales and biases when quantized)."""
        return sum(c.nbytes for c in self.layers if not c.empty())

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else len(self.tokens)

    def reusable(self, tokens: list[int], keys: list[Hashable] | None = None) -> int:
        """`keys` (the prompt's `prompt_keys`, for a prompt with images) match image positions by content too."""
        n = common_prefix(tokens, self.tokens)
        if keys is not None:
            n = min(n, common_prefix(keys, self.keys))
        return min(n, max(len(tokens) - 1, 0))

    def trim(self, keep: int) -> None:
        if self.offset > keep:
            trim_prompt_cache(self.layers, self.offset - keep)
        self.tokens = self.tokens[:keep]
        self.keys = self.keys[:keep]


class Penalties:
    """OpenAI's presence and frequency penalties as an mlx-lm logits processor: each token generated so far
    has its logit lowered by `frequency` x its count and by `presence` once. Only this reply's tokens count
    (not the prompt's): mlx-lm calls a processor once per sampled token, the first time before any, so the
    last `calls` tokens it is given are the ones generated."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = float(presence), float(frequency)
        self.calls = 0

    def __call__(self, tokens: Any, logits: mx.array) -> mx.array:
        import numpy as np

        n, self.calls = self.calls, self.calls + 1
        if n == 0:
            return logits
        ids, counts = np.unique(np.array(tokens[-n:]), return_counts=True)
        penalty = self.frequency * counts.astype(np.float32) + self.presence
        return logits.at[:, mx.array(ids)].add(-mx.array(penalty, dtype=logits.dtype))


def sampling_processors(options: Options, vocab_size: int) -> list[Any]:
    """The logits processors of these options' `logit_bias` and penalties (mlx-lm's logit bias; OpenAI's
    penalties, `Penalties`), in that order; raises if a biased token id is not in the vocabulary."""
    from mlx_lm.sample_utils import make_logits_processors

    processors: list[Any] = []
    if options.logit_bias:
        outside = [t for t in options.logit_bias if t >= vocab_size]
        if outside:
            raise PromptError(
                f"logit_bias names token {outside[0]}, outside the model's vocabulary of {vocab_size:,} tokens.",
                param="logit_bias",
            )
        processors += make_logits_processors(logit_bias=options.logit_bias)
    if options.presence_penalty or options.frequency_penalty:
        processors.append(Penalties(options.presence_penalty, options.frequency_penalty))
    return processors


def token_logprobs(logprobs: mx.array, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability in `logprobs` (a log-softmax over the vocabulary) and the `top` most likely
    (token id, log-probability) pairs, most likely first (ties by token id); tokens masked to -inf are left out."""
    import math

    chosen = logprobs[token].item()
    if top <= 0:
        return chosen, []
    flat = logprobs.reshape(-1)
    k = min(top, flat.shape[0])
    ids = mx.argpartition(-flat, kth=k - 1)[:k] if k < flat.shape[0] else mx.arange(flat.shape[0])
    pairs = sorted(zip(ids.tolist(), flat[ids].tolist()), key=lambda p: (-p[1], p[0]))
    return chosen, [(int(i), float(v)) for i, v in pairs if math.isfinite(v)]


def stream_tokens(
    model: Any,
    detokenizer: Any,
    tokens: list[int],
    embeddings: mx.array,
    cache: list[Any],
    *,
    eos_id: int,
    options: Options,
    prefill_step: int = PREFILL_STEP,
    start_time: float | None = None,
    logits_processors: list[Any] | None = None,
) -> Iterator[Chunk]:
    """Prefill `tokens` (with their `embeddings`, shape (L, D)) into `cache`, then decode.

    `start_time` lets callers count image encoding into the prompt speed, as users feel it.
    `logits_processors`: mlx-lm's `(tokens, logits) -> logits` functions (e.g. a JSON grammar's mask);
    the tokens they see are this call's `tokens` followed by the ones generated.
    """
    from mlx_lm.generate import generation_stream

    tic = start_time or time.perf_counter()
    steps = generate_step(
        mx.array(tokens),
        model,
        generation_stream,
        max_tokens=options.max_tokens,
        sampler=options.sampler(),
        logits_processors=logits_processors or None,
        prompt_cache=cache,
        prefill_step_size=prefill_step,
        input_embeddings=embeddings,
    )
    try:
        with wired_limit(model, [generation_stream]):  # Metal: keep the weights resident
            yield from _decode(
                steps,
                detokenizer,
                len(tokens),
                options.max_tokens,
                eos_id,
                tic,
                stop=options.stop,
                top_logprobs=options.top_logprobs if options.logprobs else None,
            )
    finally:
        steps.close()


def split_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split `text` at the first stop string: (what may be shown, what to hold back, whether one was found).

    Without a stop string in it, the held-back part is the longest end of `text` that could still grow
    into one, so a stop string split across tokens is never shown.
    """
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    hold = max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], text[len(text) - hold :], False


def _decode(
    steps: Iterator[Any],
    detokenizer: Any,
    n_prompt: int,
    max_tokens: int,
    eos_id: int,
    tic: float,
    stop: tuple[str, ...] = (),
    top_logprobs: int | None = None,
) -> Iterator[Chunk]:
    """One chunk per token (its text may be empty while held back for `stop`); the last one carries
    `finish_reason`: "stop" for the end-of-sequence token or a stop string (cut off, never shown).
    A reasoning model's `[THINK]…[/THINK]` text goes to the chunks' `reasoning`, the rest to `text`
    (`reasoning.Splitter`); stop strings apply to the answer only, `max_tokens` counts every token.
    `top_logprobs` (not None): each chunk with a token carries its log-probability and that many alternatives,
    from the log-softmax `steps` yields with each token (`token_logprobs`)."""
    stats = Stats(prompt_tokens=n_prompt, finish_reason="length")
    n = 0
    split = Splitter.of(detokenizer)
    tail, thought, held, last, stopped = "", "", "", None, False
    scores: dict[str, Any] = {}
    for token, logprobs in steps:
        if n == 0:
            stats.prompt_tps = n_prompt / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        n += 1
        stats.generation_tokens = n
        stats.generation_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9)
        stats.peak_memory = mx.get_peak_memory() / 1e9
        if token == eos_id:
            stats.finish_reason = "stop"
            break
        if top_logprobs is not None and logprobs is not None:
            chosen, top = token_logprobs(logprobs, token, top_logprobs)
            scores = {"logprob": chosen, "top_logprobs": top}
        reasoning, answer = split.add(token)
        text, held, stopped = split_stop(held + answer, stop)
        if stopped or n >= max_tokens:
            tail, thought, last = text, reasoning, token
            break
        yield Chunk(**{**stats.stats(), "finish_reason": None}, text=text, reasoning=reasoning, token=token, **scores)
    if stopped:
        stats.finish_reason = "stop"
    else:
        reasoning, answer = split.flush()
        text, held, stopped = split_stop(held + answer, stop)
        tail += text if stopped else text + held
        thought += reasoning
        stats.finish_reason = "stop" if stopped else stats.finish_reason
    yield Chunk(**stats.stats(), text=tail, reasoning=thought, token=last, **(scores if last is not None else {}))


def prefill(
    model: Any, tokens: list[int], embeddings: mx.array, cache: list[Any], prefill_step: int = PREFILL_STEP
) -> None:
    """Feed all but the last of `tokens` (with their `embeddings`, (L, D)) into `cache`, in chunks of
    `prefill_step`: exactly what `generate_step` does before its first sampled token."""
    from mlx_lm.generate import generation_stream

    with _reusing_buffers(model):
        for lo, hi in _chunks(len(tokens), prefill_step):
            with mx.stream(generation_stream):
                model(mx.array(tokens[lo:hi])[None], cache=cache, input_embeddings=embeddings[None, lo:hi])
                mx.eval([c.state for c in cache])
            mx.clear_cache()


def _reusing_buffers(model: Any) -> Any:
    """On the CPU backend, MLX keeps twice the largest dequantized weight of freed buffers while a prompt is fed
    (`cpu.reusing_buffers`: each layer's dequantized weights reuse the previous layer's buffers; the memory plan
    counts three of them, `memory.estimate`)."""
    from . import backend

    if not backend.on_cpu():
        return nullcontext()
    from . import cpu

    return cpu.reusing_buffers(2 * cpu.dequantized_bytes(model.layers[0]) if model.layers else 0)


def log_softmax_rows(logits: mx.array) -> mx.array:
    """`logits - logsumexp(logits)` over the last axis of (B, V) logits, what every decode step hands its sampler
    (mlx-lm's `generate_step` computes it so), with the same values. On the CPU backend the logsumexp goes through
    the extension (`cpu_kernel.logsumexp`: MLX's algorithm bit for bit, ~0.3 ms a row of 131,072 logits against
    MLX's ~1.7 ms, rows over the cores). Without it, a batch's rows go over the CPU streams (MLX runs each op on
    one thread), row by row the same ops."""
    from . import backend

    if not backend.on_cpu():
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    from . import cpu, cpu_kernel

    lse = cpu_kernel.logsumexp(logits)
    if lse is not None:
        return logits - lse
    streams = cpu.cpu_streams()
    if logits.shape[0] < 2 or not streams:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    parts = []
    for (lo, hi), stream in zip(cpu.splits(logits.shape[0], len(streams)), streams):
        with mx.stream(stream):
            part = logits[lo:hi]
            parts.append(part - mx.logsumexp(part, axis=-1, keepdims=True))
    return mx.concatenate(parts)


def _chunks(total: int, step: int) -> Iterator[tuple[int, int]]:
    """The [lo, hi) chunks of at most `step` tokens that a prefill feeds: all but the last of `total` tokens."""
    done = 0
    while total - done > 1:
        n = min(step, total - done - 1)
        yield done, done + n
        done += n


_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    """A subclass of the layer class `cls` whose calls append their output to `_TAPS[id(layer)]`."""
    if cls not in _TAPPED:

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = cls.__call__(self, *args, **kwargs)
            _TAPS[id(self)].append(out)
            return out

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _TAPPED[cls]


_TAPS: dict[int, list[Any]] = {}


@contextmanager
def _tap(layers: list[Any]) -> Iterator[list[list[Any]]]:
    """Per layer, the outputs of every call made to it while open (the same layer objects, class swapped back
    at the end; the model's own forward runs unchanged)."""
    outputs: list[list[Any]] = [[] for _ in layers]
    classes = [type(layer) for layer in layers]
    try:
        for layer, out in zip(layers, outputs):
            _TAPS[id(layer)] = out
            layer.__class__ = _tapped_class(type(layer))
        yield outputs
    finally:
        for layer, cls in zip(layers, classes):
            layer.__class__ = cls
            _TAPS.pop(id(layer), None)


def prefill_many(
    model: Any,
    jobs: list[tuple[list[int], mx.array, list[Any]]],
    prefill_step: int = PREFILL_STEP,
    steps: list[int] | None = None,
) -> None:
    """`prefill(model, tokens, embeddings, cache, step)` for each `(tokens, embeddings, cache)` job, with the same
    values; `steps` gives each job its own chunk size (default: `prefill_step` for all).

    Where a prompt chunk dequantizes the layer weights it multiplies with (the CPU classes on a quantized model:
    `cpu.dequantizes`), that costs as much as the GEMMs of a few hundred tokens, once per prompt. So with several
    jobs the work goes layer by layer instead: the graph of every chunk of every prompt is built first (lazily, no
    work; inside `cpu.shared_dequantization`, so all of them use one dequantization node per weight), then it is
    evaluated one decoder layer at a time (every chunk's output of that layer; the last layer's KV only, as
    `prefill` computes it), so each weight is dequantized once for the batch and freed before the next layer's.
    Every chunk goes through the same operations on the same shapes and weights as in `prefill`."""
    from mlx_lm.generate import generation_stream

    from . import backend

    steps = steps or [prefill_step] * len(jobs)
    cpu = None
    if backend.on_cpu():
        from . import cpu
    if len(jobs) < 2 or cpu is None or not cpu.dequantizes(model):
        for (tokens, embeddings, cache), step in zip(jobs, steps):
            prefill(model, tokens, embeddings, cache, step)
        return
    layers = model.layers
    with mx.stream(generation_stream), _reusing_buffers(model):
        with cpu.shared_dequantization(), _tap(layers) as outputs:
            for (tokens, embeddings, cache), step in zip(jobs, steps):
                for lo, hi in _chunks(len(tokens), step):
                    model(mx.array(tokens[lo:hi])[None], cache=cache, input_embeddings=embeddings[None, lo:hi])
        for i in range(len(layers) - 1):
            mx.eval(outputs[i])
            outputs[i].clear()
        mx.eval([c.state for _, _, cache in jobs for c in cache])
    outputs.clear()
    mx.clear_cache()


def stream_batch(
    model: Any,
    detokenizers: list[Any],
    prompts: list[tuple[list[int], Any]],
    *,
    eos_id: int,
    options: Options,
    max_tokens: list[int],
    prefill_step: int = PREFILL_STEP,
    start_time: float | None = None,
) -> Iterator[tuple[int, Chunk]]:
    """Several sequences decoded together: yields `(index, chunk)`; each sequence's last chunk carries
    its `finish_reason`, and a finished sequence leaves the batch (each stops on its own).

    `prompts` holds `(tokens, embeddings)` pairs, where `embeddings` is an (L, D) array or a callable
    returning it (so image features are computed one prompt at a time). Each prompt is prefilled into a fresh
    KV cache with the values `stream_tokens` gives it (`prefill_many`: on the CPU, layer by layer over all of
    them, each weight dequantized once for the batch); the caches are then merged into mlx-lm's
    left-padded `BatchKVCache` and every decode step runs all remaining sequences as one batch, so the
    weights are read once per step for all of them. `max_tokens[i]` caps sequence i. Token and chunk
    semantics (end of sequence, length, text) are `_decode`'s, the same as for one sequence.
    """
    from collections import deque

    from mlx_lm.generate import generation_stream
    from mlx_lm.models.cache import BatchKVCache

    tic = start_time or time.perf_counter()
    sampler = options.sampler()
    jobs = [(tokens, emb() if callable(emb) else emb, model.make_cache()) for tokens, emb in prompts]
    prefill_many(model, jobs, prefill_step)
    caches, last = [cache for _, _, cache in jobs], [emb[-1:] for _, emb, _ in jobs]
    del jobs
    with mx.stream(generation_stream):
        batch = [BatchKVCache.merge(list(layer)) for layer in zip(*caches)]
    del caches

    def step(inputs: mx.array, embeddings: mx.array | None = None) -> mx.array:
        with mx.stream(generation_stream):
            logits = model(inputs, cache=batch, input_embeddings=embeddings)[:, -1, :]
            return sampler(log_softmax_rows(logits))

    queues = [deque() for _ in prompts]

    def feed(i: int) -> Iterator[tuple[int, None]]:
        while True:
            yield queues[i].popleft(), None

    decoders = [
        _decode(feed(i), detokenizers[i], len(tokens), max_tokens[i], eos_id, tic)
        for i, (tokens, _) in enumerate(prompts)
    ]
    active = list(range(len(prompts)))
    y = step(mx.array([[tokens[-1]] for tokens, _ in prompts]), mx.stack(last))
    mx.async_eval(y)
    with wired_limit(model, [generation_stream]):
        while active:
            next_y = step(y[:, None])  # computed while the current tokens are handed out
            mx.async_eval(next_y)
            keep = []
            for row, (i, token) in enumerate(zip(active, y.tolist())):
                queues[i].append(token)
                chunk = next(decoders[i])
                if chunk.finish_reason is None:
                    keep.append(row)
                yield i, chunk
            if len(keep) < len(active):
                if not keep:
                    break
                rows = mx.array(keep)
                for c in batch:
                    c.filter(rows)
                next_y = next_y[rows]
                active = [active[row] for row in keep]
            y = next_y
