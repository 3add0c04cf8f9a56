"""Attachment chips ("cat.png 3024×4032 → 768×1024 · 3,136 tokens ✕") and their bar."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import events, on, work
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Static

from pixtral_mlx.config import MAX_EDGE

from ..attachments import PATCH, Attachment, inspect
from ..clipboard import ClipboardError, grab_image
from ..messages import sentence

REMOVE = " ✕"


class Chip(Static, can_focus=True):
    """One image: enter or a click previews it; delete (or a click on ✕) removes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,space", "preview", "Preview"),
        Binding("delete,backspace", "remove", "Remove"),
    ]

    @dataclass
    class PreviewRequested(Message):
        attachment: Attachment

    @dataclass
    class RemoveRequested(Message):
        chip: Chip

    def __init__(self, attachment: Attachment, removable: bool = True, **kwargs: str) -> None:
        self.attachment = attachment
        self.removable = removable
        text = Text.assemble(("▣ ", "bold"), attachment.label(), (REMOVE, "bold") if removable else "")
        super().__init__(text, markup=False, **kwargs)  # type: ignore[arg-type]

    def action_preview(self) -> None:
        self.post_message(self.PreviewRequested(self.attachment))

    def action_remove(self) -> None:
        if self.removable:
            self.post_message(self.RemoveRequested(self))

    def on_click(self, event: events.Click) -> None:
        event.stop()
        if self.removable and event.x >= self.size.width - len(REMOVE) - 2:  # on the ✕ (and padding)
            self.action_remove()
        else:
            self.action_preview()


class AttachmentBar(Vertical):
    """The images that go with the next message; hidden while empty.

    Images are inspected off the UI thread (pure PIL, no MLX, so a Textual worker is fine).
    """

    @dataclass
    class Changed(Message):
        attachments: list[Attachment]

    def __init__(
        self, max_edge: int | None = None, geometry: Callable[[], tuple[int, int]] | None = None, **kwargs: str
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_edge = max_edge
        self.geometry = geometry  # the model's (image size, pixels per token) when known: Engine.geometry
        self.last_folder = Path.cwd()  # where the file picker opens

    def on_mount(self) -> None:
        self.display = False

    @property
    def attachments(self) -> list[Attachment]:
        return [chip.attachment for chip in self.query(Chip)]

    @work(group="attach")
    async def attach(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                geometry = self.geometry() if self.geometry else (MAX_EDGE, PATCH)
                attachment = await asyncio.to_thread(inspect, Path(path).expanduser(), self.max_edge, None, geometry)
            except (ValueError, OSError) as e:  # ImageError: one sentence that names the file
                self.notify(sentence(str(e)), title="Image not attached", severity="error")
                continue
            await self.add(attachment)
            self.last_folder = attachment.path.parent

    @work(group="attach")
    async def paste_clipboard(self, fallback: Callable[[], object] | None = None) -> None:
        """Attach the clipboard image; without one, call `fallback` (a text paste) or say why."""
        try:
            path = await asyncio.to_thread(grab_image)
        except ClipboardError as e:
            if fallback is not None:
                fallback()
            else:
                self.notify(sentence(str(e)), title="No image pasted", severity="warning")
            return
        self.attach([path])

    async def add(self, attachment: Attachment) -> None:
        if any(a.digest == attachment.digest for a in self.attachments):
            self.notify(f"{attachment.name} is already attached.", severity="warning")
            return
        await self.mount(Chip(attachment, classes="chip"))
        self._changed()

    @on(Chip.RemoveRequested)
    async def remove_chip(self, event: Chip.RemoveRequested) -> None:
        event.stop()
        chips = list(self.query(Chip))
        index = chips.index(event.chip)
        await event.chip.remove()
        if rest := list(self.query(Chip)):
            rest[min(index, len(rest) - 1)].focus()
        else:
            self.screen.focus_next()  # past the empty bar: the message box
        self._changed()

    async def pop(self) -> None:
        if chips := list(self.query(Chip)):
            await chips[-1].remove()
            self._changed()

    async def clear(self) -> None:
        await self.remove_children()
        self._changed()

    def _changed(self) -> None:
        self.display = bool(self.attachments)
        self.post_message(self.Changed(self.attachments))
