"""The chat app driven with Textual's Pilot, against a FakeEngine (real thread, canned replies)."""

from __future__ import annotations

import urllib.parse

import pytest
from chat_fakes import REPLIES, FakeEngine, ask, notes, started, wait_for
from textual import events

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.screens.conversations import ConversationsScreen
from pixtral_mlx.tui.screens.help import KEYS, HelpScreen
from pixtral_mlx.tui.storage import Store
from pixtral_mlx.tui.widgets.attachment import AttachmentBar
from pixtral_mlx.tui.widgets.transcript import ReplyMessage, UserMessage

SIZE = (110, 36)


def bar(screen):
    return screen.query_one(AttachmentBar)


def prompt(screen):
    return screen.query_one("#prompt")


async def test_paste_attach_send_and_stream(data_dir, images):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        url = "file://" + urllib.parse.quote(str(images["photo"]))
        prompt(screen).post_message(events.Paste(f"'{images['red']}'\n"))
        prompt(screen).post_message(events.Paste(url))
        await wait_for(pilot, lambda: len(bar(screen).attachments) == 2, what="two chips")
        assert prompt(screen).text == ""  # the paths did not land in the message box
        labels = [a.label() for a in bar(screen).attachments]
        assert labels == [
            "red square.png 300×200 → 304×208 · 260 tokens",
            "photo.jpg 3024×4032 → 768×1024 · 3,136 tokens",
        ]
        await wait_for(pilot, lambda: screen.query_one("#status").pending == 3396, what="the status bar")

        await ask(pilot, "What is in these pictures?")
        user, reply = screen.conversation.turns
        assert [a.name for a in user.images] == ["red square.png", "photo.jpg"]
        assert all(a.path.parent == Store(data_dir).images for a in user.images)  # sent from the stored copies
        assert reply.text == REPLIES[0]
        assert str(screen.query(ReplyMessage).last().query_one(".stats").render()).startswith("10 tokens · 42.0 tok/s")
        assert not bar(screen).attachments and not bar(screen).display
        sent = engine.chat.messages[0]["content"]
        assert [p["type"] for p in sent] == ["image_url", "image_url", "text"]
        assert Store(data_dir).list()[0].title == "What is in these pictures?"  # saved when the reply finished


async def test_enter_sends_and_ctrl_j_adds_a_line(data_dir):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await pilot.press("a", "ctrl+j", "b")
        assert prompt(screen).text == "a\nb" and not screen.conversation.turns
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.busy and len(screen.conversation.turns) == 2)
        assert screen.conversation.turns[0].text == "a\nb" and prompt(screen).text == ""


async def test_stop_keeps_the_partial_reply(data_dir):
    long_reply = " ".join(f"word{i}" for i in range(200))
    engine = FakeEngine([long_reply], delay=0.01)
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        prompt(screen).insert("Talk for a while")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.reply is not None and "word3" in screen.reply.turn.text)
        await pilot.press("escape")
        await wait_for(pilot, lambda: not screen.busy, what="the stop")
        reply = screen.conversation.turns[-1]
        assert reply.finish == "interrupted"
        assert reply.text.startswith("word0 word1 word2 word3") and len(reply.text) < len(long_reply)
        assert engine.chat.messages[-1] == {
            "role": "assistant",
            "content": reply.text,
        }  # the library kept it too
        assert str(screen.query(ReplyMessage).last().query_one(".stats").render()).endswith("stopped")


async def test_regenerate_replaces_the_last_reply(data_dir):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await ask(pilot, "Hello")
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not screen.busy and screen.conversation.turns[-1].text == REPLIES[1])
        assert [t.role for t in screen.conversation.turns] == ["user", "assistant"]
        assert len(screen.query(ReplyMessage)) == 1
        assert [m["content"] for m in engine.chat.messages] == ["Hello", REPLIES[1]]


async def test_undo_gives_the_message_back(data_dir, images):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: bar(screen).attachments, what="the image from the command line")
        await ask(pilot, "First")
        await ask(pilot, "Second")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: len(engine.chat.messages) == 2)
        assert [t.text for t in screen.conversation.turns] == ["First", REPLIES[0]]
        assert prompt(screen).text == "Second"
        await pilot.press("ctrl+a", "ctrl+k")  # clear it, undo again: the image comes back too
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: engine.chat.messages == [])
        assert prompt(screen).text == "First" and [a.name for a in bar(screen).attachments] == ["red square.png"]
        assert not screen.query(UserMessage) and screen.query_one("#welcome").display


