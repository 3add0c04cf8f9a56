"""The engine: ONE long-lived thread that loads the model and owns the conversation.

MLX streams are per thread, so loading, prefill and decode must all run on the same OS thread; a
Textual `@work(thread=True)` per turn may land on any pool thread. The UI calls the request methods
(they only enqueue); results come back as messages posted to `target`. Tests subclass `Engine` and
override `_load` to return a fake `ChatBackend`, keeping the real thread, queue and Stop logic.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from textual.message import Message
from textual.message_pump import MessagePump

from pixtral_mlx.config import MAX_EDGE
from pixtral_mlx.errors import PixtralError
from pixtral_mlx.turn import Options, Reply

from .attachments import PATCH
from .messages import (
    ContextUpdated,
    EngineFailed,
    LoadFailed,
    MemoryUpdated,
    ModelLoaded,
    ModelLoading,
    ReplyFinished,
    ReplyStarted,
    Token,
)

log = logging.getLogger("pixtral_mlx.tui")
TOKEN_INTERVAL = 0.05  # seconds between UI updates while a reply streams


class ChatBackend(Protocol):
    """What the engine needs from `pixtral_mlx.chat.Chat`."""

    messages: list[dict[str, Any]]
    context_used: int

    def stream(self, content: Any) -> Iterator[Any]: ...
    def regenerate(self) -> Iterator[Any]: ...
    def undo(self) -> dict[str, Any] | None: ...
    def reset(self) -> None: ...
    def restore(self, messages: list[dict[str, Any]]) -> None: ...
    def tokens_needed(self, content: Any) -> int: ...


def model_name(model: str) -> str:
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model.rstrip("/").split("/")[-1]


class Engine:
    def __init__(
        self,
        model: str,
        *,
        system: str | None = None,
        options: Options | None = None,
        context_length: int | None = None,
        default_system_prompt: bool = True,
        **overrides: Any,
    ):
        """`options` (the one `Options` value the command line built) and/or options by name: the chat's."""
        self.model = model
        self.context_length = context_length
        self.default_system_prompt = default_system_prompt
        self.name = model_name(model)
        self.system = system
        self.options = Options.of(options, **overrides)
        self.chat: ChatBackend | None = None
        self.load_error: str | None = None
        self._requests: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._target: MessagePump | None = None
        self._thread: threading.Thread | None = None

    @property
    def max_edge(self) -> int | None:
        return self.options.max_edge

    @property
    def geometry(self) -> tuple[int, int]:
        """(image size, pixels per [IMG] token) of the loaded model, for the attachment chips; Pixtral-12B's until
        a model is loaded."""
        encoder = getattr(getattr(self.chat, "pixtral", None), "encoder", None)
        config = getattr(getattr(encoder, "image_encoder", None), "image_config", None)
        if config is None:
            return MAX_EDGE, PATCH
        return encoder.image_size, config.image_patch_size * config.spatial_merge_size

    # Requests from the UI thread: they only enqueue ---------------------------------------------
    def start(self, target: MessagePump) -> None:
        self._target = target
        self._thread = threading.Thread(target=self._run, name="pixtral-engine", daemon=True)
        self._thread.start()
        self._put("load")

    def send(self, content: Any) -> None:
        self._stop.clear()  # here, not on the engine thread: an early Esc must not be forgotten
        self._put("send", content)

    def regenerate(self) -> None:
        self._stop.clear()
        self._put("regenerate")

    def undo(self) -> None:
        self._put("undo")

    def restore(self, messages: list[dict[str, Any]], kv_path: Path | None = None) -> None:
        """Replace the history (new chat, reopened chat); the next turn prefills it once, or only what the
        KV cache saved in `kv_path` does not hold."""
        self._put("restore", messages, kv_path)

    def save_kv(self, path: Path) -> None:
        """Save the conversation's KV cache to `path` (beside the conversation file)."""
        self._put("save_kv", path)

    def stop(self) -> None:
        """Stop the reply being generated; the partial reply is kept."""
        self._stop.set()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._requests.put(None)
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _put(self, name: str, *args: Any) -> None:
        self._requests.put((name, args))

    def _post(self, message: Message) -> None:
        if self._target is not None:
            self._target.post_message(message)

    # The engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (request := self._requests.get()) is not None:
                name, args = request
                try:
                    getattr(self, f"_do_{name}")(*args)
                except PixtralError as e:  # the library's errors: one sentence meant for the user
                    self._post(EngineFailed(name, str(e)))
                except Exception as e:
                    log.exception("engine request %s failed", name)
                    self._post(EngineFailed(name, f"{type(e).__name__}: {e}", expected=False))
        finally:
            self.chat = None
            mx = sys.modules.get("mlx.core")
            if mx is not None and hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _load(self, progress: Any) -> ChatBackend:
        import pixtral_mlx

        pixtral = pixtral_mlx.load(
            self.model,
            progress=progress,
            context_length=self.context_length,
            default_system_prompt=self.default_system_prompt,
        )
        return pixtral.chat(system=self.system, options=self.options)

    def _do_load(self) -> None:
        tic = time.perf_counter()
        self._post(ModelLoading(f"Loading {self.model}…"))
        try:
            self.chat = self._load(lambda text: self._post(ModelLoading(text)))
        except Exception as e:
            if not isinstance(e, PixtralError):
                log.exception("loading %s failed", self.model)
            self.load_error = str(e) if isinstance(e, PixtralError) else f"{type(e).__name__}: {e}"
            self._post(LoadFailed(self.load_error))
            return
        self._post(ModelLoaded(self.name, time.perf_counter() - tic))

    def _ready(self) -> ChatBackend:
        if self.chat is None:
            raise PixtralError(f"the model is not loaded ({self.load_error or 'still loading'}).")
        return self.chat

    def _do_send(self, content: Any) -> None:
        self._stream(self._ready().stream(content))

    def _do_regenerate(self) -> None:
        self._stream(self._ready().regenerate())

    def _do_undo(self) -> None:
        chat = self._ready()
        chat.undo()  # the UI already took the turn off the screen
        self._post(ContextUpdated(chat.context_used))
        self._post_memory()

    def _do_restore(self, messages: list[dict[str, Any]], kv_path: Path | None = None) -> None:
        chat = self._ready()
        chat.restore(messages)
        if kv_path is not None and kv_path.exists() and hasattr(chat, "load_cache"):
            if not chat.load_cache(kv_path):
                log.info("KV cache %s not used: %s", kv_path, chat.cache_note)
        self._post(ContextUpdated(chat.context_used))
        self._post_memory()

    def _do_save_kv(self, path: Path) -> None:
        chat = self.chat  # not loaded (yet): nothing to save, and nothing to say
        if chat is None or not hasattr(chat, "save") or not chat.messages:
            return
        try:
            chat.save(path)
        except OSError as e:
            self._post(EngineFailed("save_kv", f"the KV cache could not be saved to {path} ({e.strerror or e})."))

    def _post_memory(self) -> None:
        """The memory plan of the history so far, for the status bar (nothing if the backend has none)."""
        plan = getattr(self.chat, "memory_plan", None)
        if plan is None:
            return
        try:
            self._post(MemoryUpdated(plan().summary()))
        except PixtralError as e:
            self._post(MemoryUpdated(str(e)[:60]))

    def _stream(self, chunks: Iterator[Any]) -> None:
        """Post the chunks; between them honour Stop: close the generator (keeps the partial)."""
        self._post(ReplyStarted())
        reply, pending, thought = Reply(), "", ""
        posted = time.perf_counter()
        try:
            for chunk in chunks:
                reply.add(chunk)
                pending += chunk.text
                thought += chunk.reasoning
                # Batch tokens: one UI update per TOKEN_INTERVAL keeps the UI thread off the GIL.
                if (pending or thought) and time.perf_counter() - posted >= TOKEN_INTERVAL:
                    self._post(Token(pending, thought))
                    pending, thought, posted = "", "", time.perf_counter()
                if chunk.finish_reason or self._stop.is_set():
                    break
        finally:
            chunks.close()  # type: ignore[attr-defined]
            if pending or thought:
                self._post(Token(pending, thought))
        reply.finish_reason = reply.finish_reason or "interrupted"
        self._post(ReplyFinished(reply, context_used=self._ready().context_used))
        self._post_memory()
