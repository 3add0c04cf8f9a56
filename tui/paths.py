"""Image paths in pasted or dropped text.

Terminals deliver a dropped file as a paste (or as typed keys) of its path, each in its own dialect:
backslash-escaped spaces (macOS Terminal, iTerm2, Ghostty), single quotes (GNOME, Konsole),
`file://` URLs one per line (kitty, some file managers), a trailing space or newline. A paste counts
as attachments only when *all* of it names existing files; anything else stays text.
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# macOS screenshot names hold a narrow no-break space before AM/PM; typed paths have a plain space.
_CLOCK_SPACE = re.compile(r" (?=[AP]M\b)")
_ODD_SPACES = re.compile("[\u00a0\u2007\u202f]")


@dataclass
class Pasted:
    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # existing files that are not images

    def __bool__(self) -> bool:
        return bool(self.images or self.others)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def to_path(token: str) -> Path | None:
    """An existing file named by one token (a path, `~/…` or a file:// URL), else None."""
    token = token.strip()
    if not token:
        return None
    if token.lower().startswith("file://"):
        url = urllib.parse.urlparse(token)
        if url.netloc not in ("", "localhost"):
            return None
        token = urllib.parse.unquote(url.path)
    for candidate in (token, _CLOCK_SPACE.sub("\u202f", token), _ODD_SPACES.sub(" ", token)):
        path = Path(candidate).expanduser()
        try:
            if path.is_file():
                return path.resolve()
        except (OSError, ValueError):  # names too long, NUL bytes
            return None
    return None


def _path_like(word: str) -> bool:
    """Bare names such as `README.md` in the current folder stay text; images count anyway."""
    word = word.strip()
    return "/" in word or word.startswith("~") or word.lower().startswith("file:")


def _shell_words(text: str) -> list[str] | None:
    try:
        lexer = shlex.shlex(text, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        return list(lexer)
    except ValueError:  # unbalanced quotes: prose, not paths
        return None


def parse_paste(text: str) -> Pasted:
    """The files named by `text` if it is nothing but file names; an empty result otherwise."""
    text = text.strip()
    if not text or len(text) > 16_384:
        return Pasted()
    # One path as is (unescaped spaces, apostrophes), then one per line, then shell words.
    splits = [[text], text.splitlines(), _shell_words(text) or []]
    for words in splits:
        words = [w for w in words if w.strip()]
        paths = [to_path(w) for w in words]
        if words and all(paths) and all(_path_like(w) or is_image(p) for w, p in zip(words, paths, strict=True)):
            out = Pasted()
            for p in paths:
                assert p is not None
                (out.images if is_image(p) else out.others).append(p)
            return out
    return Pasted()
