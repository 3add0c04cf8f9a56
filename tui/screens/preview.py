"""A large preview of one attached image, with what the model will see."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static
from textual_image.widget import Image

from ..attachments import Attachment


class PreviewScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,space,q", "dismiss", "Close")]

    def __init__(self, attachment: Attachment) -> None:
        super().__init__()
        self.attachment = attachment

    def compose(self) -> ComposeResult:
        with Vertical(id="preview"):
            if self.attachment.path.exists():
                yield Image(str(self.attachment.path), id="preview-image")
            else:
                yield Static(f"{self.attachment.path} is missing.", id="preview-image")
            yield Static(self.attachment.label(), markup=False, id="preview-info")

    def on_mount(self) -> None:
        self.query_one("#preview").border_title = self.attachment.name
        self.query_one("#preview").border_subtitle = "esc closes"

    def on_click(self) -> None:
        self.dismiss()
