"""Read an image from the system clipboard into a PNG file.

Terminals paste only text, so the image is fetched with the platform's own tools: `pngpaste` or
`osascript` on macOS, `wl-paste` on Wayland, `xclip` on X11. Every failure is a `ClipboardError`
with one sentence that says what to install or do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT = 5


class ClipboardError(RuntimeError):
    """No image could be read from the clipboard; the message says why."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClipboardError(f"{cmd[0]} failed ({e}).") from e


def _macos(dest: Path) -> None:
    if shutil.which("pngpaste"):
        if _run(["pngpaste", str(dest)]).returncode == 0 and dest.stat().st_size:
            return
        raise ClipboardError("the clipboard holds no image (copy one, or take a screenshot with ctrl+shift+cmd+4).")
    script = [
        "-e",
        "set png to (the clipboard as «class PNGf»)",
        "-e",
        f'set f to open for access (POSIX file "{dest}") with write permission',
        "-e",
        "write png to f",
        "-e",
        "close access f",
    ]
    if _run(["osascript", *script]).returncode != 0 or not dest.exists() or not dest.stat().st_size:
        raise ClipboardError("the clipboard holds no image (copy one, or take a screenshot with ctrl+shift+cmd+4).")


def _linux(dest: Path) -> None:
    if os.environ.get("WAYLAND_DISPLAY") and shutil.which("wl-paste"):
        types = _run(["wl-paste", "--list-types"]).stdout.decode(errors="replace").split()
        cmd = ["wl-paste", "--no-newline", "--type", "image/png"]
    elif os.environ.get("DISPLAY") and shutil.which("xclip"):
        types = (
            _run(["xclip", "-selection", "clipboard", "-t", "TARGETS", "-o"]).stdout.decode(errors="replace").split()
        )
        cmd = ["xclip", "-selection", "clipboard", "-t", "image/png", "-o"]
    elif not (os.environ.get("WAYLAND_DISPLAY") or os.environ.get("DISPLAY")):
        raise ClipboardError(
            "no clipboard is reachable from this terminal (no display; over SSH?); "
            "attach the file by path or with ctrl+f instead."
        )
    else:
        raise ClipboardError(
            "pasting images needs wl-clipboard (Wayland) or xclip (X11); "
            "install one, or attach the file by path or with ctrl+f."
        )
    if "image/png" not in types:
        raise ClipboardError("the clipboard holds no image (copy an image or take a screenshot first).")
    out = _run(cmd)
    if out.returncode != 0 or not out.stdout:
        raise ClipboardError("the clipboard image could not be read.")
    dest.write_bytes(out.stdout)


def grab_image(folder: Path | None = None) -> Path:
    """Write the clipboard image to a new PNG in `folder` (default: a temp folder); return it."""
    folder = Path(folder or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="clipboard-", suffix=".png", dir=folder)
    os.close(fd)
    dest = Path(name)
    try:
        if sys.platform == "darwin":
            _macos(dest)
        elif sys.platform.startswith("linux") or "bsd" in sys.platform:
            _linux(dest)
        else:
            raise ClipboardError(f"pasting images is not supported on {sys.platform}; attach the file instead.")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest
