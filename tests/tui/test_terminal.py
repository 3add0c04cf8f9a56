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
