"""`Pixtral`: the object `pixtral_mlx.load()` returns: encode, logits, stream, generate, chat.

Every entry point takes one `Options` value (or a few options by name) and goes through the one turn path,
in two public steps: `plan_turn` (context check, prefix reuse against a caller-held `PromptCache`, grammar,
memory plan: refused before any work) and `run_turn` (image features from the `FeatureCache`, prefill,
decode, streamed as `Chunk`s). `stream`/`generate` run it on a fresh or caller-held cache, `Chat` and the
server on their own.

One module on purpose, though over 300 lines: it is the `Pixtral` facade and the turn path the facade owns
(each entry point is a few lines over `plan_turn`/`run_turn`; `Turn` and `FeatureCache` are that path's state),
while the work itself lives in `prompt`, `generate`, `memory` and `structured`.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .config import check_context_length
from .errors import ContextError, ContextLengthWarning, PromptError
from .generate import (
    Chunk,
    Options,
    PromptCache,
    Reply,
    check_context,
    collect,
    prompt_keys,
    sampling_processors,
    stream_batch,
    stream_tokens,
)
from .memory import MemoryPlan, batch_groups, estimate, patch_groups, suggestions
from .prompt import EncodedImage, Prompt, PromptEncoder
from .structured import logits_processors

FEATURE_CACHE_BYTES = 2 * 1024**3  # vision features kept for reuse (a 1024² image is ~84 MB in fp32)


def _vision_buffers(model: Any) -> Any:
    """On the CPU backend, the widened float32 weights of one vision encoding reuse each other's buffers
    (`cpu.vision_buffers`)."""
    from . import backend

    if not backend.on_cpu():
        return nullcontext()
    from . import cpu

    return cpu.vision_buffers(model)


def _vision_groups(images: list[EncodedImage]) -> list[list[EncodedImage]]:
    """Consecutive groups of images with at most VISION_BATCH_PATCHES patches each (an image larger than
    that is a group of its own)."""
    return [[images[i] for i in group] for group in patch_groups([img.patches for img in images])]


class FeatureCache:
    """Projected vision features by image content digest, the least recently used evicted past `budget` bytes."""

    def __init__(self, budget: int = FEATURE_CACHE_BYTES):
        self.budget = budget
        self._items: OrderedDict[str, mx.array] = OrderedDict()

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._items.values())

    def get(self, digest: str) -> mx.array:
        self._items.move_to_end(digest)
        return self._items[digest]

    def put(self, digest: str, features: mx.array) -> None:
        self._items[digest] = features

    def evict(self, keep: int = 1) -> None:
        """Drop the oldest entries until the budget holds (the last `keep` stay whatever their size)."""
        while self.nbytes > self.budget and len(self._items) > keep:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


@dataclass
class Turn:
    """A planned turn: what `run_turn` will prefill and decode, decided (and checked) before any work."""

    prompt: Prompt
    cache: PromptCache
    keep: int  # tokens of `prompt` the cache already holds
    options: Options  # max_tokens already capped by the context
    plan: MemoryPlan
    keys: list[Hashable]  # `prompt_keys` of the prompt: what each position feeds the model
    processors: list[Any]  # logits processors (a JSON grammar)
    start: float  # perf_counter() when the turn began (for the statistics)


def _needs_one_by_one(o: Options) -> bool:
    """Options the batched decode does not take: they run on the single-turn path, prompt after prompt."""
    constrained = o.json_schema is not None or o.json_object
    sampling = o.logit_bias or o.presence_penalty or o.frequency_penalty or o.logprobs
    return bool(o.kv_bits is not None or o.stop or constrained or sampling)


class Pixtral:
    def __init__(self, model: Any, encoder: PromptEncoder, path: Path | None = None, context_length: int | None = None):
        """`context_length`: the most tokens a prompt and its reply may hold; default the window the model
        was trained on (`trained_context_length`). Lower is always allowed; higher warns
        (`ContextLengthWarning`)."""
        self.model = model
        self.encoder = encoder
        self.path = path
        self.args = model.args
        self.trained_context_length = model.args.context_length
        self.context_length, warning = check_context_length(context_length, self.trained_context_length)
        if warning:
            warnings.warn(warning, ContextLengthWarning, stacklevel=2)
        self.vision_runs = 0  # how many images the vision encoder has encoded (tests, stats)
        self.features = FeatureCache()

    # Prompts ---------------------------------------------------------------------------------
    def encode(
        self, messages: list[dict[str, Any]], max_edge: int | None = None, options: Options | None = None
    ) -> Prompt:
        """OpenAI-format messages -> token ids, pixel arrays, per-image grid and token counts; with `options`,
        its `max_edge` and tools (the prompt a turn with these options reads)."""
        if options is None:
            return self.encoder.encode(messages, max_edge=max_edge)
        tools = (options.tools, options.tool_choice, options.parallel_tool_calls) if options.tools else ()
        return self.encoder.encode(messages, options.max_edge if max_edge is None else max_edge, *tools)

    def image_features(self, images: list[EncodedImage]) -> list[mx.array]:
        """Projected vision features of each image; the ones not cached are encoded together, once."""
        new = list({img.digest: img for img in images if img.digest not in self.features}.values())
        for group in _vision_groups(new):
            with _vision_buffers(self.model):
                feats = self.model.encode_images([img.pixels for img in group])
                mx.eval(feats)
            self.vision_runs += len(group)
            for img, f in zip(group, feats):
                self.features.put(img.digest, f)
        out = [self.features.get(img.digest) for img in images]
        self.features.evict()
        return out

    def encode_rows(self, prompts: list[Prompt], patches: list[int]) -> None:
        """Before rows are prefilled together: the new images of consecutive rows (`patches`: each row's new image
        patches, `MemoryPlan.vision_patches`) go through the vision encoder together, up to VISION_BATCH_PATCHES
        patches a call, as `memory.batch_bytes` counts them (8 prompts with a 128² image each: 0.9-1.1 -> 0.5-0.6 s
        on 2 CPU cores); a row larger than that encodes its own images when it is prefilled, as alone."""
        for rows in patch_groups(patches):
            if len(rows) > 1:
                self.image_features([img for r in rows for img in prompts[r].images])

    def embeddings(self, prompt: Prompt, start: int = 0) -> mx.array:
        """Input embeddings (L - start, D) for tokens[start:], encoding only the images needed there."""
        ids = np.asarray(prompt.tokens, dtype=np.int64)
        skip = int((ids[:start] == self.args.image_token_id).sum())  # [IMG] rows already in the cache
        needed, offsets, seen = [], [], 0
        for img in prompt.images:
            n = img.grid[0] * img.grid[1]
            if seen + n > skip:
                needed.append(img)
                offsets.append(max(skip - seen, 0))
            seen += n
        feats = [f[o:] for f, o in zip(self.image_features(needed), offsets)]
        features = mx.concatenate(feats, axis=0) if feats else None
        return self.model.embed(ids[start:], features)[0]

    # Evaluation ------------------------------------------------------------------------------
    def logits(self, messages: list[dict[str, Any]], max_edge: int | None = None) -> np.ndarray:
        """float32 logits (prompt_len, vocab) of a full forward pass, for evaluation."""
        prompt = self.encode(messages, max_edge=max_edge)
        emb = self.embeddings(prompt)
        out = self.model(mx.array(prompt.tokens)[None], input_embeddings=emb[None])
        return np.array(out[0].astype(mx.float32))

    # Generation ------------------------------------------------------------------------------
    def new_cache(self, kv_bits: int | None = None, kv_group_size: int = 64) -> PromptCache:
        """An empty KV cache; `kv_bits` (4 or 8) makes it mlx-lm's quantized cache from the first token."""
        from .kvcache import make_layers

        Options(kv_bits=kv_bits, kv_group_size=kv_group_size)  # the one check of the values
        return PromptCache(make_layers(self.model, kv_bits, kv_group_size), kv_bits, kv_group_size)

    def memory_plan(
        self,
        messages: list[dict[str, Any]] | Prompt,
        options: Options | None = None,
        *,
        cache: PromptCache | None = None,
        **overrides: Any,
    ) -> MemoryPlan:
        """What `stream` with these options would need (weights, KV cache, vision encoder, prefill) and what
        the machine has, without doing the work (a plan that does not fit is returned, not raised)."""
        from .kvcache import check_group

        options = Options.of(options, **overrides)
        if cache is None:  # a given cache's setting was checked when it was made
            check_group(self.args, options.kv_bits, options.kv_group_size)
        prompt = self._prompt(messages, options)
        max_tokens = check_context(len(prompt), options.max_tokens, self.context_length)
        cache = self._cache_for(cache, options)
        return self._plan(prompt, cache, cache.reusable(prompt.tokens), max_tokens)

    def stream(
        self,
        messages: list[dict[str, Any]] | Prompt,
        options: Options | None = None,
        *,
        cache: PromptCache | None = None,
        **overrides: Any,
    ) -> Iterator[Chunk]:
        """Stream a reply to `messages` (or an already encoded `Prompt`); the last chunk carries
        `finish_reason` and the statistics.

        `options` (an `Options`) and/or options by name (`max_tokens`, `temperature`, `top_p`, `seed`,
        `stop`, `json_schema`, `json_object`, `kv_bits`, `kv_group_size`, `max_edge`; see `Options`).
        Options, the context and the memory plan are checked before any work (`MemoryPlanError` over the
        machine's limit; an unsupported JSON schema raises too). Pass a `cache` (from `new_cache()`) to
        reuse it across calls: each call prefills only what differs from the tokens it holds (a given cache
        keeps its own KV setting).
        """
        tic = time.perf_counter()
        options = Options.of(options, **overrides)
        prompt = self._prompt(messages, options)
        return self.run_turn(self.plan_turn(prompt, self._cache_for(cache, options), options, start=tic))

    def generate(self, messages: list[dict[str, Any]] | Prompt, options: Options | None = None, **kw: Any) -> Reply:
        """The whole reply as text, with mlx-lm's statistics (same arguments as `stream`)."""
        return collect(self.stream(messages, options, **kw))

    def stream_batch(
        self, prompts: list[list[dict[str, Any]] | Prompt], options: Options | None = None, **overrides: Any
    ) -> Iterator[tuple[int, Chunk]]:
        """Replies to several independent prompts, decoded together: yields `(index, chunk)` pairs; each
        reply's last chunk carries its `finish_reason` and statistics, and each stops on its own.

        Each prompt is prefilled on its own (its images encoded then), and every decode step runs the
        remaining sequences together, which reads the weights once for all of them. At temperature 0 the
        replies are token for token those of `generate` on each prompt alone. Options, every prompt's
        context and memory plan are checked before any work; rows that would not fit together are decoded
        in consecutive smaller groups. Options the batched decode does not take (a quantized KV cache, stop
        strings, a JSON constraint, logit bias, penalties, logprobs) run the prompts one after another on the
        single-turn path instead.
        """
        tic = time.perf_counter()
        options = Options.of(options, **overrides)
        encoded = [self._prompt(p, options) for p in prompts]
        limits, plans = [], []
        for i, prompt in enumerate(encoded):
            try:
                limits.append(check_context(len(prompt), options.max_tokens, self.context_length))
            except ContextError as e:
                raise ContextError(f"prompt {i + 1} of {len(encoded)}: {e}", param=e.param) from None
        if _needs_one_by_one(options):
            return self._one_by_one(encoded, options)
        for prompt, limit in zip(encoded, limits):
            plan = estimate(self, prompt, keep=0, max_tokens=limit, kv_bits=None, kv_group_size=64)
            if not plan.fits:
                raise plan.refusal(suggestions(plan, lambda bits, p=prompt, n=limit: self._plan(p, None, 0, n, bits)))
            plans.append(plan)
        groups = batch_groups(plans, self.features.nbytes)
        return self._batches(encoded, limits, groups, [p.vision_patches for p in plans], options, tic)

    def generate_batch(self, prompts: list[list[dict[str, Any]] | Prompt], *args: Any, **kwargs: Any) -> list[Reply]:
        """Whole replies to several prompts, decoded together (same arguments as `stream_batch`)."""
        replies = [Reply() for _ in prompts]
        for i, chunk in self.stream_batch(prompts, *args, **kwargs):
            replies[i].add(chunk)
        return replies

    def chat(self, system: str | None = None, options: Options | None = None, **overrides: Any) -> Any:
        """A `Chat`: a multi-turn conversation that keeps its KV cache and image features across turns.
        `options` and options by name as for `stream`: the chat's defaults, which each turn may override."""
        from .chat import Chat

        return Chat(self, system=system, options=Options.of(options, **overrides))

    # The turn path -----------------------------------------------------------------------------
    def plan_turn(
        self,
        prompt: Prompt,
        cache: PromptCache,
        options: Options,
        *,
        context_used: int | None = None,
        start: float | None = None,
    ) -> Turn:
        """Decide a turn before any work: check the context (`context_used`: a conversation's tokens before
        this turn, for the message), build the grammar, find the prefix `cache` already holds and check the
        memory plan; raise if any of them refuses. Then trims `cache` to that prefix."""
        from .tools import logits_processors as tool_processors

        start = time.perf_counter() if start is None else start
        if options.tools or prompt.tools:  # the options' tools into a prompt encoded without them (in place)
            self.encoder.retool(prompt, options)
        max_tokens = check_context(len(prompt), options.max_tokens, self.context_length, context_used=context_used)
        constrained = options.json_schema is not None or options.json_object
        # logit_bias and penalties first, the grammar's mask last; grammar and bias errors raise here
        biased = options.logit_bias or options.presence_penalty or options.frequency_penalty
        processors = sampling_processors(options, self.encoder.text.n_words) if biased else []
        processors += logits_processors(options, self.encoder) if constrained else []
        processors += tool_processors(options, self.encoder) if options.tools else []
        # Without images every position's key is its token id: prompt_keys would return the tokens themselves.
        keys = prompt_keys(prompt.tokens, prompt.images, self.args.image_token_id) if prompt.images else prompt.tokens
        keep = cache.reusable(prompt.tokens, keys if prompt.images else None)
        plan = self._plan(prompt, cache, keep, max_tokens)
        if not plan.fits:
            raise plan.refusal(suggestions(plan, lambda bits: self._plan(prompt, cache, keep, max_tokens, bits)))
        cache.trim(keep)
        options = options.merge(max_tokens=max_tokens)
        return Turn(prompt, cache, keep, options, plan, keys, processors, start)

    def run_turn(self, turn: Turn) -> Iterator[Chunk]:
        """Encode the images the turn needs, prefill what the cache lacks and decode; on close,
        `turn.cache.tokens` holds exactly what the cache holds (a stopped reply's tokens too)."""
        prompt, cache, keep = turn.prompt, turn.cache, turn.keep
        mx.reset_peak_memory()
        generated: list[int] = []
        try:
            emb = self.embeddings(prompt, start=keep)
            for chunk in stream_tokens(
                self.model,
                self.encoder.detokenizer(),
                prompt.tokens[keep:],
                emb,
                cache.layers,
                eos_id=self.encoder.eos_id,
                options=turn.options,
                prefill_step=turn.plan.prefill_step,
                start_time=turn.start,
                logits_processors=turn.processors,
            ):
                if chunk.token is not None:
                    generated.append(chunk.token)
                if chunk.finish_reason == "stop" and chunk.token is None:  # the end-of-sequence token
                    generated.append(self.encoder.eos_id)
                yield chunk
        finally:
            # Every token consumed has been fed to the cache (a stopped reply's too).
            cache.tokens = (prompt.tokens + generated)[: cache.offset]
            cache.keys = (turn.keys + generated)[: cache.offset]

    # Internals ---------------------------------------------------------------------------------
    def _prompt(self, messages: list[dict[str, Any]] | Prompt, options: Options) -> Prompt:
        return messages if isinstance(messages, Prompt) else self.encode(messages, options=options)

    def _cache_for(self, cache: PromptCache | None, options: Options) -> PromptCache:
        """The caller's cache (whose KV setting must agree with an explicit `kv_bits`), or a new one."""
        if cache is None:
            return self.new_cache(options.kv_bits, options.kv_group_size)
        if options.kv_bits is not None and options.kv_bits != cache.kv_bits:
            raise PromptError(
                f"kv_bits must match the cache's ({cache.kv_bits}), got {options.kv_bits}.", param="kv_bits"
            )
        return cache

    def _plan(
        self, prompt: Prompt, cache: PromptCache | None, keep: int, max_tokens: int, kv_bits: Any = False
    ) -> MemoryPlan:
        """The memory plan of prefilling `prompt` after `keep` cached tokens (`kv_bits`: another setting)."""
        held_bits, group = (cache.kv_bits, cache.kv_group_size) if cache is not None else (None, 64)
        bits = held_bits if kv_bits is False else kv_bits
        size = cache.nbytes if cache is not None and bits == held_bits else 0
        return estimate(
            self, prompt, keep=keep, max_tokens=max_tokens, kv_bits=bits, kv_group_size=group, cache_bytes=size
        )

    def _one_by_one(self, prompts: list[Prompt], options: Options) -> Iterator[tuple[int, Chunk]]:
        """`stream_batch`'s pairs from the single-turn path, prompt after prompt (each planned when it starts)."""
        for i, prompt in enumerate(prompts):
            chunks = self.stream(prompt, options)
            try:
                for chunk in chunks:
                    yield i, chunk
            finally:
                chunks.close()

    def _batches(
        self,
        prompts: list[Prompt],
        limits: list[int],
        groups: list[list[int]],
        patches: list[int],
        options: Options,
        tic: float,
    ) -> Iterator[tuple[int, Chunk]]:
        """Each group of rows decoded together (`patches`: each row's new image patches, from its plan)."""
        for group in groups:
            mx.reset_peak_memory()
            self.encode_rows([prompts[i] for i in group], [patches[i] for i in group])
            steps = stream_batch(
                self.model,
                [self.encoder.detokenizer() for _ in group],
                [(prompts[i].tokens, lambda p=prompts[i]: self.embeddings(p)) for i in group],
                eos_id=self.encoder.eos_id,
                options=options,
                max_tokens=[limits[i] for i in group],
                start_time=tic,
            )
            try:
                for row, chunk in steps:
                    yield group[row], chunk
            finally:
                steps.close()
