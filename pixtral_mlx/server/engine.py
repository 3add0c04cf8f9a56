"""The server's engine: ONE thread that loads the model and runs requests, one at a time, in order.

MLX streams are per thread, so loading, prefill and decode all happen here. The ASGI side submits a
`Job` (a bounded queue: `queue.Full` when it is full) and reads its events from an asyncio queue fed
with `loop.call_soon_threadsafe`: ("start", prompt tokens) or ("error", exception), then ("chunk",
Chunk)... and always ("end", None) last. A job of `n` replies runs its turn n times in a row (the prompt
comes from the prefix cache after the first; with a seed, reply i samples with seed + i): ("choice", i)
comes before the chunks of reply i >= 1. A job whose client went away is cancelled: the engine stops it
between two tokens (a job cancelled with an error, as at shutdown, gets ("error", it) before its end).
One `PromptCache` serves every request, so a request that repeats the previous one's prefix (a chat
client resending its history) prefills only the rest; vision features are cached by image content
inside `Pixtral`.
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


@dataclass
class Record:
    """What the engine did for one request (the server's log of its work; tests read it)."""

    prompt_tokens: int = 0  # the whole prompt
    prefilled: int = 0  # the tokens prefilled (the rest came from the prefix cache)
    generation_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    seconds: float = 0.0


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
        self, load: Callable[[], Any], queue_size: int = QUEUE, kv_bits: int | None = None, kv_group_size: int = 64
    ):
        self._load = load
        self.kv = (kv_bits, kv_group_size)  # the shared KV cache's quantization (mlx-lm's QuantizedKVCache)
        self.pixtral: Any = None
        self.cache: Any = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.running: Job | None = None
        self.stopping: BaseException | None = None  # set by `cancel_all`: every job from now on ends with it
        self.records: deque[Record] = deque(maxlen=256)
        self._seconds = 0.0  # moving average of a request's time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="pixtral-server-engine", daemon=True)

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
        """End every job with `error` (a server shutting down): those waiting at once, the running one at its
        next token, and any submitted later as it starts."""
        self.stopping = error  # set before looking at `running`: `_serve` checks it after `running` is set
        self._drop_waiting(error)
        if (job := self.running) is not None:
            job.cancel(error)

    def close(self, timeout: float = 10.0) -> bool:
        """Drop what waits, stop what runs, end the thread; True once the thread has ended (within `timeout`).

        Join it before the interpreter exits: a thread still inside MLX when it does aborts the process."""
        self._drop_waiting()
        if (job := self.running) is not None:
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

    # The engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            try:
                self.pixtral = self._load()
                self.cache = self.pixtral.new_cache(*self.kv)
            except BaseException as e:  # reported by whoever waits on `ready`
                self.load_error = e
                return
            finally:
                self.ready.set()
            while (job := self.jobs.get()) is not None:
                self.running = job
                self.records.append(job.record)  # filled in as the job runs
                tic = time.perf_counter()
                try:
                    self._serve(job)
                finally:
                    self.running = None
                    job.record.seconds = time.perf_counter() - tic
                    seconds = job.record.seconds
                    self._seconds = 0.7 * self._seconds + 0.3 * seconds if self._seconds else seconds
        finally:
            mx = sys.modules.get("mlx.core")
            if mx is not None and hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _serve(self, job: Job) -> None:
        record = job.record
        if self.stopping is not None:
            job.cancel(self.stopping)
        if job.cancelled.is_set():  # the client left while it waited
            record.finish_reason = "cancelled"
            job.end()
            return
        o = job.options
        try:
            prompt = self.pixtral.encode(job.messages, max_edge=o.max_edge)
            chunks = self.pixtral.stream(prompt, o, cache=self.cache)
        except Exception as e:  # nothing was done: a PixtralError is the client's, anything else a bug
            if not isinstance(e, PixtralError):
                log.exception("a request failed before generation")
            record.finish_reason = "error"
            job.emit("error", e)
            job.emit("end")
            return
        record.prompt_tokens = len(prompt)
        tokenizer = self.pixtral.encoder.text  # for the token texts and bytes of logprobs
        job.emit("start", {"prompt_tokens": len(prompt), "prompt_token_ids": prompt.tokens, "tokenizer": tokenizer})
        generated = 0  # tokens of the replies before this one
        try:
            for i in range(job.n):
                if i:
                    if job.cancelled.is_set():
                        record.finish_reason = "cancelled"
                        break
                    seeded = o if o.seed is None else o.merge(seed=(o.seed + i) % (MAX_SEED + 1))
                    chunks = self.pixtral.stream(prompt, seeded, cache=self.cache)
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
        except Exception as e:
            log.exception("a request failed during generation")
            record.finish_reason = "error"
            self.cache = self.pixtral.new_cache(*self.kv)  # what it holds is unknown now
            job.error = e
        finally:
            job.end()
