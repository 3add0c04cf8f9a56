"""The chat against the real engine thread and the tiny random checkpoint (real tokenizer, MLX)."""

from __future__ import annotations

from chat_fakes import started, wait_for
from textual import events

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.engine import Engine
from pixtral_mlx.tui.messages import ReplyFinished


class RecordingEngine(Engine):
    """The real engine, keeping a copy of what it reports."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.finished: list[ReplyFinished] = []

    def _post(self, message):
        if isinstance(message, ReplyFinished):
            self.finished.append(message)
        super()._post(message)


async def test_two_turns_with_an_image(mlx_dir, data_dir, images):
    engine = RecordingEngine(str(mlx_dir), max_tokens=8, temperature=0.0)
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=(110, 36)) as pilot:
        screen = await started(pilot)
        assert screen.loaded and screen.query_one("#status").model == "tiny-mlx"
        screen.query_one("#prompt").post_message(events.Paste(f"'{images['red']}'"))
        await wait_for(pilot, lambda: screen.query_one("#attachments").attachments)
        chip = screen.query_one("#attachments").attachments[0]

        for text in ("What is in this image?", "And now?"):
            screen.query_one("#prompt").insert(text)
            await pilot.press("enter")
            await wait_for(pilot, lambda: not screen.busy, timeout=60, what="the reply")
        first, second = engine.finished
        assert [t.role for t in screen.conversation.turns] == ["user", "assistant"] * 2
        assert all(t.text for t in screen.conversation.turns)
        assert first.reply.generation_tokens == 8 and first.reply.finish_reason == "length"
        # Turn 1 prefilled the image; turn 2 only the new tokens, not the whole history again.
        assert first.reply.prompt_tokens > chip.tokens
        assert second.reply.prompt_tokens < 20 < first.context_used < second.context_used
        assert engine.chat.pixtral.vision_runs == 1  # the image was encoded once
        assert screen.query_one("#status").context_used == second.context_used

        # Reopen it: the KV cache saved beside the conversation is resumed, so the next turn prefills only
        # its own tokens (and the </s> each cut-off reply lacks in the cache).
        saved = screen.conversation.id
        await wait_for(pilot, lambda: screen.store.kv_path(saved).exists(), what="the saved KV cache")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: engine.chat.messages == [])
        screen.open_conversation(saved)
        status = screen.query_one("#status")
        await wait_for(pilot, lambda: status.context_used > 0, what="the restored history")
        # Measured from the history alone; re-encoding adds the EOS that each cut-off reply lacks.
        assert status.context_used == second.context_used + 2
        screen.query_one("#prompt").insert("Once more?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(engine.finished) == 3 and not screen.busy, timeout=60)
        third = engine.finished[2]
        assert third.reply.prompt_tokens < 20  # not the whole history again
        # Resumed up to where the re-encoded history agrees with the cache (gibberish replies may not round-trip).
        assert engine.chat.resumed_tokens > first.context_used
        assert len(engine.chat.messages) == 6 and engine.chat.pixtral.vision_runs == 1
    assert engine.chat is None  # the engine thread released the model on exit
