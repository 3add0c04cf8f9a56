"""Token generation on top of mlx-lm's `generate_step`, samplers and KV caches.

What every turn shares lives here: the `PromptCache` (a KV cache and the tokens it holds, reused by
longest common prefix), the context check, and `stream_tokens`, which prefills a token/embedding
sequence into a cache in chunks (logits only for the last position) and decodes. The options and the
`Chunk`/`Reply` carriers are in `turn.py`; `Pixtral._stream_prompt` is the one turn path on top of
both. Callers load, prefill and decode on one thread (MLX streams are per thread).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, wired_limit
from mlx_lm.models.cache import trim_prompt_cache

from .config import CONTEXT_LENGTH
from .errors import ContextError
from .turn import Chunk, Options, Reply, Stats, collect

__all__ = ["Chunk", "Options", "PromptCache", "Reply", "Stats", "check_context", "collect", "stream_tokens"]

PREFILL_STEP = 2048


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
        "remove images or text (or use a smaller --max-edge)."
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """A KV cache (one entry per decoder layer) and the tokens whose keys and values it holds.

    A new prompt reuses the longest common prefix: `reusable(tokens)` says how much (at least the
    last token is always prefilled again, to get its logits), `trim(keep)` drops the rest.
    """

    def __init__(self, layers: list[Any]):
        self.layers = layers
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else len(self.tokens)

    def reusable(self, tokens: list[int]) -> int:
        return min(common_prefix(tokens, self.tokens), max(len(tokens) - 1, 0))

    def trim(self, keep: int) -> None:
        if self.offset > keep:
            trim_prompt_cache(self.layers, self.offset - keep)
        self.tokens = self.tokens[:keep]


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
            yield from _decode(steps, detokenizer, len(tokens), options.max_tokens, eos_id, tic)
    finally:
        steps.close()


def _decode(
    steps: Iterator[Any], detokenizer: Any, n_prompt: int, max_tokens: int, eos_id: int, tic: float
) -> Iterator[Chunk]:
    stats = Stats(prompt_tokens=n_prompt, finish_reason="length")
    n = 0
    tail, last = "", None
    for token, _ in steps:
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
        text = detokenizer.add(token)
        if n >= max_tokens:
            tail, last = text, token
            break
        yield Chunk(**{**stats.stats(), "finish_reason": None}, text=text, token=token)
    tail += detokenizer.flush()
    yield Chunk(**stats.stats(), text=tail, token=last)
