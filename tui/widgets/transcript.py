"""The conversation: an anchored VerticalScroll with one widget per message.

Replies stream through `Markdown.get_stream` (it batches fragments when rendering falls behind) and
are rendered once more from the full text at the end, so streamed code fences come out right. A reasoning
model's thinking streams into a collapsed "Thinking" section above its answer (expand it with a click or Enter).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Collapsible, Markdown, Static

from pixtral_mlx.turn import Reply

from ..storage import Turn, tool_call_text
from .attachment import Chip

FINISH_NOTES = {"interrupted": "stopped", "length": "hit the token limit"}
RESULT_CHARS = 100  # a tool result is shown as its first line, cut to this many characters


def short_result(text: str) -> str:
    """A tool's result in one line: its first line, cut short, with a count of what was left out."""
    lines = text.strip().splitlines() or [""]
    first = lines[0][:RESULT_CHARS] + ("…" if len(lines[0]) > RESULT_CHARS else "")
    more = f" (+{len(lines) - 1} line{'s' * (len(lines) > 2)})" if len(lines) > 1 else ""
    return f"← {first}{more}"


def stats_line(m: Reply) -> str:
    parts = [
        f"{m.generation_tokens:,} tokens",
        f"{m.generation_tps:,.1f} tok/s",
        f"prompt {m.prompt_tokens:,} tokens at {m.prompt_tps:,.0f} tok/s",
        f"peak {m.peak_memory:.2f} GB",
    ]
    if note := FINISH_NOTES.get(m.finish_reason):
        parts.append(note)
    return " · ".join(parts)


class UserMessage(Vertical):
    def __init__(self, turn: Turn) -> None:
        super().__init__(classes="message user")
        self.turn = turn

    def compose(self) -> ComposeResult:
        for attachment in self.turn.images:
            yield Chip(attachment, removable=False, classes="chip")
        if self.turn.text:
            yield Static(self.turn.text, markup=False, classes="text")


class ReplyMessage(Vertical):
    DEFAULT_CSS = """
    ReplyMessage .tool-call {
        color: $accent;
        text-style: bold;
    }
    ReplyMessage .thinking {
        border-top: none;
        padding-bottom: 0;
        background: transparent;
    }
    ReplyMessage .thinking .thought {
        color: $text-muted;
    }
    """
    THINKING, THINKING_NOW = "Thinking", "Thinking…"

    def __init__(self, turn: Turn | None = None) -> None:
        super().__init__(classes="message reply")
        self.turn = turn or Turn("assistant", "")
        self._stream = None

    def compose(self) -> ComposeResult:
        thought = Static(self.turn.reasoning, markup=False, classes="thought")
        thinking = Collapsible(thought, title=self.THINKING, collapsed=True, classes="thinking")
        thinking.display = bool(self.turn.reasoning)
        yield thinking
        markdown = Markdown(self.turn.text)
        markdown.display = bool(self.turn.text or not self.turn.tool_calls)
        yield markdown
        for call in self.turn.tool_calls:
            yield Static(f"→ {tool_call_text(call)}", markup=False, classes="tool-call")
        shown = self.turn.text or self.turn.tool_calls
        note = FINISH_NOTES.get(self.turn.finish or "", "")
        stats = Static(note if shown or note else "thinking…", classes="stats")
        stats.display = bool(note or not shown)
        yield stats

    async def write(self, fragment: str, reasoning: str = "") -> None:
        if reasoning:
            self.turn.reasoning += reasoning
            thinking = self.query_one(".thinking", Collapsible)
            thinking.display, thinking.title = True, self.THINKING_NOW
            thinking.query_one(".thought", Static).update(self.turn.reasoning)
        if not fragment:
            return
        if self._stream is None:
            self.query_one(".stats", Static).update("")
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        self.turn.text += fragment
        await self._stream.write(fragment)

    async def finish(self, text: str, finish: str, stats: str) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.turn.text, self.turn.finish = text, finish if finish == "interrupted" else None
        thinking = self.query_one(".thinking", Collapsible)
        thinking.display, thinking.title = bool(self.turn.reasoning), self.THINKING
        thinking.query_one(".thought", Static).update(self.turn.reasoning)
        await self.query_one(Markdown).update(text)  # one full render: streamed code fences come out right
        self.query_one(".stats", Static).update(stats)
        self.query_one(".stats", Static).display = bool(stats)


class ToolResult(Vertical):
    """A tool's result (a `tool` message), collapsed to one line; the whole text is its tooltip."""

    DEFAULT_CSS = """
    ToolResult {
        border-left: outer $accent;
        color: $text-muted;
    }
    """

    def __init__(self, turn: Turn) -> None:
        super().__init__(classes="message tool")
        self.turn = turn
        self.tooltip = turn.text

    def compose(self) -> ComposeResult:
        yield Static(short_result(self.turn.text), markup=False, classes="text")


def message_widget(turn: Turn) -> UserMessage | ReplyMessage | ToolResult:
    if turn.role == "tool":
        return ToolResult(turn)
    return UserMessage(turn) if turn.role == "user" else ReplyMessage(turn)


class Transcript(VerticalScroll, can_focus=True):
    def on_mount(self) -> None:
        self.anchor()

    async def add_turn(self, turn: Turn) -> UserMessage | ReplyMessage:
        widget = UserMessage(turn) if turn.role == "user" else ReplyMessage(turn)
        await self.mount(widget)
        self.anchor()
        return widget

    async def start_reply(self) -> ReplyMessage:
        reply = ReplyMessage()
        await self.mount(reply)
        self.anchor()
        return reply

    async def show(self, turns: list[Turn]) -> None:
        await self.remove_children(".message")
        await self.mount_all([message_widget(t) for t in turns])
        self.anchor()

    async def remove_last(self, kind: type[UserMessage | ReplyMessage]) -> None:
        messages = list(self.query(".message"))
        if messages and isinstance(messages[-1], kind):
            await messages[-1].remove()
