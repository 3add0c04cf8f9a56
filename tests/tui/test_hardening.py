"""Failures the chat app must survive: a notice, the app still running, nothing lost or rewritten."""

from __future__ import annotations

import pytest
from chat_fakes import FakeEngine, make_image, notes, started, wait_for

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.screens.picker import FilePicker
from pixtral_mlx.tui.screens.preview import PreviewScreen
from pixtral_mlx.tui.widgets.attachment import AttachmentBar, Chip

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
