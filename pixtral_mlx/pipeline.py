"""`Pixtral`: the object `pixtral_mlx.load()` returns: encode, logits, stream, generate, chat."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from .generate import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Chunk, Reply, check_context, stream_tokens
from .prompt import EncodedImage, Prompt, PromptEncoder

if TYPE_CHECKING:
    from .chat import Chat

FEATURE_CACHE_BYTES = 2 * 1024**3  # vision features kept for reuse (a 1024² image is ~84 MB in fp32)


class Pixtral:
    def __init__(self, model: Any, encoder: PromptEncoder, path: Path | None = None):
        self.model = model
        self.encoder = encoder
        self.path = path
        self.args = model.args
        self.vision_runs = 0  # how many times the vision encoder ran (tests, stats)
        self._features: OrderedDict[str, mx.array] = OrderedDict()

    # Prompts ---------------------------------------------------------------------------------
    def encode(self, messages: list[dict[str, Any]], max_edge: int | None = None) -> Prompt:
        """OpenAI-format messages -> token ids, pixel arrays, per-image grid and token counts."""
        prompt = self.encoder.encode(messages, max_edge=max_edge)
        for img in prompt.images:
            img.digest = _digest(img.pixels)
        return prompt

    def image_features(self, image: EncodedImage) -> mx.array:
        """Projected vision features of one image, computed once per distinct content."""
        key = image.digest or _digest(image.pixels)
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        feats = self.model.encode_image(image.pixels)
        mx.eval(feats)
        self.vision_runs += 1
        self._features[key] = feats
        while sum(f.nbytes for f in self._features.values()) > FEATURE_CACHE_BYTES and len(self._features) > 1:
            self._features.popitem(last=False)
        return feats

    def embeddings(self, prompt: Prompt, start: int = 0) -> mx.array:
        """Input embeddings (L - start, D) for tokens[start:], encoding only the images needed there."""
        ids = np.asarray(prompt.tokens, dtype=np.int64)
        skip = int((ids[:start] == self.args.image_token_id).sum())  # [IMG] rows already in the cache
        feats, seen = [], 0
        for img in prompt.images:
            n = img.grid[0] * img.grid[1]
            if seen + n > skip:
                f = self.image_features(img)
                feats.append(f[max(skip - seen, 0) :])
            seen += n
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
    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int | None = None,
        max_edge: int | None = None,
    ) -> Iterator[Chunk]:
        """Stream a reply to `messages`; the last chunk carries `finish_reason` and the statistics."""
        tic = time.perf_counter()
        mx.reset_peak_memory()
        prompt = self.encode(messages, max_edge=max_edge)
        max_tokens = check_context(len(prompt), max_tokens)
        emb = self.embeddings(prompt)
        yield from stream_tokens(
            self.model,
            self.encoder.detokenizer(),
            prompt.tokens,
            emb,
            self.model.make_cache(),
            eos_id=self.encoder.eos_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            start_time=tic,
        )

    def generate(self, messages: list[dict[str, Any]], **kwargs: Any) -> Reply:
        """The whole reply as text, with mlx-lm's statistics."""
        return collect(self.stream(messages, **kwargs))

    def chat(self, system: str | None = None, **defaults: Any) -> Chat:
        """A multi-turn conversation that keeps its KV cache and image features across turns."""
        from .chat import Chat

        return Chat(self, system=system, **defaults)


def _digest(pixels: np.ndarray) -> str:
    """The vision-feature cache key: the processed pixels' content and shape, never the path."""
    h = hashlib.blake2b(pixels.tobytes(), digest_size=16)
    h.update(str(pixels.shape).encode())
    return h.hexdigest()


def collect(chunks: Iterator[Chunk]) -> Reply:
    reply = Reply(text="")
    for c in chunks:
        reply.text += c.text
        if c.token is not None:
            reply.tokens.append(c.token)
        for k in ("prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory", "finish_reason"):
            setattr(reply, k, getattr(c, k))
    return reply
