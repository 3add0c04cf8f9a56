"""Settings every front end shares: generation defaults, image-edge and context-length checks, the bundled
tokenizer. The model's own description (shapes, trained window) is in its `pixtral_mlx.models` module; the
values here that come from it (`MAX_EDGE`, `CONTEXT_LENGTH`) are the default model's (Pixtral-12B).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models.pixtral.args import CONTEXT_LENGTH, VISION_DEFAULTS

__all__ = ["CONTEXT_LENGTH", "MAX_EDGE", "MIN_EDGE", "bundled_tekken", "check_context_length", "check_max_edge"]

MIN_CONTEXT = 16  # the smallest context length that holds a prompt and a reply

# Generation defaults, shared by the library, the CLI and the chat app.
DEFAULT_TEMPERATURE = 0.35  # mistral-inference's example for Pixtral; temperature 0 is greedy
DEFAULT_TOP_P = 0.8  # mistral-inference applies top-p 0.8 whenever it samples
DEFAULT_MAX_TOKENS = 512

# `max_edge`: the longest image edge the encoder resizes to. Pixtral-12B's limit is its vision image_size.
MIN_EDGE = 16  # one patch
MAX_EDGE = VISION_DEFAULTS["image_size"]


def bundled_tekken() -> Path:
    """The Pixtral tokenizer (tekken v3, `tekken_240911.json`) that ships inside mistral_common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def check_max_edge(value: int | None, limit: int = MAX_EDGE) -> int | None:
    """`value` if it is a usable longest-edge cap (or None); else PromptError with the allowed range."""
    from .errors import PromptError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_EDGE <= value <= limit:
        raise PromptError(
            f"max edge must be between {MIN_EDGE} and {limit} pixels (a whole number), got {value!r}.", param="max_edge"
        )
    return value


def check_context_length(value: Any, trained: int | None = None) -> tuple[int | None, str | None]:
    """(the context limit to use, a warning or None) for a requested `value` (None: the trained window).

    Lower than the trained window is always fine; higher is allowed with a warning, since the model was
    never trained on positions past it. Without `trained` (no model loaded yet) only the value is checked."""
    from .errors import ConfigError

    if value is None:
        return trained, None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_CONTEXT:
        raise ConfigError(
            f"context length must be a whole number of at least {MIN_CONTEXT} tokens, got {value!r}.",
            param="context_length",
        )
    if trained is not None and value > trained:
        return value, (
            f"the context length {value:,} is above the {trained:,} tokens this model was trained on; "
            "replies past that point may degrade."
        )
    return value, None
