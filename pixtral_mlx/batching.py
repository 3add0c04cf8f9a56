"""Continuous batching: one decode loop over a set of rows that grows and shrinks between steps.

A row is one planned turn (`Pixtral.plan_turn`: its options, logits processors and conversation `PromptCache`).
`Batch.add_many` prefills the part of each prompt the row's cache lacks with the values a single turn gives it
(all but the last token in chunks, several rows together where they fit: `generate.prefill_many`) and merges
the row's KV into the running left-padded `BatchKVCache` (mlx-lm's `merge`/`extend`). `Batch.step` runs one
decode step for every row at once (the weights read once for all of them; a row that just joined feeds its last
prompt token, whose logits give its first token), then samples each row with its own
sampler and logits processors (grammar, penalties, bias) and hands the token to that row's `_decode`, which
applies its stop strings, max_tokens and detokenizer. A row that finishes or is cancelled leaves the batch
(`filter`), and its KV (its own positions, without the left padding) goes back into its `PromptCache`, with
the tokens it holds, so the conversation's next turn reuses the prefix.

At temperature 0 a row's tokens are those of the same turn run alone. Rows that need a per-row random stream
(a seed with temperature > 0) or logprobs are not taken here: the server runs them alone (see `solo`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from pixtral_mlx.generate import _decode, log_softmax_rows, prefill_many
from pixtral_mlx.turn import Chunk, Options

__all__ = ["Batch", "Row", "solo"]


def solo(options: Options, n: int = 1) -> str | None:
    """Why a request cannot share a batch (None: it can): several replies, logprobs, a seeded sampler (its
    random stream would depend on the other rows), or a quantized KV cache (no batched form in mlx-lm)."""
    if n > 1:
        return "n > 1"
    if options.logprobs:
        return "logprobs"
    if options.seed is not None and options.temperature > 0:
        return "seeded sampling"
    if options.kv_bits is not None:
        return "kv_bits"
    return None


@dataclass
class Row:
    """One turn in the batch."""

    turn: Any  # pipeline.Turn
    cancelled: Callable[[], bool]
    sampler: Callable[[mx.array], mx.array]
    tokens: list[int]  # what the logits processors see: the prefilled tokens and those generated
    generated: list[int] = field(default_factory=list)  # every token sampled, in order
    next_token: int = 0  # sampled, not yet fed to the model
    feed: deque = field(default_factory=deque)
    decoder: Iterator[Chunk] | None = None
    first: Chunk | None = None  # the chunk of the first token, handed out by the next `step`
    done: bool = False


class Batch:
    """The running batch of a `Pixtral`: `add` rows, `step` until `rows` is empty. One thread only."""

    def __init__(self, pixtral: Any):
        self.pixtral = pixtral
        self.model = pixtral.model
        self.rows: list[Row] = []
        self.cache: list[Any] | None = None  # one BatchKVCache per decoder layer; None while empty
        self.max_rows = 0  # the most rows decoded together so far (a statistic)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, turn: Any, cancelled: Callable[[], bool] = lambda: False) -> Row:
        """Prefill `turn` on its own, sample its first token and merge it into the batch."""
        return self.add_many([turn], [cancelled])[0]

    def add_many(self, turns: list[Any], cancelled: list[Callable[[], bool]] | None = None) -> list[Row]:
        """Prefill `turns` (together where they fit: `prefill_many`, each weight dequantized once for all of them
        on the CPU; the values of each alone), sample each one's first token and merge them into the batch."""
        from pixtral_mlx.memory import batch_bytes

        cancelled = cancelled or [lambda: False] * len(turns)
        mx.reset_peak_memory()
        plans = [turn.plan for turn in turns]
        together = len(turns) > 1 and (
            plans[0].limit is None or batch_bytes(plans, self.pixtral.features.nbytes) <= plans[0].limit
        )
        groups = [list(range(len(turns)))] if together else [[i] for i in range(len(turns))]
        rows = []
        for group in groups:
            self.pixtral.encode_rows([turns[i].prompt for i in group], [plans[i].vision_patches for i in group])
            jobs = [
                (t.prompt.tokens[t.keep :], self.pixtral.embeddings(t.prompt, start=t.keep), t.cache.layers)
                for t in (turns[i] for i in group)
            ]
            prefill_many(self.model, jobs, steps=[turns[i].plan.prefill_step for i in group])
            for i, (tokens, emb, _) in zip(group, jobs):
                rows.append(self._first(turns[i], cancelled[i], tokens, emb))
        return rows

    def _first(self, turn: Any, cancelled: Callable[[], bool], tokens: list[int], emb: mx.array) -> Row:
        """The prefilled `turn` (all but its last prompt token in its cache) joins the batch: its cache is merged,
        and the next `step` feeds its last prompt token with the other rows' tokens, whose logits give its first
        token. One forward pass for every row joining, not one each, at the values a decode step gives a row
        alone. A prompt whose last token is an image position (its embedding is not the token's: no template ends
        so) or that left the cache empty (one token) samples its first token alone here instead."""
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import BatchKVCache

        cache, options = turn.cache, turn.options
        row = Row(turn, cancelled, options.sampler(), list(tokens))
        row.decoder = _decode(
            self._feed(row),
            self.pixtral.encoder.detokenizer(),
            len(tokens),
            options.max_tokens,
            self.pixtral.encoder.eos_id,
            turn.start,
            stop=options.stop,
        )
        if tokens[-1] == self.pixtral.args.image_token_id or cache.offset == 0:
            with mx.stream(generation_stream):
                logits = self.model(mx.array(tokens[-1:])[None], cache=cache.layers, input_embeddings=emb[None, -1:])
                token = self._sample(row, logits[:, -1, :])
                mx.eval(token)
            row.first = self._hand(row, int(token.item()))
            if row.done:  # finished on its first token: it never joins
                self._give_back(row, cache.layers)
                return row
        else:
            row.next_token = tokens[-1]
        with mx.stream(generation_stream):
            merged = [BatchKVCache.merge([layer]) for layer in cache.layers]
            if self.cache is None:
                self.cache = merged
            else:
                for mine, theirs in zip(self.cache, merged):
                    mine.extend(theirs)
            mx.eval([c.state[:2] for c in self.cache])
        cache.layers = self.model.make_cache()  # the batch holds them now; they come back when the row ends
        cache.tokens, cache.keys = [], []
        self.rows.append(row)
        self.max_rows = max(self.max_rows, len(self.rows))
        return row

    def step(self) -> list[tuple[Row, Chunk | None]]:
        """Hand out each new row's first chunk, decode one token for every row still running, and drop the rows
        that finished or were cancelled: `(row, chunk)` pairs, the chunk None for a row cancelled before it."""
        from mlx_lm.generate import generation_stream

        out: list[tuple[Row, Chunk | None]] = []
        running = []
        for row in self.rows:
            if row.cancelled():
                row.done = True
                out.append((row, None))
            elif row.first is not None:
                out.append((row, row.first))
                row.first = None
                running.append(row)
            else:
                running.append(row)
        if running and len(running) == len(self.rows):
            with mx.stream(generation_stream):
                inputs = mx.array([[row.next_token] for row in self.rows])
                logits = self.model(inputs, cache=self.cache)[:, -1, :]
                sampled = [self._sample(row, logits[i : i + 1], i) for i, row in enumerate(self.rows)]
                mx.eval(sampled)
            for row, token in zip(self.rows, sampled):
                out.append((row, self._hand(row, int(token.item()))))
        # (with a row cancelled, the others step next time, once it has left)
        self._drop([row for row in self.rows if row.done])
        return out

    def cancel_all(self) -> None:
        """Drop every row now (after an error: their caches are left empty)."""
        for row in self.rows:
            row.done = True
            row.turn.cache.tokens, row.turn.cache.keys = [], []
        self.rows, self.cache = [], None

    # Internals -----------------------------------------------------------------------------------
    @staticmethod
    def _feed(row: Row) -> Iterator[tuple[int, None]]:
        while True:
            yield row.feed.popleft(), None

    def _sample(self, row: Row, logits: mx.array, i: int | None = None) -> mx.array:
        """The row's token; row i of a step goes on CPU stream i mod cores on the CPU backend (a row's processors,
        log-softmax and sampler are MLX ops on one thread each), the same values as the row alone."""
        streams = self._streams() if i is not None else []
        with mx.stream(streams[i % len(streams)]) if streams else nullcontext():
            processors = row.turn.processors
            if processors:
                seen = mx.array(row.tokens)
                for processor in processors:
                    logits = processor(seen, logits)
            return row.sampler(log_softmax_rows(logits))

    @staticmethod
    def _streams() -> list[Any]:
        from pixtral_mlx import backend

        if not backend.on_cpu():
            return []
        from pixtral_mlx import cpu

        return cpu.cpu_streams()

    def _hand(self, row: Row, token: int) -> Chunk:
        """Give the sampled `token` to the row's decoder; the row is done when its chunk finishes it."""
        row.generated.append(token)
        row.tokens.append(token)
        row.next_token = token
        row.feed.append(token)
        chunk = next(row.decoder)
        if chunk.finish_reason is not None:
            row.done = True
        return chunk

    def _drop(self, rows: list[Row]) -> None:
        if not rows:
            return
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        for i, row in enumerate(self.rows):
            if row.done:
                self._give_back(row, [c.extract(i) for c in self.cache])
        if keep:
            index = mx.array(keep)
            for c in self.cache:
                c.filter(index)
            self.rows = [self.rows[i] for i in keep]
        else:
            self.rows, self.cache = [], None

    def _give_back(self, row: Row, layers: list[Any]) -> None:
        """The row's KV back into its conversation's cache, with the tokens it holds (as `run_turn` leaves it)."""
        cache, turn = row.turn.cache, row.turn
        cache.layers = layers
        cache.tokens = (turn.prompt.tokens + row.generated)[: cache.offset]
        cache.keys = (turn.keys + row.generated)[: cache.offset]


def run(pixtral: Any, turns: list[tuple[int, Any]]) -> Iterator[tuple[int, Chunk]]:
    """A continuous batch over planned turns: `(step, turn)` pairs, each turn joining before decode step `step`
    (0: at once); yields `(index, chunk)` as `stream_batch` does. Mostly for tests and benchmarks."""
    batch = Batch(pixtral)
    waiting = sorted(enumerate(turns), key=lambda p: p[1][0])
    rows: dict[int, int] = {}
    step = 0
    while waiting or batch.rows:
        joining = []
        while waiting and waiting[0][1][0] <= step:
            joining.append(waiting.pop(0))
        if joining:
            for (i, _), row in zip(joining, batch.add_many([turn for _, (_, turn) in joining])):
                rows[id(row)] = i
                if row.done:
                    yield i, row.first
        for row, chunk in batch.step():
            if chunk is not None:
                yield rows[id(row)], chunk
        step += 1