async def test_attachments_can_be_removed(data_dir, images):
    app = make_app(FakeEngine(), data_dir=data_dir, images=[images["red"], images["photo"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: len(bar(screen).attachments) == 2)
        await pilot.press("backspace")  # in the empty message box: drops the last one
        await wait_for(pilot, lambda: len(bar(screen).attachments) == 1)
        await pilot.press("shift+tab")
        assert app.focused.attachment.name == "red square.png"
        await pilot.press("delete")
        await wait_for(pilot, lambda: not bar(screen).attachments)
        assert app.focused is prompt(screen)


async def test_save_reopen_and_continue(data_dir, images):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: bar(screen).attachments)
        await ask(pilot, "Remember this picture")
        await pilot.press("ctrl+s")
        saved = screen.conversation.id
        assert any("Saved to" in n for n in notes(app))
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: engine.chat.messages == [])
        assert not screen.query(UserMessage) and screen.conversation.id != saved
        await ask(pilot, "Another chat")

        images["red"].unlink()  # the conversation must not depend on the original file
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        assert app.screen.query_one("#conversation-list").option_count == 2
        await pilot.press("down", "enter")  # newest first: the first chat is second
        await wait_for(pilot, lambda: screen.conversation.id == saved and len(engine.chat.messages) == 2)
        assert [t.text for t in screen.conversation.turns] == ["Remember this picture", REPLIES[0]]
        assert len(screen.query(UserMessage)) == 1 and len(screen.query(ReplyMessage)) == 1
        image = engine.chat.messages[0]["content"][0]["image_url"]["url"]
        assert image.startswith(str(Store(data_dir).images))
        await ask(pilot, "What was it?")
        assert len(engine.chat.messages) == 4 and len(Store(data_dir).load(saved).turns) == 4


async def test_resume_from_the_command_line(data_dir):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await ask(pilot, "Keep me")
        saved = app.chat_screen.conversation.id
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, resume=saved)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one("#status").context_used > 0, what="the restored context")
        assert screen.conversation.id == saved and len(engine.chat.messages) == 2


async def test_export_markdown(data_dir, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_app(FakeEngine(), data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: bar(screen).attachments)
        await ask(pilot, "Describe the image")
        await pilot.press("ctrl+t")
        md = (tmp_path / "describe-the-image.md").read_text()
        stored = Store(data_dir).images / f"{screen.conversation.turns[0].images[0].digest}.png"
        assert md.startswith("# Describe the image\n")
        assert (
            f"## You\n\n![red square.png]({stored.as_uri()})\n\n*red square.png 300×200 → 304×208 · 260 tokens*" in md
        )
        assert "Describe the image\n\n## Pixtral\n\n" + REPLIES[0] in md
        prompt(screen).insert(f"/export {tmp_path / 'named.md'}")
        await pilot.press("enter")
        assert (tmp_path / "named.md").read_text() == md.replace(
            md.split("\n")[2], (tmp_path / "named.md").read_text().split("\n")[2]
        )


async def test_context_overflow_keeps_the_message(data_dir):
    engine = FakeEngine(context_length=30)
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        text = " ".join(["many"] * 40)
        prompt(screen).insert(text)
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.busy and notes(app), what="the error")
        assert notes(app)[-1].startswith(
            "This turn needs 43 more tokens and the conversation would reach 43 of the 30-token context"
        )
        assert prompt(screen).text == text
        assert not screen.conversation.turns and not screen.query(UserMessage)
        assert engine.chat.messages == []


async def test_bad_image_paths_keep_the_message(data_dir, images):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        prompt(screen).insert("/image /no/such/picture.png")
        await pilot.press("enter")
        assert notes(app)[-1] == "/no/such/picture.png: no such file."
        assert prompt(screen).text == "/image /no/such/picture.png"

        prompt(screen).clear()
        prompt(screen).insert("Is this broken?")
        prompt(screen).post_message(events.Paste(f"'{images['broken']}'"))
        await wait_for(pilot, lambda: len(notes(app)) == 2)
        await app.workers.wait_for_complete()
        assert notes(app)[-1] == f"{images['broken']} is not an image file PIL can read."
        assert prompt(screen).text == "Is this broken?" and not bar(screen).attachments

        prompt(screen).post_message(events.Paste(str(images["red"].parent / "nope.png")))  # not a file: plain text
        await pilot.pause()
        assert prompt(screen).text.endswith("nope.png")


