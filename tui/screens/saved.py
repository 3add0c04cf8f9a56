"""New, open, save and export: the conversation-file half of the chat screen."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual import work
from textual.screen import Screen

from ..messages import sentence
from ..storage import MISSING, Conversation, Store, export_path, to_markdown
from ..widgets.prompt import Prompt
from ..widgets.status import StatusBar
from ..widgets.transcript import Transcript
from .confirm import Confirm
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
        if conv.missing_images():
            if not await self._continue_without_missing(conv, "Don't open"):
                self.notify(f"“{conv.title}” was not opened; its file was left as it is.")
                return
            conv.drop_missing_images()
        self._autosave()
        await self._show(conv)
        self.notify(f"Opened “{conv.title}”.")

    def images_present(self, then: Callable[[], Awaitable[object] | object]) -> bool:
        """Before a turn: if images of the open chat are gone, offer to go on without them, then call `then`."""
        if not self.conversation.missing_images():
            return True
        self._drop_missing_and_retry(then)
        return False

    @work(group="missing", exclusive=True)
    async def _drop_missing_and_retry(self, then: Callable[[], Awaitable[object] | object]) -> None:
        if not await self._continue_without_missing(self.conversation, "Cancel"):
            return
        self.conversation.drop_missing_images()
        await self.query_one(Transcript).show(self.conversation.turns)
        self.engine.restore(self.conversation.messages())  # the engine re-reads every image of the history
        self._autosave()
        if inspect.isawaitable(result := then()):
            await result

    async def _continue_without_missing(self, conv: Conversation, no: str) -> bool:
        """Ask (in a worker) whether to go on with each missing image replaced by a text marker."""
        names = [a.name for a in conv.missing_images()]
        listed = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        them = "them" if len(names) > 1 else "it"
        question = (
            f"{len(names)} image{'s' * (len(names) > 1)} of “{conv.title}” {'are' if len(names) > 1 else 'is'} "
            f"missing from {self.store.images}: {listed}.\n\n"
            f"The model cannot see {them} again. Go on without {them}? The chat will say "
            f"{MISSING.format(name=names[0])} where {'each' if len(names) > 1 else 'it'} was."
        )
        return bool(await self.app.push_screen_wait(Confirm("Images missing", question, f"Go on without {them}", no)))

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
        if path := self._save():
            self.notify(f"Saved to {path}", title="Saved")

    def action_export(self, dest: str | None = None) -> None:
        if not self.conversation.turns:
            self.notify("There is nothing to export yet.", severity="warning")
            return
        self._save()  # a failed save is reported, and the export still goes on: it needs only the open chat
        conv, path = self.conversation, None
        try:
            path = Path(dest).expanduser() if dest else export_path(conv, Path.cwd())
            if path.is_dir():
                path = export_path(conv, path)
            path.write_text(to_markdown(conv), encoding="utf-8")
        except OSError as e:
            where = path or "The export"
            self.notify(f"{where} cannot be written ({_why(e)}).", title="Not exported", severity="error")
            return
        self.notify(f"Exported to {path}", title="Exported")

    def _autosave(self) -> None:
        saved = (self.store.conversations / f"{self.conversation.id}.json").exists()
        if saved or any(t.role == "assistant" for t in self.conversation.turns):
            if self._save() and not self.load_failed and any(t.role == "assistant" for t in self.conversation.turns):
                self.engine.save_kv(self.store.kv_path(self.conversation.id))  # resumes without prefill

    def _save(self) -> Path | None:
        """Write the conversation; on failure say why and return None (the chat goes on, unsaved)."""
        try:
            return self.store.save(self.conversation)
        except OSError as e:
            self.notify(
                f"The conversation could not be saved in {self.store.root} ({_why(e)}); it stays open here.",
                title="Not saved",
                severity="error",
                timeout=10,
            )
            return None


def _why(e: OSError) -> str:
    """ "Not a directory: /data/conversations" rather than "[Errno 20] …"."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)
