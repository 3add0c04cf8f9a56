"""SVG snapshots of the main screens (FakeEngine: fixed replies and statistics; cursor blink off).

Regenerate with `pytest tests/tui/test_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

from chat_fakes import FakeEngine, ask, started, wait_for
from textual import events

from pixtral_mlx.tui import make_app

SIZE = (100, 34)


def test_chat_screen(snap_compare, data_dir, images):
    async def run_before(pilot):
        screen = await started(pilot)
        screen.query_one("#prompt").post_message(events.Paste(f"'{images['red']}'"))
        await wait_for(pilot, lambda: screen.query_one("#attachments").attachments)
        await ask(pilot, "What is in this picture?")
        await ask(pilot, "How wide is it?")
        screen.query_one("#prompt").insert("And its colour?")

    assert snap_compare(make_app(FakeEngine(), data_dir=data_dir), terminal_size=SIZE, run_before=run_before)


def test_attachment_chips(snap_compare, data_dir, images):
    async def run_before(pilot):
        screen = await started(pilot)
        screen.query_one("#prompt").post_message(events.Paste(f"'{images['red']}' '{images['photo']}'"))
        await wait_for(pilot, lambda: len(screen.query_one("#attachments").attachments) == 2)
        screen.query_one("#prompt").insert("Which one is larger?")
        await pilot.pause()

    assert snap_compare(make_app(FakeEngine(), data_dir=data_dir), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, data_dir):
    async def run_before(pilot):
        await started(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(make_app(FakeEngine(), data_dir=data_dir), terminal_size=(110, 44), run_before=run_before)


def test_quit_with_a_draft(snap_compare, data_dir, images):
    async def run_before(pilot):
        screen = await started(pilot)
        screen.query_one("#prompt").post_message(events.Paste(f"'{images['red']}'"))
        await wait_for(pilot, lambda: screen.query_one("#attachments").attachments)
        screen.query_one("#prompt").insert("A question I have not sent")
        await pilot.press("ctrl+q")
        await pilot.pause()

    assert snap_compare(make_app(FakeEngine(), data_dir=data_dir), terminal_size=SIZE, run_before=run_before)


def test_narrow_terminal(snap_compare, data_dir):
    async def run_before(pilot):
        await started(pilot)
        await pilot.pause()

    assert snap_compare(make_app(FakeEngine(), data_dir=data_dir), terminal_size=(30, 8), run_before=run_before)
