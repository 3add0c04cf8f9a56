"""Test doubles for the chat: a `FakeEngine` with the real engine thread, the real `Chat`, and canned replies."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pixtral_mlx.chat import Chat
from pixtral_mlx.errors import ImageError, ModelError
from pixtral_mlx.generate import Chunk, PromptCache
from pixtral_mlx.pipeline import Pixtral
from pixtral_mlx.prompt import Prompt
from pixtral_mlx.tui.engine import Engine

REPLIES = [
    "A **red** square on a white background.\n\n```python\nprint('red')\n```\n",
    "It is about 300 pixels wide.",
    "Here is another answer, written again.",
]
IMAGE_TOKENS = 100  # what the fake counts per image
STATS = {"prompt_tps": 1234.0, "generation_tps": 42.0, "peak_memory": 1.25}
EOS = 2


class FakePixtral(Pixtral):
    """A `Pixtral` with words for tokens and canned replies instead of a model.

    Only the tokenizer and the model run are fake: the turn path (context check, cache reuse) and all
    of `Chat`'s accounting are the library's own, so the app is tested against the real behaviour.
    """

    def __init__(self, replies: list[str], delay: float, context_length: int, gate: threading.Event | None = None):
        self.replies, self.delay, self.gate = replies, delay, gate
        self.context_length = context_length
        self.vocab: dict[str, int] = {}
        self.n_replies = 0
        self.prefilled: list[int] = []  # prompt tokens of each turn, as the real Chat reports them

    def encode(self, messages: list[dict[str, Any]], max_edge: int | None = None, options: Any = None) -> Prompt:
        """Like tekken: `<s>`, each user part as `[INST] words [/INST]`, each image IMAGE_TOKENS tokens,
        each reply as its words then `</s>` (what the cache holds after a turn)."""
        tokens = [1]
        for m in messages:
            content = m["content"]
            if m["role"] == "assistant":
                tokens += [*(self._id(w) for w in content.split()), EOS]
                continue
            for p in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if p["type"] == "image_url":
                    if not Path(p["image_url"]["url"]).exists():
                        raise ImageError(f"{p['image_url']['url']}: no such file.")
                    tokens += [10] * IMAGE_TOKENS
                else:
                    tokens += [3, *(self._id(w) for w in p["text"].split()), 4]
        return Prompt(tokens=tokens)

    def new_cache(self, kv_bits: int | None = None, kv_group_size: int = 64) -> PromptCache:
        return PromptCache([], kv_bits, kv_group_size)  # no layers: it holds exactly the tokens it is told

    def _plan(self, prompt: Prompt, cache: PromptCache, keep: int, max_tokens: int, kv_bits: Any = False) -> Any:
        """Fixed figures, like STATS: 4-bit Pixtral-12B weights, its bf16 KV per token, a 16 GB Mac's limit."""
        from pixtral_mlx.memory import MemoryPlan

        per_token = 163_840.0
        return MemoryPlan(
            image_tokens=[],
            prompt_tokens=len(prompt),
            new_tokens=len(prompt) - keep,
            max_tokens=max_tokens,
            kv_bits=None,
            kv_group_size=64,
            kv_per_token=per_token,
            weights=7_000_000_000,
            kv=int(per_token * (len(prompt) + max_tokens)),
            features=0,
            vision=0,
            prefill=100_000_000,
            prefill_step=2048,
            limit=11_400_000_000,
            limit_source="Metal's recommended working set",
        )

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, 1000 + len(self.vocab))

    def run_turn(self, turn: Any) -> Iterator[Chunk]:
        prompt, cache, keep = turn.prompt, turn.cache, turn.keep
        reply = self.replies[self.n_replies % len(self.replies)]
        self.n_replies += 1
        self.prefilled.append(len(prompt) - keep)
        words = re.findall(r"\S+\s*|\s+", reply)
        stats = {**STATS, "prompt_tokens": len(prompt) - keep}
        generated: list[int] = []
        try:
            for i, word in enumerate(words):
                if self.gate is not None:
                    self.gate.wait(10)
                if self.delay:
                    time.sleep(self.delay)
                generated.append(self._id(word.strip()))
                yield Chunk(text=word, token=generated[-1], generation_tokens=i + 1, **stats)
            generated.append(EOS)
            yield Chunk(text="", token=None, generation_tokens=len(words), finish_reason="stop", **stats)
        finally:
            cache.tokens = prompt.tokens + generated


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

    def _load(self, progress: Callable[[str], None]) -> Chat:
        progress("Reading the fake weights…")
        if self.fail_load:
            raise ModelError(self.fail_load)
        return FakePixtral(self.replies, self.delay, self.context_length, self.gate).chat(system=self.system)

    def _do_save_kv(self, path: Path) -> None:
        """The fake has no KV cache to write (tests/tui/test_real_engine.py saves and resumes a real one)."""
        self.kv_saved = [*getattr(self, "kv_saved", []), path]


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
