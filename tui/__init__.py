"""pixtral-mlx chat: a Textual terminal chat you drop images into (installed as pixtral_mlx.tui).

The app is imported lazily: `pixtral-mlx chat --help` neither starts Textual nor probes the
terminal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import PixtralChatApp, make_app

__all__ = ["PixtralChatApp", "make_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
