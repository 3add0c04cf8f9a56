"""Token generation on top of mlx-lm's `generate_step`, samplers and KV caches.

`stream_tokens` prefills a token/embedding sequence into a cache in chunks (logits only for the last
position) and yields `Chunk`s with mlx-lm's statistic names. Callers load, prefill and decode on one
thread (MLX streams are per thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step, wired_limit
from mlx_lm.sample_utils import make_sampler

from .config import CONTEXT_LENGTH

DEFAULT_TEMPERATURE = 0.35  # mistral-inference's example for Pixtral; temperature 0 is greedy
DEFAULT_TOP_P = 0.8  # mistral-inference applies top-p 0.8 whenever it samples
DEFAULT_MAX_TOKENS = 512
PREFILL_STEP = 2048


class ContextError(ValueError):
    """A prompt that does not fit the model's context."""


@dataclass
class Chunk:
    """One streamed piece of a reply (mlx-lm's `GenerationResponse` field names)."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length" or "interrupted" on the last chunk


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "prompt_tokens",
                "prompt_tps",
                "generation_tokens",
                "generation_tps",
                "peak_memory",
                "finish_reason",
            )
        }


def sampler_for(temperature: float, top_p: float, seed: int | None) -> Callable[[mx.array], mx.array]:
    if seed is not None:
        mx.random.seed(seed)
    return make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0)


def check_context(n_prompt: int, max_tokens: int, context: int = CONTEXT_LENGTH) -> int:
    """Raise if the prompt does not fit; return how many tokens may still be generated."""
    if n_prompt >= context:
        raise ContextError(
            f"the prompt is {n_prompt:,} tokens, over the model's {context:,}-token context; "
            "remove images or text (or use a smaller --max-edge)."
        )
    return min(max_tokens, context - n_prompt)


def stream_tokens(
    model: Any,
    detokenizer: Any,
    tokens: list[int],
    embeddings: mx.array,
    cache: list[Any],
    *,
    eos_id: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    seed: int | None = None,
    prefill_step: int = PREFILL_STEP,
    start_time: float | None = None,
) -> Iterator[Chunk]:
    """Prefill `tokens` (with their `embeddings`, shape (L, D)) into `cache`, then decode.

    `start_time` lets callers count image encoding into the prompt speed, as users feel it.
    """
    from mlx_lm.generate import generation_stream

    tic = start_time or time.perf_counter()
    sampler = sampler_for(temperature, top_p, seed)
    n_prompt = len(tokens)
    steps = generate_step(
        mx.array(tokens),
        model,
        generation_stream,
        max_tokens=max_tokens,
        sampler=sampler,
        prompt_cache=cache,
        prefill_step_size=prefill_step,
        input_embeddings=embeddings,
    )
    try:
        with wired_limit(model, [generation_stream]):  # Metal: keep the weights resident
            yield from _decode(steps, detokenizer, n_prompt, max_tokens, eos_id, tic)
    finally:
        steps.close()


def _decode(
    steps: Iterator[Any], detokenizer: Any, n_prompt: int, max_tokens: int, eos_id: int, tic: float
) -> Iterator[Chunk]:
    prompt_tps = gen_tps = 0.0
    n = 0
    finish, tail, last = "length", "", None
    for token, _ in steps:
        if n == 0:
            prompt_tps = n_prompt / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
        n += 1
        gen_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9)
        if token == eos_id:
            finish = "stop"
            break
        text = detokenizer.add(token)
        if n >= max_tokens:
            tail, last = text, token
            break
        yield Chunk(text, token, n_prompt, prompt_tps, n, gen_tps, mx.get_peak_memory() / 1e9)
    tail += detokenizer.flush()
    yield Chunk(tail, last, n_prompt, prompt_tps, n, gen_tps, mx.get_peak_memory() / 1e9, finish)
