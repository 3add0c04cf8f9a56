"""Slash commands typed in the message box: `/image PATH…`, `/new`, `/open`, …"""

from __future__ import annotations

import re

COMMANDS: dict[str, tuple[str, str]] = {
    "image": ("PATH…", "attach images (quotes, escaped spaces, ~ and file:// work)"),
    "paste": ("", "attach the image on the clipboard"),
    "new": ("", "start a new chat"),
    "open": ("", "open a saved conversation"),
    "save": ("", "save the conversation (replies are also saved as they finish)"),
    "export": ("[FILE]", "export the conversation to Markdown (default: ./TITLE.md)"),
    "regen": ("", "regenerate the last reply"),
    "undo": ("", "undo the last turn; its text comes back to the message box"),
    "help": ("", "list keys and commands"),
    "quit": ("", "quit"),
}
ALIASES = {
    "img": "image",
    "attach": "image",
    "regenerate": "regen",
    "exit": "quit",
    "clear": "new",
    "q": "quit",
}
_COMMAND = re.compile(r"^/([a-z]+)(?:\s+(.*))?$", re.DOTALL)


def parse(text: str) -> tuple[str, str] | None:
    """("name", "argument") for a slash command; None for a normal message (such as "/usr/bin is…").

    An unknown `/word` comes back as ("?word", "") so the caller can say so instead of sending it.
    """
    m = _COMMAND.match(text.strip())
    if not m:
        return None
    name, arg = m.group(1), (m.group(2) or "").strip()
    name = ALIASES.get(name, name)
    return (name, arg) if name in COMMANDS else ("?" + name, arg)
