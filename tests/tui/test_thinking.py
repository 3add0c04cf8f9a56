"""A reasoning model's thinking in the chat: collapsed above the answer, expandable, saved, never sent back."""

from __future__ import annotations

import json
import re

from chat_fakes import FakeEngine, FakePixtral, ask, started, wait_for
from test_reasoning import ANSWER, THOUGHT, script, scripted
from textual.widgets import Collapsible

from pixtral_mlx.generate import Chunk
from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.storage import Store, to_markdown
from pixtral_mlx.tui.widgets.transcript import ReplyMessage

SIZE = (110, 36)
THINKING = "The user greets me.\nI should greet back."


class ThinkingPixtral(FakePixtral):
    """The fake, thinking first: THINKING word by word as `reasoning`, then its canned answer."""

    def run_turn(self, turn):
        for word in re.findall(r"\S+\s*|\s+", THINKING):
            yield Chunk(reasoning=word, token=self._id(word.strip()), generation_tokens=1)
        yield from super().run_turn(turn)


class ThinkingEngine(FakeEngine):
    def _load(self, progress):
        return ThinkingPixtral(self.replies, self.delay, self.context_length, self.gate).chat(system=self.system)


def thinking_of(widget: ReplyMessage) -> Collapsible:
    return widget.query_one(".thinking", Collapsible)


async def test_thinking_is_collapsed_expandable_saved_and_not_sent_back(data_dir):
    engine = ThinkingEngine(["Hello there."])
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await ask(pilot, "Hi")
        turn = screen.conversation.turns[-1]
        assert (turn.reasoning, turn.text) == (THINKING, "Hello there.")
        reply = screen.query(ReplyMessage).last()
        box = thinking_of(reply)
        assert box.display and box.collapsed and box.title == "Thinking"
        assert str(box.query_one(".thought").render()) == THINKING
        await pilot.click(box.query_one("CollapsibleTitle"))
        await wait_for(pilot, lambda: not box.collapsed, what="the thinking to expand")
        assert engine.chat.messages[-1] == {"role": "assistant", "content": "Hello there."}  # the answer only
        conv_id = screen.conversation.id
    saved = json.loads((Store(data_dir).conversations / f"{conv_id}.json").read_text())
    assert saved["messages"][-1]["reasoning_content"] == THINKING
    conv = Store(data_dir).load(conv_id)
    assert conv.turns[-1].reasoning == THINKING
    assert conv.turns[-1].message() == {"role": "assistant", "content": "Hello there."}
    assert f"<summary>Thinking</summary>\n\n{THINKING}\n\n</details>" in to_markdown(conv)

    engine = ThinkingEngine(["Hello there."])
    app = make_app(engine, data_dir=data_dir, resume=conv_id)
    async with app.run_test(size=SIZE) as pilot:  # reopened: the thinking is there, collapsed
        screen = await started(pilot)
        await wait_for(pilot, lambda: len(screen.query(ReplyMessage)) == 1, what="the reopened reply")
        box = thinking_of(screen.query(ReplyMessage).last())
        assert box.display and box.collapsed and str(box.query_one(".thought").render()) == THINKING
        # the transcript is shown first, then the engine is given the history (the same worker, a moment later)
        await wait_for(pilot, lambda: bool(engine.chat.messages), what="the history handed to the engine")
        assert engine.chat.messages[-1] == {"role": "assistant", "content": "Hello there."}


async def test_replies_without_thinking_show_no_section(data_dir):
    app = make_app(FakeEngine(["Plain."]), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await ask(pilot, "Hi")
        assert not thinking_of(screen.query(ReplyMessage).last()).display
        assert screen.conversation.turns[-1].reasoning == ""


async def test_real_engine_splits_the_thinking(think_dir, data_dir, monkeypatch):
    """The real engine thread and the tiny model with a v13 tokenizer, driven by the scripted sampler."""
    from pixtral_mlx.tui.engine import Engine

    engine = Engine(str(think_dir), max_tokens=60, default_system_prompt=False)
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        scripted(monkeypatch, script(engine.chat.pixtral))
        await ask(pilot, "What is 2 + 2?")
        turn = screen.conversation.turns[-1]
        assert (turn.reasoning, turn.text) == (THOUGHT, ANSWER)
        box = thinking_of(screen.query(ReplyMessage).last())
        assert box.display and box.collapsed and str(box.query_one(".thought").render()) == THOUGHT
        assert engine.chat.messages[-1] == {"role": "assistant", "content": ANSWER}
