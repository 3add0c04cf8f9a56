"""The status bar: model, state, context used of 128K, speed and peak memory of the last reply."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from pixtral_mlx.config import CONTEXT_LENGTH


class StatusBar(Widget):
    model = reactive("")
    state = reactive("loading")
    context_used = reactive(0)
    pending = reactive(0)  # image tokens attached to the next message
    generation_tps = reactive(0.0)
    peak_memory = reactive(0.0)
    memory = reactive("")  # the memory plan's figures for the history (`MemoryPlan.summary()`)

    def render(self) -> Text:
        used = self.context_used
        context = f"context {used:,} / {CONTEXT_LENGTH // 1024}K ({100 * used / CONTEXT_LENGTH:.1f}%)"
        if self.pending:
            context += f" +{self.pending:,} attached"
        parts: list[str | tuple[str, str]] = [
            (self.model or "pixtral-mlx", "bold"),
            "  ",
            (self.state, "italic"),
            "  │  ",
            context,
        ]
        if self.memory:  # the memory plan's figures grow with the context: shown beside it
            parts += ["  │  ", self.memory]
        if self.generation_tps:
            parts += ["  │  ", f"{self.generation_tps:,.1f} tok/s"]
        if self.peak_memory:
            parts += ["  │  ", f"peak {self.peak_memory:.2f} GB"]

        return Text.assemble(*parts)
