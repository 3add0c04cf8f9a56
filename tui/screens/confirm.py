"""A yes/no question in a modal: quit with a draft, continue without missing images."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class Confirm(ModalScreen[bool]):
    """`True` for the first button; the second one or esc answer `False`.

    The safe answer (`no`) has the focus, so an enter that was meant for the message box loses nothing.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(False)", "Cancel"),
        Binding("left,right", "switch", "Switch", show=False),
    ]

    def __init__(self, title: str, question: str, yes: str, no: str, *, danger: bool = False, hint: str = "") -> None:
        super().__init__()
        self.title_text, self.question, self.yes, self.no, self.danger = title, question, yes, no, danger
        self.hint = hint or "esc cancels"

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(self.question, id="confirm-question", markup=False)
            with Horizontal(id="confirm-buttons"):
                yield Button(self.yes, variant="error" if self.danger else "primary", id="yes")
                yield Button(self.no, id="no")

    def on_mount(self) -> None:
        self.query_one("#confirm").border_title = self.title_text
        self.query_one("#confirm").border_subtitle = self.hint
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def answered(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_switch(self) -> None:
        # set_focus now, not focus() (a deferred call): an enter already queued must reach the new button.
        self.set_focus(self.query_one("#yes" if self.focused and self.focused.id == "no" else "#no", Button))
