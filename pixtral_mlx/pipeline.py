"""`Pixtral`: the object `pixtral_mlx.load()` returns: encode, logits, stream, generate, chat.

`_stream_prompt` is the one turn path (context check, cache reuse, image features, prefill, decode):
`stream`/`generate` run it on a fresh or caller-held `PromptCache`, `Chat` on its own.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .chat import Chat
from .config import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, check_context_length
from .errors import ContextError, ContextLengthWarning, PromptError
from .generate import (
    PREFILL_STEP,
    Chunk,
    Options,
    PromptCache,
    Reply,
    check_context,
    collect,
    prompt_keys,
    stream_batch,
    stream_tokens,
)
from .memory import MemoryPlan, estimate, suggestions
from .prompt import EncodedImage, Prompt, PromptEncoder
from .structured import logits_processors

FEATURE_CACHE_BYTES = 2 * 1024**3  # vision features kept for reuse (a 1024² image is ~84 MB in fp32)
# New images go through the vision encoder together up to this many patches (a 1024² image is 4096):
# many small images share one call (1.8x faster for 8 x 128² on CPU), large ones go alone (one call for
# 2 x 1024² was slower there, and holds twice the activations). See benchmarks/experiments.py vision.
VISION_BATCH_PATCHES = 4096


def _vision_groups(images: list[EncodedImage]) -> list[list[EncodedImage]]:
    """Consecutive groups of images with at most VISION_BATCH_PATCHES patches each (an image larger than
    that is a group of its own)."""
    groups: list[list[EncodedImage]] = []
    size = 0
    for img in images:
        n = img.grid[0] * img.grid[1]
        if not groups or size + n > VISION_BATCH_PATCHES:
            groups.append([])
            size = 0
        groups[-1].append(img)
        size += n
    return groups


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
        self._features: OrderedDict[str, mx.array] = OrderedDict()

    # Prompts ---------------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]], max_edge: int | None = None) -> Prompt:
        """OpenAI-format messages -> token ids, pixel arrays, per-image grid and token counts."""
        return self.encoder.encode(messages, max_edge=max_edge)

    def image_features(self, images: list[EncodedImage]) -> list[mx.array]:
        """Projected vision features of each image; the ones not cached are encoded together, once."""
        new = list({img.digest: img for img in images if img.digest not in self._features}.values())
        for group in _vision_groups(new):
            feats = self.model.encode_images([img.pixels for img in group])
            mx.eval(feats)
            self.vision_runs += len(group)
            self._features.update(zip((img.digest for img in group), feats))
        out = []
        for img in images:
            self._features.move_to_end(img.digest)
            out.append(self._features[img.digest])
        while sum(f.nbytes for f in self._features.values()) > FEATURE_CACHE_BYTES and len(self._features) > 1:
            self._features.popitem(last=False)
        return out

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
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        max_edge: int | None = None,
        cache: PromptCache | None = None,
    ) -> MemoryPlan:
        """What `stream` with these arguments would need (weights, KV cache, vision encoder, prefill) and
        what the machine has, without doing the work."""
        from .kvcache import check_group

        options = Options(max_tokens=max_tokens, kv_bits=kv_bits, kv_group_size=kv_group_size)
        check_group(self.args, kv_bits, kv_group_size)
        prompt = messages if isinstance(messages, Prompt) else self.encode(messages, max_edge=max_edge)
        max_tokens = check_context(len(prompt), options.max_tokens, self.context_length)
        if cache is None:
            return estimate(self, prompt, keep=0, max_tokens=max_tokens, kv_bits=kv_bits, kv_group_size=kv_group_size)
        cache = self._cache_for(cache, options)
        return self._plan(prompt, cache, cache.reusable(prompt.tokens), max_tokens)

    def stream(
        self,
        messages: list[dict[str, Any]] | Prompt,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int | None = None,
        max_edge: int | None = None,
        cache: PromptCache | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        stop: str | list[str] | tuple[str, ...] = (),
        json_schema: dict[str, Any] | None = None,
        json_object: bool = False,
    ) -> Iterator[Chunk]:
        """Stream a reply to `messages` (or an already encoded `Prompt`); the last chunk carries
        `finish_reason` and the statistics.

        Options and the context are checked before any work. Pass a `cache` (from `new_cache()`) to
        reuse it across calls: each call prefills only what differs from the tokens it holds.
        `kv_bits` (4 or 8) and `kv_group_size` quantize the KV cache (a given `cache` keeps its own setting).
        The memory plan is checked before any work too: over the machine's limit raises `MemoryPlanError`.
        `stop`: up to 4 strings that end the reply (finish_reason "stop"); the text ends before them.
        `json_schema` (a JSON Schema dict) or `json_object=True` constrain the reply to JSON that parses
        (and validates); it ends when the JSON is complete. An unsupported schema raises before any work.
        """
        tic = time.perf_counter()
        options = Options(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            stop=stop,
            json_schema=json_schema,
            json_object=json_object,
        )
        prompt = messages if isinstance(messages, Prompt) else self.encode(messages, max_edge=max_edge)
        return self._stream_prompt(prompt, self._cache_for(cache, options), options, tic)

    def generate(self, messages: list[dict[str, Any]] | Prompt, **kwargs: Any) -> Reply:
        """The whole reply as text, with mlx-lm's statistics (same arguments as `stream`)."""
        return collect(self.stream(messages, **kwargs))

    def stream_batch(
        self,
        prompts: list[list[dict[str, Any]] | Prompt],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int | None = None,
        max_edge: int | None = None,
    ) -> Iterator[tuple[int, Chunk]]:
        """Replies to several independent prompts, decoded together as one batch: yields `(index, chunk)`
        pairs; each reply's last chunk carries its `finish_reason` and statistics, and each stops on its own.

        Each prompt is prefilled on its own (its images encoded then), and every decode step runs the
        remaining sequences together, which reads the weights once for all of them. At temperature 0 the
        replies are token for token those of `generate` on each prompt alone. Options and every prompt's
        context are checked before any work.
        """
        tic = time.perf_counter()
        options = Options(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        encoded = [p if isinstance(p, Prompt) else self.encode(p, max_edge=max_edge) for p in prompts]
        if not encoded:
            return iter(())
        limits = []
        for i, prompt in enumerate(encoded):
            try:
                limits.append(check_context(len(prompt), options.max_tokens, self.context_length))
            except ContextError as e:
                raise ContextError(f"prompt {i + 1} of {len(encoded)}: {e}", param=e.param) from None
        mx.reset_peak_memory()
        return stream_batch(
            self.model,
            [self.encoder.detokenizer() for _ in encoded],
            [(p.tokens, lambda p=p: self.embeddings(p)) for p in encoded],
            eos_id=self.encoder.eos_id,
            options=options,
            max_tokens=limits,
            start_time=tic,
        )

    def generate_batch(self, prompts: list[list[dict[str, Any]] | Prompt], **kwargs: Any) -> list[Reply]:
        """Whole replies to several prompts, decoded together (same arguments as `stream_batch`)."""
        replies = [Reply() for _ in prompts]
        for i, chunk in self.stream_batch(prompts, **kwargs):
            replies[i].add(chunk)
        return replies

    def chat(self, system: str | None = None, **kwargs: Any) -> Chat:
        """A multi-turn conversation that keeps its KV cache and image features across turns.

        Keyword arguments: `max_edge`, the KV setting (`kv_bits`, `kv_group_size`) and the generation
        defaults of `stream` (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `json_schema`,
        `json_object`), which each turn may override.
        """
        return Chat(self, system=system, **kwargs)

    def _stream_prompt(
        self, prompt: Prompt, cache: PromptCache, options: Options, tic: float, *, context_used: int | None = None
    ) -> Iterator[Chunk]:
        """The one turn path. Checks the context and trims `cache` to the prefix it shares with the
        prompt (now, before any work); the returned generator encodes the images it needs, prefills
        the rest and decodes. On close, `cache.tokens` holds exactly what the cache holds.
        `context_used`: a conversation's tokens before this turn (for the context message)."""
        max_tokens = check_context(len(prompt), options.max_tokens, self.context_length, context_used=context_used)
        constrained = options.json_schema is not None or options.json_object
        processors = logits_processors(options, self.encoder) if constrained else []  # grammar errors raise here
        # Without images every position's key is its token id: prompt_keys would return the tokens themselves.
        keys = prompt_keys(prompt.tokens, prompt.images, self.args.image_token_id) if prompt.images else prompt.tokens
        keep = cache.reusable(prompt.tokens, keys if prompt.images else None)
        plan = self._plan(prompt, cache, keep, max_tokens)
        if not plan.fits:
            raise plan.refusal(suggestions(plan, lambda bits: self._plan(prompt, cache, keep, max_tokens, bits)))
        cache.trim(keep)
        options = Options.merge(options, max_tokens=max_tokens)
        return self._turn(
            prompt, cache, keep, options, tic, prefill_step=plan.prefill_step, processors=processors, keys=keys
        )

    def _cache_for(self, cache: PromptCache | None, options: Options) -> PromptCache:
        """The caller's cache (whose KV setting must agree with an explicit `kv_bits`), or a new one."""
        if cache is None:
            return self.new_cache(options.kv_bits, options.kv_group_size)
        if options.kv_bits is not None and options.kv_bits != cache.kv_bits:
            raise PromptError(
                f"kv_bits must match the cache's ({cache.kv_bits}), got {options.kv_bits}.", param="kv_bits"
            )
        return cache

    def _plan(self, prompt: Prompt, cache: PromptCache, keep: int, max_tokens: int, kv_bits: Any = False) -> MemoryPlan:
        """The memory plan of prefilling `prompt` after `keep` cached tokens (`kv_bits`: another setting)."""
        bits = cache.kv_bits if kv_bits is False else kv_bits
        size = cache.nbytes if bits == cache.kv_bits else 0
        return estimate(
            self,
            prompt,
            keep=keep,
            max_tokens=max_tokens,
            kv_bits=bits,
            kv_group_size=cache.kv_group_size,
            cache_bytes=size,
        )

    def _turn(
        self,
        prompt: Prompt,
        cache: PromptCache,
        keep: int,
        options: Options,
        tic: float,
        prefill_step: int = PREFILL_STEP,
        processors: list[Any] | None = None,
        *,
        keys: list[Any],
    ) -> Iterator[Chunk]:
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
                options=options,
                prefill_step=prefill_step,
                start_time=tic,
                logits_processors=processors,
            ):
                if chunk.token is not None:
                    generated.append(chunk.token)
                if chunk.finish_reason == "stop" and chunk.token is None:  # the end-of-sequence token
                    generated.append(self.encoder.eos_id)
                yield chunk
        finally:
            # Every token consumed has been fed to the cache (a stopped reply's too).
            cache.tokens = (prompt.tokens + generated)[: cache.offset]
            cache.keys = (keys + generated)[: cache.offset]
