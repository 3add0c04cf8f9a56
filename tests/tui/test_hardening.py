"""Failures the chat app must survive: a notice, the app still running, nothing lost or rewritten."""

from __future__ import annotations

from pathlib import Path

import pytest
from chat_fakes import REPLIES, FakeEngine, ask, make_image, notes, started, wait_for

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.app import QuitScreen
from pixtral_mlx.tui.attachments import inspect
from pixtral_mlx.tui.screens.confirm import Confirm
from pixtral_mlx.tui.screens.conversations import ConversationsScreen
from pixtral_mlx.tui.screens.picker import FilePicker
from pixtral_mlx.tui.screens.preview import PreviewScreen
from pixtral_mlx.tui.storage import Conversation, Store, Turn
from pixtral_mlx.tui.widgets.attachment import AttachmentBar, Chip
from pixtral_mlx.tui.widgets.transcript import UserMessage

SIZE = (110, 36)
pytestmark = pytest.mark.filterwarnings("ignore:Image.Image.getdata:DeprecationWarning")  # textual-image 0.12


def text_of(widget) -> str:
    return str(widget.render())


async def previewed(pilot) -> None:
    """Wait for the picker's preview worker (not all workers: the DirectoryTree loader never ends)."""
    await pilot.pause()
    await wait_for(
        pilot, lambda: all(w.is_finished for w in pilot.app.workers if w.group == "picker-preview"), what="preview"
    )


