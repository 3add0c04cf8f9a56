"""The Textual app: stylesheet, global keys, command palette, engine lifetime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from .engine import Engine
from .screens.chat import ChatScreen
from .screens.confirm import Confirm
from .screens.help import HelpScreen
from .storage import Store

PALETTE = [  # (title, help, ChatScreen action)
    ("New chat", "Start a new conversation (ctrl+n)", "new_chat"),
    ("Open conversation", "Open a saved conversation (ctrl+o)", "open"),
    ("Save conversation", "Save now (ctrl+s)", "save"),
    ("Export to Markdown", "Write the conversation to ./TITLE.md (ctrl+t)", "export"),
    ("Attach image", "Pick an image file (ctrl+f)", "attach"),
    ("Paste image", "Attach the image on the clipboard (ctrl+v)", "paste_image"),
    ("Regenerate reply", "Write the last reply again (ctrl+r)", "regenerate"),
    ("Undo last turn", "Take back the last message and its reply (ctrl+g)", "undo"),
    ("Stop reply", "Stop the reply being written (esc)", "stop"),
]


class QuitScreen(Confirm):
    def __init__(self, draft: str) -> None:
        super().__init__(
            "Quit?",
            f"The message box holds {draft} that you have not sent. Quitting discards it.",
            "Quit",
            "Stay",
            danger=True,
            hint="esc stays · ctrl+q quits",
        )


class PixtralChatApp(App[None]):
    CSS_PATH = "pixtral.tcss"
    TITLE = "pixtral-mlx"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        images: list[Path] | None = None,
        resume: str | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.store = store
        self.chat_screen = ChatScreen(engine, store, images=images, resume=resume)

    def on_mount(self) -> None:
        self.push_screen(self.chat_screen)

    def on_unmount(self) -> None:
        self.engine.close()

    async def action_quit(self) -> None:
        """Quit at once, unless the message box holds a draft: then ask (ctrl+q again quits)."""
        draft = self.chat_screen.draft()
        if not draft or isinstance(self.screen, QuitScreen):
            self.exit()
            return

        def answered(quit: bool | None) -> None:
            if quit:
                self.exit()

        self.push_screen(QuitScreen(draft), answered)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in PALETTE:
            yield SystemCommand(title, help_text, lambda a=action: self.chat_screen.run_action(a))
        yield SystemCommand("Help", "Every key and command (F1)", self.action_help)


def make_app(
    engine: Engine,
    *,
    data_dir: Path | None = None,
    images: list[Path] | None = None,
    resume: str | None = None,
) -> PixtralChatApp:
    """The app as the CLI and the tests build it; `engine` may be a test double."""
    return PixtralChatApp(engine, Store(data_dir), images=images, resume=resume)
