"""The chat screen: transcript, attachments, message box, status; it handles engine messages.

One module on purpose, though over 300 lines: one Textual screen whose handlers share its widgets and busy
state (the saved-chat actions are apart already, in `saved.py`), and whose layout the snapshot tests pin.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Footer, LoadingIndicator, Static

from pixtral_mlx.turn import Reply

from .. import commands
from ..engine import Engine
from ..messages import (
    ContextUpdated,
    EngineFailed,
    LoadFailed,
    MemoryUpdated,
    ModelLoaded,
    ModelLoading,
    ReplyFinished,
    ReplyStarted,
    Token,
    sentence,
)
from ..paths import parse_paste
from ..storage import Conversation, Store, Turn
from ..widgets.attachment import AttachmentBar, Chip
from ..widgets.prompt import Prompt
from ..widgets.status import StatusBar
from ..widgets.transcript import ReplyMessage, Transcript, UserMessage, stats_line
from .picker import FilePicker
from .preview import PreviewScreen
from .saved import SavedChats

WELCOME = (
    "Drop or paste an image path here, press ctrl+f to pick a file or ctrl+v to paste a clipboard "
    "image.\n"
    "enter sends · ctrl+j adds a line · esc stops a reply · F1 lists every key."
)


class ChatScreen(SavedChats):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+f", "attach", "Attach"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+g", "undo", "Undo"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "open", "Open"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+t", "export", "Export", show=False),
        Binding("question_mark", "app.help", "Help", show=False),
    ]

    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        images: list[Path] | None = None,
        resume: str | None = None,
    ):
        super().__init__()
        self.engine = engine
        self.store = store
        self.conversation = Conversation(system=engine.system, model=engine.model)
        self.loaded = self.load_failed = self.busy = False
        self.reply: ReplyMessage | None = None
        self._failed_send: tuple[Turn, UserMessage] | None = None
        self._regenerated: Turn | None = None
        self._initial_images = images or []
        self._resume = resume

    def compose(self) -> ComposeResult:
        with Vertical(id="loading"):
            yield LoadingIndicator()
            yield Static(f"Loading {self.engine.model}…", id="load-text")
        with Transcript(id="transcript"):
            yield Static(WELCOME, id="welcome")
        yield AttachmentBar(self.engine.max_edge, lambda: self.engine.geometry, id="attachments")
        yield Prompt(id="prompt")
        yield StatusBar(id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        status = self.query_one(StatusBar)
        status.model, status.state = self.engine.name, "loading…"
        self.query_one(Prompt).focus()
        self.engine.start(self)
        if self._resume:
            self.open_conversation(self._resume)
        if self._initial_images:
            self.query_one(AttachmentBar).attach(self._initial_images)

    # Engine messages ---------------------------------------------------------------------------
    def on_model_loading(self, message: ModelLoading) -> None:
        self.query_one("#load-text", Static).update(message.text)

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loaded = True
        self.query_one("#loading").display = False
        self._set_state("ready")

    def on_load_failed(self, message: LoadFailed) -> None:
        self.load_failed = True
        self.query_one(LoadingIndicator).display = False
        self.query_one("#load-text", Static).update(f"The model could not be loaded: {message.error}")
        self.query_one("#loading").add_class("failed")
        self._set_state("no model")
        self.notify(sentence(message.error), title="Model not loaded", severity="error", timeout=15)

    async def on_reply_started(self, message: ReplyStarted) -> None:
        self._failed_send = None
        self.reply = await self.query_one(Transcript).start_reply()
        self._set_state("generating…")

    async def on_token(self, message: Token) -> None:
        if self.reply is not None:
            await self.reply.write(message.text, message.reasoning)

    async def on_reply_finished(self, message: ReplyFinished) -> None:
        reply = self.reply or await self.query_one(Transcript).start_reply()
        self.reply, self._regenerated = None, None
        reply.turn.reasoning = message.reply.reasoning or reply.turn.reasoning
        await reply.finish(message.reply.text, message.reply.finish_reason, stats_line(message.reply))
        self.conversation.turns.append(reply.turn)
        status = self.query_one(StatusBar)
        status.context_used, status.generation_tps = message.context_used, message.reply.generation_tps
        status.peak_memory = message.reply.peak_memory
        self._set_busy(False)
        self._autosave()

    def on_context_updated(self, message: ContextUpdated) -> None:
        self.query_one(StatusBar).context_used = message.context_used

    def on_memory_updated(self, message: MemoryUpdated) -> None:
        self.query_one(StatusBar).memory = message.summary

    async def on_engine_failed(self, message: EngineFailed) -> None:
        title = "Error" if message.expected else "Engine error"
        self.notify(sentence(message.error), title=title, severity="error", timeout=10)
        if message.request not in ("send", "regenerate"):
            return
        if self.reply is not None:  # failed mid-reply: the library kept the partial reply
            partial = Reply(text=self.reply.turn.text, finish_reason="interrupted")
            await self.on_reply_finished(ReplyFinished(partial, self.query_one(StatusBar).context_used))
            return
        if self._failed_send is not None:  # nothing happened: give the message back (elia's pattern)
            turn, widget = self._failed_send
            self._failed_send = None
            await widget.remove()
            self.conversation.turns.remove(turn)
            await self._restore_prompt(turn)
        if self._regenerated is not None:
            self.conversation.turns.append(self._regenerated)
            await self.query_one(Transcript).add_turn(self._regenerated)
            self._regenerated = None
        self._set_busy(False)

    # The message box ---------------------------------------------------------------------------
    @on(Prompt.Submitted)
    async def submit(self, event: Prompt.Submitted) -> None:
        text = event.text.strip()
        if command := commands.parse(text):
            await self.run_command(*command)
            return
        if (dropped := parse_paste(text)) and not dropped.others:  # paths typed, or dropped as keystrokes
            self.query_one(Prompt).clear()
            self.query_one(AttachmentBar).attach(dropped.images)
            return
        attachments = self.query_one(AttachmentBar).attachments
        if not text and not attachments:
            return
        if not self._can_start() or not self.images_present(self.query_one(Prompt).action_submit):
            return
        try:
            stored = [self.store.store_image(a) for a in attachments]
        except OSError as e:
            self.notify(
                f"The image could not be copied into {self.store.images} ({e.strerror or e}).",
                severity="error",
            )
            return
        turn = Turn("user", text, stored)
        self.conversation.turns.append(turn)
        self.query_one("#welcome").display = False
        widget = await self.query_one(Transcript).add_turn(turn)
        assert isinstance(widget, UserMessage)
        self._failed_send = (turn, widget)
        self.query_one(Prompt).clear()
        await self.query_one(AttachmentBar).clear()
        self._set_busy(True)
        self.engine.send(turn.content())

    @on(Prompt.FilesDropped)
    def files_dropped(self, event: Prompt.FilesDropped) -> None:
        for path in event.others:
            self.notify(
                f"{path.name} is not an image (PNG, JPEG, WebP, GIF, BMP or TIFF).",
                severity="warning",
            )
        self.query_one(AttachmentBar).attach(event.images)

    @on(Prompt.ImagePasteRequested)
    def action_paste_image(self) -> None:
        prompt = self.query_one(Prompt)
        self.query_one(AttachmentBar).paste_clipboard(prompt.action_paste if self.app.clipboard else None)

    @on(Prompt.LastAttachmentRemoved)
    async def remove_last_attachment(self) -> None:
        await self.query_one(AttachmentBar).pop()

    @on(AttachmentBar.Changed)
    def attachments_changed(self, event: AttachmentBar.Changed) -> None:
        self.query_one(StatusBar).pending = sum(a.tokens for a in event.attachments)

    @on(Chip.PreviewRequested)
    def preview(self, event: Chip.PreviewRequested) -> None:
        self.app.push_screen(PreviewScreen(event.attachment))

    async def _restore_prompt(self, turn: Turn) -> None:
        prompt = self.query_one(Prompt)
        if not prompt.text.strip():
            prompt.text = turn.text
            prompt.move_cursor(prompt.document.end)
        bar = self.query_one(AttachmentBar)
        if not bar.attachments:
            for attachment in turn.images:
                await bar.add(attachment)

    # Actions -----------------------------------------------------------------------------------
    async def run_command(self, name: str, arg: str) -> None:
        prompt = self.query_one(Prompt)
        if name.startswith("?"):
            self.notify(f"/{name[1:]} is not a command; /help lists them.", severity="warning")
            return
        prompt.clear()
        if name == "image":
            dropped = parse_paste(arg)
            if dropped:
                self.files_dropped(Prompt.FilesDropped(dropped.images, dropped.others))
            else:
                prompt.text = f"/image {arg}"
                prompt.move_cursor(prompt.document.end)
                self.notify(
                    f"{arg}: no such file." if arg else "Usage: /image PATH…",
                    title="Image not attached",
                    severity="error",
                )
        elif name == "export":
            self.action_export(arg or None)
        else:
            action = {
                "paste": "paste_image",
                "new": "new_chat",
                "regen": "regenerate",
                "help": "app.help",
                "quit": "app.quit",
            }.get(name, name)
            await self.run_action(action)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return self.busy  # shown in the footer only while a reply is being written
        return True

    def action_stop(self) -> None:
        if self.busy:
            self.engine.stop()
            self._set_state("stopping…")
        else:
            self.query_one(Prompt).focus()

    def action_attach(self) -> None:
        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one(AttachmentBar).attach([path])

        folder = self.query_one(AttachmentBar).last_folder
        self.app.push_screen(FilePicker(folder, self.engine.max_edge, self.engine.geometry), picked)

    async def action_regenerate(self) -> None:
        turns = self.conversation.turns
        if not turns or turns[-1].role != "assistant":
            self.notify("There is no reply to regenerate.", severity="warning")
            return
        if not self._can_start() or not self.images_present(self.action_regenerate):
            return
        self._regenerated = turns.pop()
        await self.query_one(Transcript).remove_last(ReplyMessage)
        self._set_busy(True)
        self.engine.regenerate()

    async def action_undo(self) -> None:
        turns = self.conversation.turns
        if not any(t.role == "user" for t in turns):
            self.notify("There is nothing to undo.", severity="warning")
            return
        if not self._can_start():
            return
        transcript = self.query_one(Transcript)
        if turns[-1].role == "assistant":
            turns.pop()
            await transcript.remove_last(ReplyMessage)
        user = turns.pop()
        await transcript.remove_last(UserMessage)
        self.engine.undo()
        await self._restore_prompt(user)
        self.query_one("#welcome").display = not turns
        self._autosave()

    # State -------------------------------------------------------------------------------------
    def draft(self) -> str | None:
        """What quitting would lose ("a message of 12 words and 2 images"), or None."""
        words = len(self.query_one(Prompt).text.split())
        images = len(self.query_one(AttachmentBar).attachments)
        parts = [f"{n} {noun}{'s' * (n != 1)}" for n, noun in ((words, "word"), (images, "image")) if n]
        if not parts:
            return None
        return f"a message of {' and '.join(parts)}" if words else " and ".join(parts)

    def _can_start(self) -> bool:
        if self.busy:
            self.notify("A reply is being written; press esc to stop it first.", severity="warning")
        elif self.load_failed:
            self.notify(f"The model is not loaded ({self.engine.load_error}).", severity="error")
        elif not self.loaded:
            self.notify("The model is still loading; try again once it is ready.", severity="warning")
        else:
            return True
        return False

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self._set_state("generating…" if busy else ("ready" if self.loaded else "loading…"))
        self.refresh_bindings()

    def _set_state(self, state: str) -> None:
        self.query_one(StatusBar).state = state
