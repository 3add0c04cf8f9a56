"""The server's engine: ONE thread that loads the model and runs requests, several at a time (continuous batching).

MLX streams are per thread, so loading, prefill and decode all happen here. The ASGI side submits a
`Job` (a bounded queue: `queue.Full` when it is full) and reads its events from an asyncio queue fed
with `loop.call_soon_threadsafe`: ("start", prompt tokens) or ("error", exception), then ("chunk",
Chunk)... and always ("end", None) last. Between two decode steps the engine takes new jobs from the queue
(up to `max_batch` running at once), plans each (a refusal is its error), prefills it on its own and merges
it into the running batch (`pixtral_mlx.batching`): every step decodes one token for every running job, each
with its own sampling, stop strings, grammar and cancellation; at temperature 0 a job's reply is the one it
gets alone. Jobs the batch does not take (`batching.solo`: n > 1, logprobs, a seeded sampler, a quantized KV
cache) wait for the batch to drain and run alone, as before: a job of `n` replies runs its turn n times in a
row (with a seed, reply i samples with seed + i), ("choice", i) before the chunks of reply i >= 1.
A job whose client went away is cancelled: the engine drops it between two tokens (a job cancelled with an
error, as at shutdown, gets ("error", it) before its end).
Prefix caches: an LRU of `PromptCache`s (`CachePool`), one per conversation, so a client resending its history
prefills only the rest even when others talk in between; vision features are cached by image content inside
`Pixtral`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pixtral_mlx.errors import PixtralError
from pixtral_mlx.turn import MAX_SEED, Options

from .limits import QUEUE

log = logging.getLogger("pixtral_mlx.server")

MAX_BATCH = 8  # requests decoded together at most (never more than the queue holds: a queue of one runs one)
CACHES = 4  # conversations whose prefix caches are kept
CACHE_BYTES = 4 * 1024**3  # and the bytes they may hold together (the least recently used idle ones go first)


@dataclass
class Record:
    """What the engine did for one request (the server's log of its work; tests read it)."""

    prompt_tokens: int = 0  # the whole prompt
    prefilled: int = 0  # the tokens prefilled (the rest came from the prefix cache)
    generation_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    seconds: float = 0.0
    batch: int = 0  # the most requests it was decoded together with (itself included; 1: alone)
    solo: str | None = None  # why it ran alone, outside the batch (`batching.solo`)


class CachePool:
    """Prefix caches, one per conversation, least recently used first. `take` gives the idle cache that holds the
    longest prefix of a prompt when the prompt extends it; a prompt that shares only part of one (another
    conversation with the same system prompt) gets a new cache holding a copy of that part, so the other
    conversation keeps its own; otherwise a new cache. Idle caches past `size` or `budget` bytes are evicted."""

    def __init__(self, new: Callable[[], Any], size: int = CACHES, budget: int = CACHE_BYTES):
        self._new, self.size, self.budget = new, size, budget
        self.caches: list[Any] = [new()]
        self.busy: set[int] = set()

    def take(self, tokens: list[int], keys: list[Any] | None) -> Any:
        best, n = None, 0
        for cache in reversed([c for c in self.caches if id(c) not in self.busy]):  # the most recent wins ties
            r = cache.reusable(tokens, keys)
            if r > n:
                best, n = cache, r
        if best is not None and n < min(len(best.tokens), len(tokens) - 1):
            best = self._copy(best, n)  # None when its layers cannot be copied: then it is trimmed (shared)
        if best is None:
            best = self._new()
        else:
            self.caches.remove(best)
        self.caches.append(best)
        self.busy.add(id(best))
        self._evict()
        return best

    def release(self, cache: Any) -> None:
        self.busy.discard(id(cache))
        self._evict()

    def discard(self, cache: Any) -> None:
        """A cache whose content is unknown (an error while it ran)."""
        self.busy.discard(id(cache))
        if cache in self.caches:
            self.caches.remove(cache)
        if not self.caches:
            self.caches.append(self._new())

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def _copy(self, cache: Any, n: int) -> Any:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        if not all(type(c) is KVCache and c.keys is not None for c in cache.layers):
            return None if n == 0 else cache
        new = self._new()
        for src, dst in zip(cache.layers, new.layers):
            dst.keys = mx.contiguous(src.keys[..., :n, :])
            dst.values = mx.contiguous(src.values[..., :n, :])
            dst.offset = n
        new.tokens, new.keys = cache.tokens[:n], cache.keys[:n]
        self.caches.append(new)
        return new

    def _evict(self) -> None:
        for cache in list(self.caches[:-1]):
            if len(self.caches) <= self.size and self.nbytes <= self.budget:
                return
            if id(cache) not in self.busy:
                self.caches.remove(cache)


@dataclass
class Job:
    messages: list[dict[str, Any]]
    options: Options  # max_edge included
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    record: Record = field(default_factory=Record)
    error: BaseException | None = None  # what its client is told when it is cancelled (None: nothing, it left)
    n: int = 1  # independent replies to the same prompt

    def emit(self, kind: str, value: Any = None) -> None:
        """Called on the engine thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self, error: BaseException | None = None) -> None:
        if error is not None and not self.cancelled.is_set():
            self.error = error
        self.cancelled.set()

    def end(self) -> None:
        """The last event; a job stopped early ("cancelled" or "error") tells its error first, if it has one."""
        if self.error is not None and self.record.finish_reason in ("cancelled", "error"):
            self.emit("error", self.error)
        self.emit("end")


class Engine:
    def __init__(
        self,
        load: Callable[[], Any],
        queue_size: int = QUEUE,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        max_batch: int | None = None,
        caches: int = CACHES,
    ):
        self._load = load
        self.kv = (kv_bits, kv_group_size)  # the prefix caches' quantization (mlx-lm's QuantizedKVCache)
        self.max_batch = max(1, min(MAX_BATCH, queue_size) if max_batch is None else max_batch)
        self.pixtral: Any = None
        self.pool: CachePool | None = None
        self.batch: Any = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.running: Job | None = None  # the oldest job running (None: idle)
        self.active: list[Job] = []  # every job running
        self.stopping: BaseException | None = None  # set by `cancel_all`: every job from now on ends with it
        self.records: deque[Record] = deque(maxlen=256)
        self._caches = caches
        self._rows: dict[int, tuple[Job, Any, float]] = {}  # id(row) -> (job, its prefix cache, its start)
        self._seconds = 0.0  # moving average of a request's time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="pixtral-server-engine", daemon=True)

    @property
    def cache(self) -> Any:
        """The prefix cache used last."""
        return self.pool.caches[-1] if self.pool is not None else None

    @property
    def max_batch_seen(self) -> int:
        """The most requests decoded together so far."""
        return self.batch.max_rows if self.batch is not None else 0

    # Called from the ASGI side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; `queue.Full` when the queue is full."""
        self.jobs.put_nowait(job)

    def waiting(self) -> int:
        return self.jobs.qsize()

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: about one request's time."""
        return max(1, min(600, math.ceil(self._seconds or 1.0)))

    def cancel_all(self, error: BaseException) -> None:
        """End every job with `error` (a server shutting down): those waiting at once, the running ones at their
        next token, and any submitted later as it starts."""
        self.stopping = error  # set before looking at `active`: `_begin` checks it after adding the job there
        self._drop_waiting(error)
        for job in list(self.active):
            job.cancel(error)

    def close(self, timeout: float = 10.0) -> bool:
        """Drop what waits, stop what runs, end the thread; True once the thread has ended (within `timeout`).

        Join it before the interpreter exits: a thread still inside MLX when it does aborts the process."""
        self._drop_waiting()
        for job in list(self.active):
            job.cancel()
        self.jobs.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _drop_waiting(self, error: BaseException | None = None) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancel(error)
                job.record.finish_reason = "cancelled"
                job.end()
            else:
                self.jobs.put_nowait(None)  # a close already asked: keep its marker
                return

    # The engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            try:  # the imports too: a broken install is a load error the waiter reports, not a thread that died
                from mlx_lm.generate import generation_stream, wired_limit

                from pixtral_mlx.batching import Batch

                self.pixtral = self._load()
                self.pool = CachePool(lambda: self.pixtral.new_cache(*self.kv), self._caches)
                self.batch = Batch(self.pixtral)
            except BaseException as e:  # reported by whoever waits on `ready`
                self.load_error = e
                return
            finally:
                self.ready.set()
            with wired_limit(self.pixtral.model, [generation_stream]):  # Metal: keep the weights resident
                self._loop()
        finally:
            mx = sys.modules.get("mlx.core")
            if mx is not None and hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _loop(self) -> None:
        from pixtral_mlx.batching import solo

        alone: Job | None = None  # a job the batch does not take: it runs once the batch has drained
        closing = False
        while True:
            arriving: list[Job] = []  # admitted together: their prompts prefilled at once (`Batch.add_many`)
            while not closing and alone is None and len(self.batch) + len(arriving) < self.max_batch:
                try:
                    job = self.jobs.get() if not self.batch.rows and not arriving else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                elif (why := solo(job.options, job.n) or ("kv_bits" if self.kv[0] is not None else None)) is not None:
                    job.record.solo, alone = why, job
                else:
                    arriving.append(job)
            if arriving:
                self._admit(arriving)
            if self.batch.rows:
                self._step()
            elif alone is not None:
                job, alone = alone, None
                if (tic := self._begin(job)) is not None:
                    try:
                        self._serve(job)
                    finally:
                        self._finish(job, tic)
            elif closing:
                return

    def _begin(self, job: Job) -> float | None:
        """Count `job` as running; None (and its end) when it was cancelled while it waited."""
        self.active.append(job)
        self.running = self.active[0]
        self.records.append(job.record)  # filled in as the job runs
        tic = time.perf_counter()
        if self.stopping is not None:
            job.cancel(self.stopping)
        if job.cancelled.is_set():  # the client left while it waited
            job.record.finish_reason = "cancelled"
            self._finish(job, tic)
            return None
        return tic

    def _finish(self, job: Job, tic: float) -> None:
        if job in self.active:
            self.active.remove(job)
        self.running = self.active[0] if self.active else None
        job.record.seconds = seconds = time.perf_counter() - tic
        self._seconds = 0.7 * self._seconds + 0.3 * seconds if self._seconds else seconds
        job.end()

    def _plan(self, job: Job) -> tuple[Any, Any] | None:
        """Encode the job's prompt and pick its prefix cache; None (and the job's error) if that fails."""
        from pixtral_mlx.generate import prompt_keys

        o = job.options
        try:
            prompt = self.pixtral.encode(job.messages, options=o)  # its max_edge and tools: encoded once
        except Exception as e:
            self._refused(job, e)
            return None
        image = self.pixtral.args.image_token_id
        keys = prompt_keys(prompt.tokens, prompt.images, image) if prompt.images else None
        return prompt, self.pool.take(prompt.tokens, keys)

    def _refused(self, job: Job, e: Exception) -> None:
        """Nothing was done: a PixtralError is the client's, anything else a bug."""
        if not isinstance(e, PixtralError):
            log.exception("a request failed before generation")
        job.record.finish_reason = "error"
        job.emit("error", e)

    def _started(self, job: Job, prompt: Any) -> None:
        job.record.prompt_tokens = len(prompt)
        tokenizer = self.pixtral.encoder.text  # for the token texts and bytes of logprobs
        job.emit("start", {"prompt_tokens": len(prompt), "prompt_token_ids": prompt.tokens, "tokenizer": tokenizer})

    def _admit(self, jobs: list[Job]) -> None:
        """Plan each job, prefill them (together: `Batch.add_many`) and add them to the batch (or end them:
        cancelled, refused, or done at once). A job refused at planning does not hold up the others."""
        planned = []
        for job in jobs:
            if (tic := self._begin(job)) is None:
                continue
            found = self._plan(job)
            if found is None:
                self._finish(job, tic)
                continue
            prompt, cache = found
            try:
                turn = self.pixtral.plan_turn(prompt, cache, job.options)
            except Exception as e:
                self.pool.release(cache)
                self._refused(job, e)
                self._finish(job, tic)
                continue
            self._started(job, prompt)
            planned.append((job, cache, tic, turn))
        if not planned:
            return
        try:
            rows = self.batch.add_many([p[3] for p in planned], [p[0].cancelled.is_set for p in planned])
        except Exception as e:
            log.exception("a request failed during prefill")
            for job, cache, tic, _ in planned:
                self.pool.discard(cache)
                job.record.finish_reason, job.error = "error", e
                self._finish(job, tic)
            return
        for (job, cache, tic, _), row in zip(planned, rows):
            self._rows[id(row)] = (job, cache, tic)
        for other, _, _ in self._rows.values():
            other.record.batch = max(other.record.batch, len(self.batch), 1)
        for row in rows:
            if row.done:  # its first token ended it
                self._deliver(row, row.first)

    def _step(self) -> None:
        try:
            out = self.batch.step()
        except Exception as e:
            log.exception("a batch failed during generation")
            for row in self.batch.rows:
                job, cache, tic = self._rows.pop(id(row))
                self.pool.discard(cache)
                job.record.finish_reason, job.error = "error", e
                self._finish(job, tic)
            self.batch.cancel_all()
            return
        for row, chunk in out:
            self._deliver(row, chunk)

    def _deliver(self, row: Any, chunk: Any) -> None:
        job, cache, tic = self._rows[id(row)]
        record = job.record
        if chunk is None or job.cancelled.is_set():
            record.finish_reason = "cancelled"
        else:
            if chunk.generation_tokens <= 1:
                record.prefilled = chunk.prompt_tokens
            record.generation_tokens = chunk.generation_tokens
            record.finish_reason = chunk.finish_reason
            job.emit("chunk", chunk)
        if chunk is None or chunk.finish_reason is not None:  # (a new row's first chunk may come with its second)
            del self._rows[id(row)]
            self.pool.release(cache)  # it holds the row's KV again
            self._finish(job, tic)

    def _serve(self, job: Job) -> None:
        """A job outside the batch, alone: its `n` replies one after another, each with the prefix cache."""
        record = job.record
        record.batch = 1
        o = job.options
        planned = self._plan(job)
        if planned is None:
            return
        prompt, cache = planned
        try:
            chunks = self.pixtral.stream(prompt, o, cache=cache)
        except Exception as e:
            self.pool.release(cache)
            self._refused(job, e)
            return
        self._started(job, prompt)
        generated = 0  # tokens of the replies before this one
        try:
            for i in range(job.n):
                if i:
                    if job.cancelled.is_set():
                        record.finish_reason = "cancelled"
                        break
                    seeded = o if o.seed is None else o.merge(seed=(o.seed + i) % (MAX_SEED + 1))
                    chunks = self.pixtral.stream(prompt, seeded, cache=cache)
                    job.emit("choice", i)
                try:
                    for chunk in chunks:
                        if not i:
                            record.prefilled = chunk.prompt_tokens
                        record.generation_tokens = generated + chunk.generation_tokens
                        record.finish_reason = chunk.finish_reason
                        if job.cancelled.is_set():
                            record.finish_reason = "cancelled"
                            break
                        job.emit("chunk", chunk)
                finally:
                    chunks.close()  # keeps the prefix cache exact: it holds what was generated
                generated = record.generation_tokens
                if record.finish_reason == "cancelled":
                    break
            self.pool.release(cache)
        except Exception as e:
            log.exception("a request failed during generation")
            record.finish_reason = "error"
            self.pool.discard(cache)  # what it holds is unknown now
            job.error = e
