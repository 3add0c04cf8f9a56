"""The message box: multi-line, Enter sends, pasted or dropped image paths become attachments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import events
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import TextArea

from ..paths import parse_paste

# Many terminals send shift+enter as plain enter; ctrl+j (a raw line feed) works everywhere.
NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter", "ctrl+enter")


class Prompt(TextArea):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "submit", "Send", show=False),
        Binding("ctrl+j", "newline", "New line", show=False),
        Binding("ctrl+v", "paste_image", "Paste image", show=False),
    ]

    @dataclass
    class Submitted(Message):
        text: str

    @dataclass
    class FilesDropped(Message):
        images: list[Path]
        others: list[Path]

    class ImagePasteRequested(Message):
        pass

    class LastAttachmentRemoved(Message):
        pass

    def __init__(self, **kwargs: object) -> None:
        super().__init__(
            soft_wrap=True,
            show_line_numbers=False,
            tab_behavior="focus",
            highlight_cursor_line=False,
            **kwargs,
        )  # type: ignore[arg-type]

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
        elif event.key == "backspace" and not self.text:
            event.stop()
            event.prevent_default()
            self.post_message(self.LastAttachmentRemoved())

    async def _on_paste(self, event: events.Paste) -> None:
        pasted = parse_paste(event.text)
        if pasted:  # a dropped file arrives as a paste of its path
            event.stop()
            event.prevent_default()
            self.post_message(self.FilesDropped(pasted.images, pasted.others))

    def action_submit(self) -> None:
        self.post_message(self.Submitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_paste_image(self) -> None:
        self.post_message(self.ImagePasteRequested())
