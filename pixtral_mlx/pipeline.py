"""`Pixtral`: the object `pixtral_mlx.load()` returns: encode, logits, stream, generate, chat.

`_stream_prompt` is the one turn path (context check, cache reuse, image features, prefill, decode):
`stream`/`generate` run it on a fresh or caller-held `PromptCache`, `Chat` on its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .chat import Chat
from .config import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .errors import ContextError
from .generate import Chunk, Options, PromptCache, Reply, check_context, collect, stream_batch, stream_tokens
from .prompt import EncodedImage, Prompt, PromptEncoder

FEATURE_CACHE_BYTES = 2 * 1024**3  # vision features kept for reuse (a 1024² image is ~84 MB in fp32)


class Pixtral:
    def __init__(self, model: Any, encoder: PromptEncoder, path: Path | None = None):
        self.model = model
        self.encoder = encoder
        self.path = path
        self.args = model.args
        self.context_length = model.args.text.max_position_embeddings
        self.vision_runs = 0  # how many images the vision encoder has encoded (tests, stats)
        self._features: OrderedDict[str, mx.array] = OrderedDict()

    # Prompts ---------------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]], max_edge: int | None = None) -> Prompt:
        """OpenAI-format messages -> token ids, pixel arrays, per-image grid and token counts."""
        return self.encoder.encode(messages, max_edge=max_edge)

    def image_features(self, images: list[EncodedImage]) -> list[mx.array]:
        """Projected vision features of each image; the ones not cached are encoded together, once."""
        new = list({img.digest: img for img in images if img.digest not in self._features}.values())
        if new:
            feats = self.model.encode_images([img.pixels for img in new])
            mx.eval(feats)
            self.vision_runs += len(new)
            self._features.update(zip((img.digest for img in new), feats))
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
    def new_cache(self) -> PromptCache:
        return PromptCache(self.model.make_cache())

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
    ) -> Iterator[Chunk]:
        """Stream a reply to `messages` (or an already encoded `Prompt`); the last chunk carries
        `finish_reason` and the statistics.

        Options and the context are checked before any work. Pass a `cache` (from `new_cache()`) to
        reuse it across calls: each call prefills only what differs from the tokens it holds.
        """
        tic = time.perf_counter()
        options = Options(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        prompt = messages if isinstance(messages, Prompt) else self.encode(messages, max_edge=max_edge)
        return self._stream_prompt(prompt, cache or self.new_cache(), options, tic)

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

        Keyword arguments: `max_edge` and the generation defaults of `stream` (`max_tokens`,
        `temperature`, `top_p`, `seed`), which each turn may override.
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
        keep = cache.reusable(prompt.tokens)
        cache.trim(keep)
        return self._turn(prompt, cache, keep, Options.merge(options, max_tokens=max_tokens), tic)

    def _turn(self, prompt: Prompt, cache: PromptCache, keep: int, options: Options, tic: float) -> Iterator[Chunk]:
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
                start_time=tic,
            ):
                if chunk.token is not None:
                    generated.append(chunk.token)
                if chunk.finish_reason == "stop":
                    generated.append(self.encoder.eos_id)
                yield chunk
        finally:
            # Every token consumed has been fed to the cache (a stopped reply's too).
            cache.tokens = (prompt.tokens + generated)[: cache.offset]
