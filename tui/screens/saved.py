"""New, open, save and export: the conversation-file half of the chat screen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual import work
from textual.screen import Screen

from ..messages import sentence
from ..storage import Conversation, Store, export_path, to_markdown
from ..widgets.prompt import Prompt
from ..widgets.status import StatusBar
from ..widgets.transcript import Transcript
from .conversations import ConversationsScreen

if TYPE_CHECKING:
    from ..engine import Engine


class SavedChats(Screen[None]):
    """The base of `ChatScreen`; every finished reply is saved, so "save" is rarely needed."""

    engine: Engine
    store: Store
    conversation: Conversation
    busy: bool
    load_failed: bool

    async def action_new_chat(self) -> None:
        if self.busy:
            self.notify("A reply is being written; press esc to stop it first.", severity="warning")
            return
        self._autosave()
        await self._show(Conversation(system=self.engine.system, model=self.engine.model))

    def action_open(self) -> None:
        def chosen(conv_id: str | None) -> None:
            if conv_id:
                self.open_conversation(conv_id)

        self.app.push_screen(ConversationsScreen(self.store, current=self.conversation.id), chosen)

    @work(group="open")
    async def open_conversation(self, conv_id: str) -> None:
        if self.busy:
            self.notify("A reply is being written; press esc to stop it first.", severity="warning")
            return
        try:
            conv = self.store.load(conv_id)
        except ValueError as e:
            self.notify(sentence(str(e)), severity="error")
            return
        self._autosave()
        await self._show(conv)
        missing = [a.name for t in conv.turns for a in t.images if not a.path.exists()]
        if missing:
            self.notify(
                f"{len(missing)} image(s) of this conversation are missing from "
                f"{self.store.images}: "
                f"{', '.join(missing[:3])}.",
                severity="warning",
            )
        self.notify(f"Opened “{conv.title}”.")

    async def _show(self, conv: Conversation) -> None:
        self.conversation = conv
        await self.query_one(Transcript).show(conv.turns)
        self.query_one("#welcome").display = not conv.turns
        status = self.query_one(StatusBar)
        status.context_used, status.generation_tps, status.peak_memory = 0, 0.0, 0.0
        if not self.load_failed:
            self.engine.restore(conv.messages(), kv_path=self.store.kv_path(conv.id))
        self.query_one(Prompt).focus()

    def action_save(self) -> None:
        if not self.conversation.turns:
            self.notify("There is nothing to save yet.", severity="warning")
            return
        path = self.store.save(self.conversation)
        self.notify(f"Saved to {path}", title="Saved")

    def action_export(self, dest: str | None = None) -> None:
        if not self.conversation.turns:
            self.notify("There is nothing to export yet.", severity="warning")
            return
        self.store.save(self.conversation)  # the export links to the stored image copies
        conv = self.store.load(self.conversation.id)
        path = Path(dest).expanduser() if dest else export_path(conv, Path.cwd())
        if path.is_dir():
            path = export_path(conv, path)
        try:
            path.write_text(to_markdown(conv), encoding="utf-8")
        except OSError as e:
            self.notify(f"{path} cannot be written ({e.strerror or e}).", severity="error")
            return
        self.notify(f"Exported to {path}", title="Exported")

    def _autosave(self) -> None:
        saved = (self.store.conversations / f"{self.conversation.id}.json").exists()
        if saved or any(t.role == "assistant" for t in self.conversation.turns):
            try:
                self.store.save(self.conversation)
            except OSError as e:
                self.notify(f"The conversation could not be saved ({e.strerror or e}).", severity="error")
                return
            if not self.load_failed and any(t.role == "assistant" for t in self.conversation.turns):
                self.engine.save_kv(self.store.kv_path(self.conversation.id))  # resumes without prefill