async def test_typed_path_attaches_on_enter(data_dir, images):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        prompt(screen).insert(str(images["red"]).replace(" ", "\\ "))  # a drop that arrived as keystrokes
        await pilot.press("enter")
        await wait_for(pilot, lambda: bar(screen).attachments)
        assert not screen.conversation.turns and prompt(screen).text == ""


async def test_engine_error_restores_the_prompt(data_dir):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)

        def broken(content):
            raise RuntimeError("the accelerator caught fire")

        engine.chat.stream = broken
        prompt(screen).insert("Hello?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen.busy and notes(app))
        assert notes(app)[-1] == "RuntimeError: the accelerator caught fire"
        assert prompt(screen).text == "Hello?" and not screen.conversation.turns


async def test_load_failure_is_shown(data_dir):
    app = make_app(
        FakeEngine(fail_load="no-model: no such folder, and it is not a Hugging Face repo id."),
        data_dir=data_dir,
    )
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        assert screen.load_failed
        assert "could not be loaded: no-model: no such folder" in str(screen.query_one("#load-text").render())
        prompt(screen).insert("Hello")
        await pilot.press("enter")
        assert notes(app)[-1].startswith("The model is not loaded (no-model: no such folder")
        assert prompt(screen).text == "Hello"


async def test_help_lists_every_binding(data_dir):
    from pixtral_mlx.tui.app import PixtralChatApp
    from pixtral_mlx.tui.screens.chat import ChatScreen
    from pixtral_mlx.tui.widgets.attachment import Chip
    from pixtral_mlx.tui.widgets.prompt import Prompt

    documented = " ".join(key for key, _ in KEYS).split()
    shown = {"escape": "esc", "question_mark": "?", "f1": "F1"}
    for cls in (PixtralChatApp, ChatScreen, Prompt, Chip):
        for binding in cls.BINDINGS:
            for key in binding.key.split(","):
                assert shown.get(key, key) in documented, f"{cls.__name__}: {key} is not in the help screen"
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("tab", "question_mark")  # `?` opens help when the message box is not focused
        assert isinstance(app.screen, HelpScreen)


@pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")  # textual-image 0.12, Pillow 13
async def test_mouse_and_command_palette(data_dir, images, tmp_path, monkeypatch):
    from pixtral_mlx.tui.screens.preview import PreviewScreen
    from pixtral_mlx.tui.widgets.attachment import Chip

    monkeypatch.chdir(tmp_path)
    app = make_app(FakeEngine(), data_dir=data_dir, images=[images["red"], images["photo"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: len(bar(screen).attachments) == 2)
        chip = screen.query(Chip).first()
        await pilot.click(chip, offset=(3, 0))  # a click on the chip previews it
        assert isinstance(app.screen, PreviewScreen)
        await pilot.press("escape")
        await pilot.click(chip, offset=(chip.size.width - 2, 0))  # a click on ✕ removes it
        await wait_for(pilot, lambda: len(bar(screen).attachments) == 1)
        await ask(pilot, "Hi")
        await pilot.press("ctrl+p")
        await pilot.press(*"Export to Markdown")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: (tmp_path / "hi.md").exists(), what="the export")


async def test_clipboard_paste(data_dir, images, monkeypatch):
    from pixtral_mlx.tui import clipboard
    from pixtral_mlx.tui.widgets import attachment

    def no_image(folder=None):
        raise clipboard.ClipboardError("the clipboard holds no image (copy an image or take a screenshot first).")

    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        monkeypatch.setattr(attachment, "grab_image", no_image)
        await pilot.press("ctrl+v")
        await wait_for(pilot, lambda: notes(app))
        assert notes(app)[-1] == "The clipboard holds no image (copy an image or take a screenshot first)."
        app.copy_to_clipboard("copied text")  # with text on the app's clipboard, ctrl+v pastes it instead
        await pilot.press("ctrl+v")
        await wait_for(pilot, lambda: prompt(screen).text == "copied text")
        monkeypatch.setattr(attachment, "grab_image", lambda folder=None: images["photo"])
        await pilot.press("ctrl+v")
        await wait_for(pilot, lambda: bar(screen).attachments)
        assert bar(screen).attachments[0].tokens == 3136
