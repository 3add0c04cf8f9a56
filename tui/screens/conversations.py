"""ctrl+o: the saved conversations, newest first; enter opens, delete (twice) deletes."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..storage import StorageError, Store, Summary


def _option(s: Summary, current: bool) -> Option:
    when = s.updated.replace("T", " ")[:16]
    details = f"{when} · {s.turns} turn{'s' * (s.turns != 1)} · {s.images} image{'s' * (s.images != 1)}"
    label = Text.assemble((s.title or "(untitled)", "bold"), " (open)" if current else "", "\n", (details, "dim"))
    return Option(label, id=s.id)


class ConversationsScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("delete", "delete", "Delete"),
    ]

    def __init__(self, store: Store, current: str | None = None) -> None:
        super().__init__()
        self.store = store
        self.current = current
        self._armed: str | None = None  # the id a first delete press asked about
        self.damaged: list[StorageError] = []  # files `scan` skipped

    def compose(self) -> ComposeResult:
        summaries, self.damaged = self.store.scan()
        with Vertical(id="conversations"):
            yield OptionList(*[_option(s, s.id == self.current) for s in summaries], id="conversation-list")
            hint = "enter opens · delete deletes · esc closes" if summaries else "No saved conversations yet."
            yield Static(hint, id="conversations-hint")

    def on_mount(self) -> None:
        self.query_one("#conversations").border_title = f"Saved conversations · {self.store.conversations}"
        self.query_one(OptionList).focus()
        if len(self.damaged) == 1:
            self.notify(f"{self.damaged[0]} It was skipped and left as it is.", severity="warning", timeout=10)
        elif self.damaged:
            names = ", ".join(e.path.name for e in self.damaged[:3]) + (", …" if len(self.damaged) > 3 else "")
            self.notify(
                f"{len(self.damaged)} conversation files in {self.store.conversations} are damaged: {names}. "
                "They were skipped and left as they are.",
                severity="warning",
                timeout=10,
            )

    @on(OptionList.OptionSelected)
    def selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_delete(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return
        conv_id = options.get_option_at_index(options.highlighted).id
        assert conv_id is not None
        if self._armed != conv_id:
            self._armed = conv_id
            self.query_one("#conversations-hint", Static).update("Press delete again to delete it for good.")
            return
        self.store.delete(conv_id)
        options.remove_option(conv_id)
        self._armed = None
        self.query_one("#conversations-hint", Static).update("Deleted. enter opens · esc closes")
