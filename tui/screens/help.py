"""F1: every key and slash command on one page."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..commands import COMMANDS

KEYS = [
    ("enter", "send the message"),
    (
        "ctrl+j · shift+enter",
        "new line (alt+enter too; shift+enter only where the terminal tells it from enter)",
    ),
    ("esc", "stop the reply; what was written so far is kept"),
    (
        "paste or drop a path",
        "attach images: quoted, \\-escaped, ~ and file:// paths, several at once",
    ),
    ("ctrl+f", "attach an image from a file picker with preview"),
    ("ctrl+v", "attach the image on the clipboard (pngpaste/osascript, wl-paste or xclip)"),
    ("backspace", "in an empty message box: remove the last attachment"),
    ("tab · shift+tab", "move between the conversation, the attachments and the message box"),
    (
        "enter · space · delete",
        "on an attachment: preview it (or click it) · remove it (backspace too, or click ✕)",
    ),
    ("ctrl+r", "regenerate the last reply"),
    ("ctrl+g", "undo the last turn; its text and images come back to the message box"),
    ("ctrl+n", "new chat (the current one stays saved)"),
    ("ctrl+o", "open a saved conversation"),
    ("ctrl+s", "save now (every finished reply is saved anyway)"),
    ("ctrl+t", "export the conversation to Markdown in the current folder"),
    ("ctrl+p", "command palette"),
    ("F1 · ?", "this help (? when the message box is not focused)"),
    ("ctrl+q", "quit"),
]


def help_table() -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), expand=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(ratio=1)
    table.add_row(Text("Keys", style="bold underline"), "")
    for key, what in KEYS:
        table.add_row(key, what)
    table.add_row("", "")
    table.add_row(Text("Commands", style="bold underline"), "type them in the message box")
    for name, (arg, what) in COMMANDS.items():
        table.add_row(f"/{name}{' ' + arg if arg else ''}", what)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(help_table(), id="help-table")

    def on_mount(self) -> None:
        self.query_one("#help").border_title = "pixtral-mlx chat · esc closes"
        self.query_one("#help").focus()
