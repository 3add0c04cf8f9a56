"""Multi-turn conversations that keep their KV cache and image features across turns.

Each turn encodes the whole history with mistral_common (so the tokens are exactly the reference
layout), finds the longest prefix already in the KV cache, trims the cache to it and prefills only
the rest. Regenerate and undo are edits of `messages`; the prefix match trims what changed.
Note: tekken v3 puts the system prompt before the *last* user message, so with a system prompt each
turn re-prefills the text from the last user message on (image features stay cached).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from .config import CONTEXT_LENGTH
from .generate import DEFAULT_MAX_TOKENS, Chunk, ContextError, Reply, stream_tokens
from .pipeline import Pixtral, collect


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Chat:
    def __init__(self, pixtral: Pixtral, system: str | None = None, max_edge: int | None = None, **defaults: Any):
        self.pixtral = pixtral
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.max_edge = max_edge
        self.defaults = {"max_tokens": DEFAULT_MAX_TOKENS, **defaults}
        self.cache: list[Any] | None = None
        self.cached: list[int] = []  # the tokens whose keys/values are in `cache`
        self.context_used = 0  # tokens of the history after the last turn
        self.last_finish: str | None = None  # "stop", "length" or "interrupted"

    # Public API --------------------------------------------------------------------------------
    def send(self, content: Any, **kwargs: Any) -> Reply:
        return collect(self.stream(content, **kwargs))

    def stream(self, content: Any, **kwargs: Any) -> Iterator[Chunk]:
        """Add a user message and stream the reply; a failed turn leaves the history unchanged."""
        self.messages.append({"role": "user", "content": content})
        try:
            prepared = self._prepare(kwargs)
        except Exception:
            self.messages.pop()
            raise
        return self._run(*prepared)

    def regenerate(self, **kwargs: Any) -> Iterator[Chunk]:
        """Replace the last reply with a new one."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no reply to regenerate.")
        last = self.messages.pop()
        try:
            prepared = self._prepare(kwargs)
        except Exception:
            self.messages.append(last)
            raise
        return self._run(*prepared)

    def undo(self) -> dict[str, Any] | None:
        """Remove the last user turn (and its reply); return the removed user message."""
        removed = None
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            removed = self.messages.pop()
        self.context_used = self.history_tokens()
        return removed

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cache, self.cached, self.context_used = None, [], 0

    def restore(self, messages: list[dict[str, Any]]) -> None:
        """Start from a saved history; the next turn prefills it once."""
        self.reset()
        self.messages = list(messages)
        self.context_used = self.history_tokens()

    def history_tokens(self) -> int:
        """Tokens the history uses on its own (0 for an empty chat)."""
        if not any(m["role"] != "system" for m in self.messages):
            return 0
        return max(self.tokens_needed("") - 2, 0)  # less the `[INST][/INST]` of an empty message

    def tokens_needed(self, content: Any) -> int:
        """How many tokens the history would use with `content` as the next user message."""
        return len(self.pixtral.encode(self.messages + [{"role": "user", "content": content}], max_edge=self.max_edge))

    # Internals ---------------------------------------------------------------------------------
    def _prepare(self, kwargs: dict[str, Any]) -> tuple[Any, ...]:
        tic = time.perf_counter()
        opts = {**self.defaults, **kwargs}
        prompt = self.pixtral.encode(self.messages, max_edge=self.max_edge)
        if len(prompt) >= CONTEXT_LENGTH:
            new = len(prompt) - min(len(prompt), self.context_used)
            raise ContextError(
                f"this turn needs {new:,} more tokens and the conversation would reach {len(prompt):,} of the "
                f"{CONTEXT_LENGTH:,}-token context; remove images, undo turns or start a new chat."
            )
        opts["max_tokens"] = min(opts["max_tokens"], CONTEXT_LENGTH - len(prompt))
        if self.cache is None:
            self.cache, self.cached = self.pixtral.model.make_cache(), []
        keep = min(_common_prefix(prompt.tokens, self.cached), len(prompt) - 1)
        if self.cache[0].offset > keep:
            trim_prompt_cache(self.cache, self.cache[0].offset - keep)
        self.cached = self.cached[:keep]
        emb = self.pixtral.embeddings(prompt, start=keep)
        return prompt, keep, emb, opts, tic

    def _run(self, prompt: Any, keep: int, emb: mx.array, opts: dict[str, Any], tic: float) -> Iterator[Chunk]:
        mx.reset_peak_memory()
        px = self.pixtral
        new_tokens = prompt.tokens[keep:]
        generated: list[int] = []
        text = ""
        finish = "interrupted"
        try:
            for chunk in stream_tokens(
                px.model,
                px.encoder.detokenizer(),
                new_tokens,
                emb,
                self.cache,
                eos_id=px.encoder.eos_id,
                start_time=tic,
                **{k: v for k, v in opts.items() if k in ("max_tokens", "temperature", "top_p", "seed")},
            ):
                text += chunk.text
                if chunk.token is not None:
                    generated.append(chunk.token)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                    if finish == "stop":
                        generated.append(px.encoder.eos_id)
                yield chunk
        finally:
            # Every token consumed has been fed to the cache; keep the partial reply on a stop.
            self.cached = (prompt.tokens + generated)[: self.cache[0].offset]
            self.messages.append({"role": "assistant", "content": text})
            self.context_used = len(prompt) + len(generated)
            self.last_finish = finish