@pytest.fixture
def bad_images(images):
    """Next to the good images: a file that is no image, one cut short, an empty one."""
    folder = images["red"].parent
    whole = make_image(folder / "whole.png", (64, 64), (10, 200, 10)).read_bytes()
    (folder / "cut short.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "whole.png").unlink()
    return folder


# The file picker -------------------------------------------------------------------------------
async def test_picker_previews_broken_images_in_place(data_dir, images, bad_images, monkeypatch):
    monkeypatch.chdir(bad_images)
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await pilot.press("ctrl+f")
        await wait_for(pilot, lambda: isinstance(app.screen, FilePicker))
        picker = app.screen
        tree = picker.query_one("#picker-tree")
        await wait_for(pilot, lambda: tree.last_line >= 4, what="the folder listing")
        seen = {}
        for line in range(tree.last_line + 1):
            tree.cursor_line = line
            await previewed(pilot)
            name = tree.cursor_node.data.path.name
            seen[name] = (text_of(picker.query_one("#picker-info")), picker.query_one("#picker-image").display)
            assert app.screen is picker and app.is_running
        assert seen == {
            "my pictures": ("", False),  # the folder itself: no preview
            "broken.png": ("cannot preview: broken.png is not an image file PIL can read.", False),
            "cut short.png": (seen["cut short.png"][0], False),
            "empty.jpg": ("cannot preview: empty.jpg is not an image file PIL can read.", False),
            "photo.jpg": ("photo.jpg  3024×4032 → 768×1024 · 3,136 tokens", True),
            "red square.png": ("red square.png  300×200 → 304×208 · 260 tokens", True),
        }
        assert seen["cut short.png"][0].startswith("cannot preview: cut short.png is truncated or corrupt (")

        tree.cursor_line = list(seen).index("broken.png")  # enter tries to attach it, which says why it cannot
        await previewed(pilot)
        await pilot.press("enter")
        await wait_for(pilot, lambda: notes(app), what="the notice")
        assert notes(app)[-1] == f"{bad_images / 'broken.png'} is not an image file PIL can read."
        assert app.screen is screen and not screen.query_one(AttachmentBar).attachments


async def test_preview_of_a_damaged_stored_image_says_why(data_dir, images):
    app = make_app(FakeEngine(), data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one(AttachmentBar).attachments)
        images["red"].write_bytes(b"overwritten")  # the file changed after it was attached
        await pilot.pause()  # the chip laid out
        await pilot.click(screen.query(Chip).first(), offset=(3, 0))
        await wait_for(pilot, lambda: isinstance(app.screen, PreviewScreen))
        message = text_of(app.screen.query_one("#preview-image"))
        assert message == "cannot preview: red square.png is not an image file PIL can read."
        await pilot.press("escape")
        assert app.screen is screen and app.is_running
        images["red"].unlink()
        await pilot.click(screen.query(Chip).first(), offset=(3, 0))
        await wait_for(pilot, lambda: isinstance(app.screen, PreviewScreen))
        assert text_of(app.screen.query_one("#preview-image")) == "cannot preview: red square.png: no such file."


# Save and export when the data folder cannot be written ----------------------------------------
# The tests run as root, which writes through any permission bits; a regular file where a folder
# is expected fails for root too (NotADirectoryError / FileExistsError).
async def test_save_and_export_failures_are_notices(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data_dir.mkdir()
    blocker = data_dir / "conversations"
    blocker.write_bytes(b"a file where the conversations folder belongs")
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await ask(pilot, "Keep this")  # the autosave after the reply fails: a notice
        assert notes(app)[-1].startswith(f"The conversation could not be saved in {data_dir} (File exists: {blocker}")
        n = len(notes(app))
        await pilot.press("ctrl+s")
        assert notes(app)[n:] == [notes(app)[-1]] and "could not be saved" in notes(app)[-1]
        await pilot.press("ctrl+t")  # the save fails, the export (to the current folder) still works
        assert "could not be saved" in notes(app)[-2] and notes(app)[-1] == f"Exported to {tmp_path / 'keep-this.md'}"
        assert (tmp_path / "keep-this.md").read_text().startswith("# Keep this\n")
        prompt = screen.query_one("#prompt")
        prompt.insert(f"/export {blocker}/inside.md")  # a destination under a regular file
        await pilot.press("enter")
        assert notes(app)[-1] == f"{blocker}/inside.md cannot be written (Not a directory: {blocker}/inside.md)."
        await ask(pilot, "Still working?")
        assert app.is_running and len(screen.conversation.turns) == 4
    assert blocker.read_bytes() == b"a file where the conversations folder belongs"


async def test_save_fails_when_the_data_folder_is_a_file(tmp_path, monkeypatch, images):
    data = tmp_path / "data"
    data.write_bytes(b"not a folder")
    monkeypatch.setenv("PIXTRAL_MLX_DATA", str(data))
    app = make_app(FakeEngine(), data_dir=data, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one(AttachmentBar).attachments)
        screen.query_one("#prompt").insert("With a picture")
        await pilot.press("enter")  # the image cannot be stored: the message stays in the box
        assert notes(app)[-1].startswith(f"The image could not be copied into {data / 'images'}")
        assert screen.query_one("#prompt").text == "With a picture" and not screen.conversation.turns
        await screen.query_one(AttachmentBar).clear()
        await ask(pilot, "Without one")
        await pilot.press("ctrl+s")
        assert notes(app)[-1].startswith(f"The conversation could not be saved in {data} (")
        await pilot.press("ctrl+o")  # listing a folder that is a file: an empty list, no crash
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        assert app.screen.query_one("#conversation-list").option_count == 0
    assert data.read_bytes() == b"not a folder"


# Quit with a draft ------------------------------------------------------------------------------
async def test_quit_without_a_draft_is_immediate(data_dir):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await started(pilot)
        await ask(pilot, "Sent, so not a draft")
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert app._exit and not isinstance(app.screen, QuitScreen)


@pytest.mark.parametrize("how", ["stay", "escape", "quit", "ctrl+q twice"])
async def test_quit_with_a_text_draft_asks(how, data_dir):
    app = make_app(FakeEngine(), data_dir=data_dir)
    draft = "A long message I have not sent yet,\nwith two lines"
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        screen.query_one("#prompt").insert(draft)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen), what="the question")
        question = text_of(app.screen.query_one("#confirm-question"))
        assert question == "The message box holds a message of 11 words that you have not sent. Quitting discards it."
        assert app.focused.id == "no"  # enter meant for the message box keeps the draft
        if how == "stay":
            await pilot.press("enter")
        elif how == "escape":
            await pilot.press("escape")
        elif how == "quit":
            await pilot.click("#yes")
        else:
            await pilot.press("ctrl+q")
        await pilot.pause()
        if how in ("stay", "escape"):
            assert not app._exit and app.screen is screen
            assert screen.query_one("#prompt").text == draft
        else:
            assert app._exit


async def test_quit_with_attachments_asks(data_dir, images):
    app = make_app(FakeEngine(), data_dir=data_dir, images=[images["red"], images["photo"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: len(screen.query_one(AttachmentBar).attachments) == 2)
        screen.query_one("#prompt").insert("/quit")  # the command asks too
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, QuitScreen))
        assert "holds 2 images that you have not sent" in text_of(app.screen.query_one("#confirm-question"))
        await pilot.press("right", "enter")  # right moves from "Stay" to "Quit"
        await pilot.pause()
        assert app._exit


