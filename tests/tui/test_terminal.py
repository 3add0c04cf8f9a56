"""The real `pixtral-mlx chat` in a real terminal (tmux): load, paste an image path, ask, quit."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_for(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pane = screen(session)
        if text in pane:
            return pane
        if "Traceback" in pane:
            break
        time.sleep(0.25)
    raise AssertionError(f"{text!r} did not show within {timeout}s; the terminal shows:\n{screen(session)}")


def test_chat_in_tmux(mlx_dir, data_dir, images, tmp_path):
    session = f"pixtral-test-{uuid.uuid4().hex[:8]}"
    chat = [
        sys.executable,
        "-m",
        "pixtral_mlx",
        "chat",
        "--model",
        str(mlx_dir),
        "--temp",
        "0",
        "--max-tokens",
        "8",
    ]
    command = (
        f"cd {shlex.quote(str(tmp_path))} && PIXTRAL_MLX_DATA={shlex.quote(str(data_dir))} "
        f"{shlex.join(chat)}; echo EXIT=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
    try:
        wait_for(session, "ready", timeout=90)
        # A drop arrives as a bracketed paste of the (escaped) path.
        tmux("set-buffer", "-b", session, str(images["red"]).replace(" ", "\\ "))
        tmux("paste-buffer", "-p", "-d", "-b", session, "-t", session)
        wait_for(session, "red square.png 300×200 → 304×208 · 260 tokens ✕", timeout=20)
        tmux("send-keys", "-t", session, "-l", "What is in this image?")
        tmux("send-keys", "-t", session, "Enter")
        pane = wait_for(session, "tok/s · prompt", timeout=60)  # the statistics under a finished reply
        assert "What is in this image?" in pane
        tmux("send-keys", "-t", session, "C-q")
        pane = wait_for(session, "EXIT=", timeout=30)
        assert "EXIT=0" in pane and "Traceback" not in pane
        assert list((data_dir / "conversations").glob("*.json"))  # the finished reply was saved
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)


def test_broken_files_in_tmux(mlx_dir, data_dir, images, tmp_path):
    """Resume a chat whose image is gone, preview a broken file, quit with a draft."""
    from pixtral_mlx.tui.attachments import inspect
    from pixtral_mlx.tui.storage import Conversation, Store, Turn

    store = Store(data_dir)
    red = store.store_image(inspect(images["red"]))
    conv = Conversation(turns=[Turn("user", "Look", [red]), Turn("assistant", "Red.")])
    store.save(conv)
    red.path.unlink()  # the stored copy is gone: every turn used to fail
    damaged = store.conversations / "20990101-000000-dead.json"
    damaged.write_text('{"format": "pixtral-mlx.conversation", "id": "20990101-000000-dead", "messages": 5}')
    raw = damaged.read_bytes()

    session = f"pixtral-test-{uuid.uuid4().hex[:8]}"
    chat = [sys.executable, "-m", "pixtral_mlx", "chat", "--model", str(mlx_dir), "--max-tokens", "4", "--resume"]
    command = (
        f"cd {shlex.quote(str(images['red'].parent))} && PIXTRAL_MLX_DATA={shlex.quote(str(data_dir))} "
        f"{shlex.join(chat)}; echo EXIT=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        pane = wait_for(session, "Go on without it", timeout=60)  # --resume: the newest good one
        assert "missing from" in pane and "red square.png" in pane
        tmux("send-keys", "-t", session, "Left", "Enter")  # from "Don't open" to "Go on without it", at once
        wait_for(session, "▌ [image missing: red square.png]", timeout=20)  # in the transcript, not the question
        wait_for(session, "ready", timeout=90)
        tmux("send-keys", "-t", session, "-l", "Go on")
        tmux("send-keys", "-t", session, "Enter")
        wait_for(session, "tok/s · prompt", timeout=60)  # the real library answered: sends work again

        tmux("send-keys", "-t", session, "C-f")
        wait_for(session, "Attach an image", timeout=10)
        tmux("send-keys", "-t", session, "Down")  # the folder, then broken.png
        pane = wait_for(session, "cannot preview: broken.png", timeout=10)
        assert "PIL can read." in pane  # the rest of the sentence, wrapped in the side panel
        tmux("send-keys", "-t", session, "Escape")
        time.sleep(1)  # a lone esc is told from an escape sequence by a pause

        tmux("send-keys", "-t", session, "-l", "An unsent draft")
        wait_for(session, "An unsent draft", timeout=10)
        tmux("send-keys", "-t", session, "C-q")
        wait_for(session, "Quitting discards it.", timeout=10)
        tmux("send-keys", "-t", session, "Enter")  # "Stay" has the focus
        time.sleep(1)
        assert "An unsent draft" in screen(session) and "EXIT=" not in screen(session)

        tmux("send-keys", "-t", session, "C-q")
        wait_for(session, "Quit", timeout=10)
        tmux("send-keys", "-t", session, "C-q")  # ctrl+q again quits
        pane = wait_for(session, "EXIT=", timeout=30)
        assert "EXIT=0" in pane and "Traceback" not in pane
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    assert damaged.read_bytes() == raw
    assert store.load(conv.id).turns[0].text == "[image missing: red square.png]\nLook"
