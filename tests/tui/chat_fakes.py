"""Test doubles for the chat: a `FakeEngine` with the real engine thread and canned replies."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pixtral_mlx.generate import Chunk, ContextError
from pixtral_mlx.images import ImageError
from pixtral_mlx.tui.engine import Engine

REPLIES = [
    "A **red** square on a white background.\n\n```python\nprint('red')\n```\n",
    "It is about 300 pixels wide.",
    "Here is another answer, written again.",
]
IMAGE_TOKENS = 100  # what the fake counts per image
STATS = {"prompt_tps": 1234.0, "generation_tps": 42.0, "peak_memory": 1.25}


def _count(messages: list[dict[str, Any]]) -> int:
    n = 1
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p in parts:
            n += IMAGE_TOKENS if p["type"] == "image_url" else len(p["text"].split()) + 2
    return n


class FakeChat:
    """The `pixtral_mlx.chat.Chat` interface with words for tokens and fixed statistics."""

    def __init__(
        self,
        replies: list[str],
        delay: float,
        context_length: int,
        system: str | None,
        gate: threading.Event | None = None,
    ):
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.context_used = 0
        self.replies, self.delay, self.context_length, self.gate = (
            replies,
            delay,
            context_length,
            gate,
        )
        self.n_replies = 0
        self.prefilled: list[int] = []  # prompt tokens of each turn, like the real Chat reports

    def stream(self, content: Any) -> Iterator[Chunk]:
        for part in content if isinstance(content, list) else []:
            if part["type"] == "image_url" and not Path(part["image_url"]["url"]).exists():
                raise ImageError(f"{part['image_url']['url']}: no such file.")
        self.messages.append({"role": "user", "content": content})
        need = _count(self.messages)
        if need >= self.context_length:
            self.messages.pop()
            raise ContextError(
                f"this turn needs {need - self.context_used:,} more tokens and the conversation "
                f"would reach {need:,} of the {self.context_length:,}-token context; remove "
                "images, undo turns or start a new chat."
            )
        return self._run(max(need - self.context_used, 1))

    def regenerate(self) -> Iterator[Chunk]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no reply to regenerate.")
        self.messages.pop()
        return self._run(max(_count(self.messages) - self.context_used, 1))

    def undo(self) -> dict[str, Any] | None:
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        removed = self.messages.pop() if self.messages and self.messages[-1]["role"] == "user" else None
        self.context_used = self.history_tokens()
        return removed

    def restore(self, messages: list[dict[str, Any]]) -> None:
        self.reset()
        self.messages = list(messages)
        self.context_used = self.history_tokens()

    def history_tokens(self) -> int:
        if not any(m["role"] != "system" for m in self.messages):
            return 0
        return max(self.tokens_needed("") - 2, 0)

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.context_used = 0

    def tokens_needed(self, content: Any) -> int:
        return _count(self.messages + [{"role": "user", "content": content}])

    def _run(self, n_prompt: int) -> Iterator[Chunk]:
        reply = self.replies[self.n_replies % len(self.replies)]
        self.n_replies += 1
        self.prefilled.append(n_prompt)
        words = re.findall(r"\S+\s*|\s+", reply)
        text = ""
        try:
            for i, word in enumerate(words):
                if self.gate is not None:
                    self.gate.wait(10)
                if self.delay:
                    time.sleep(self.delay)
                text += word
                yield Chunk(
                    word,
                    i,
                    n_prompt,
                    STATS["prompt_tps"],
                    i + 1,
                    STATS["generation_tps"],
                    STATS["peak_memory"],
                )
            yield Chunk(
                "",
                None,
                n_prompt,
                STATS["prompt_tps"],
                len(words),
                STATS["generation_tps"],
                STATS["peak_memory"],
                "stop",
            )
        finally:
            self.messages.append({"role": "assistant", "content": text})
            self.context_used = _count(self.messages)


class FakeEngine(Engine):
    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        delay: float = 0.0,
        context_length: int = 131072,
        fail_load: str | None = None,
        gate: threading.Event | None = None,
        **kwargs: Any,
    ):
        super().__init__("fake/pixtral-test", **kwargs)
        self.replies = replies or REPLIES
        self.delay, self.context_length, self.fail_load, self.gate = (
            delay,
            context_length,
            fail_load,
            gate,
        )

    def _load(self, progress: Callable[[str], None]) -> FakeChat:
        progress("Reading the fake weights…")
        if self.fail_load:
            raise ValueError(self.fail_load)
        return FakeChat(self.replies, self.delay, self.context_length, self.system, self.gate)


def make_image(path: Path, size: tuple[int, int] = (300, 200), color: tuple[int, int, int] = (200, 20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


async def wait_for(pilot: Any, condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await pilot.pause(0.02)


async def settle(pilot: Any) -> None:
    """Let queued messages and workers finish."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await asyncio.sleep(0)


def notes(app: Any) -> list[str]:
    """The messages of the notifications on screen."""
    return [n.message for n in app._notifications]


async def started(pilot: Any) -> Any:
    """Wait for the (fake) model to load; return the chat screen."""
    screen = pilot.app.chat_screen
    await wait_for(pilot, lambda: screen.loaded or screen.load_failed, what="the model to load")
    screen.query_one("#prompt").cursor_blink = False
    return screen


async def ask(pilot: Any, text: str) -> None:
    """Type `text`, press enter and wait for the whole reply."""
    screen = pilot.app.chat_screen
    n = len(screen.conversation.turns)
    screen.query_one("#prompt").focus()
    screen.query_one("#prompt").insert(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: not screen.busy and len(screen.conversation.turns) >= n + 2, what="the reply")
    await pilot.pause()