# A resumed chat whose stored image is gone -----------------------------------------------------
def _saved_with_image(data_dir, images) -> tuple[Store, Conversation, Path]:
    store = Store(data_dir)
    conv = Conversation(
        turns=[Turn("user", "What is it?", [store.store_image(inspect(images["red"]))]), Turn("assistant", "Red.")]
    )
    path = store.save(conv)
    conv.turns[0].images[0].path.unlink()
    return store, conv, path


async def test_resume_with_a_missing_image_can_go_on_without_it(data_dir, images):
    store, conv, path = _saved_with_image(data_dir, images)
    raw = path.read_bytes()
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, resume=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the question")
        question = text_of(app.screen.query_one("#confirm-question"))
        assert question.startswith(f"1 image of “What is it?” is missing from {store.images}: red square.png.")
        assert "Go on without it? The chat will say [image missing: red square.png] where it was." in question
        await pilot.press("enter")  # "Don't open": the focused, safe answer
        await wait_for(pilot, lambda: app.screen is screen)
        assert screen.conversation.id != conv.id and engine.chat.messages == []
        assert notes(app)[-1] == "“What is it?” was not opened; its file was left as it is."
        assert path.read_bytes() == raw

        screen.open_conversation(conv.id)  # again, and this time go on
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
        await pilot.click("#yes")
        await wait_for(pilot, lambda: screen.conversation.id == conv.id and len(engine.chat.messages) == 2)
        first = engine.chat.messages[0]
        assert first == {"role": "user", "content": "[image missing: red square.png]\nWhat is it?"}
        assert "[image missing: red square.png]" in text_of(screen.query(UserMessage).first().query_one(".text"))
        await ask(pilot, "Go on")
        assert screen.conversation.turns[-1].text == REPLIES[0] and len(engine.chat.messages) == 4
    saved = Store(data_dir).load(conv.id)
    assert saved.turns[0].text == "[image missing: red square.png]\nWhat is it?" and not saved.turns[0].images


async def test_an_image_deleted_during_the_chat_is_offered_at_send(data_dir, images):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one(AttachmentBar).attachments)
        await ask(pilot, "Look")
        screen.conversation.turns[0].images[0].path.unlink()  # the stored copy is deleted behind our back
        screen.query_one("#prompt").insert("And now?")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
        await pilot.press("escape")  # cancel: nothing sent, the message stays
        await pilot.pause()
        assert screen.query_one("#prompt").text == "And now?" and len(screen.conversation.turns) == 2
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
        await pilot.click("#yes")
        await wait_for(pilot, lambda: not screen.busy and len(screen.conversation.turns) == 4, what="the reply")
        assert engine.chat.messages[0]["content"] == "[image missing: red square.png]\nLook"
        assert engine.chat.messages[2]["content"] == "And now?"
        await pilot.press("ctrl+r")  # nothing is missing now: regenerate runs at once
        await wait_for(pilot, lambda: not screen.busy and screen.conversation.turns[-1].text == REPLIES[2])


async def test_regenerate_offers_it_too(data_dir, images):
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, images=[images["red"]])
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one(AttachmentBar).attachments)
        await ask(pilot, "Look")
        screen.conversation.turns[0].images[0].path.unlink()
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm))
        await pilot.click("#yes")
        await wait_for(pilot, lambda: not screen.busy and screen.conversation.turns[-1].text == REPLIES[1])
        assert engine.chat.messages[0]["content"] == "[image missing: red square.png]\nLook"


# Small terminals ------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [30, 31, 40, 60])
async def test_footer_has_no_stray_character(width, data_dir):
    app = make_app(FakeEngine(), data_dir=data_dir)
    async with app.run_test(size=(width, 8)) as pilot:
        await started(pilot)

        def footer() -> str:
            return app.screen._compositor.render_strips()[-1].text

        # The last cell is the palette key's padding (the keys scrolled beneath showed through it).
        # Waited for: while the model loads, the screen overflows 8 rows and shows a scrollbar there.
        await wait_for(pilot, lambda: footer().endswith("▏^p palette "), what="a footer ending in the palette key")
