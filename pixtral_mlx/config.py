"""Settings every front end shares: generation defaults, image-edge and context-length checks, the bundled
tokenizer. The model's own description (shapes, trained window) is in its `pixtral_mlx.models` module; the
values here that come from it (`MAX_EDGE`, `CONTEXT_LENGTH`) are the default model's (Pixtral-12B), and
`FAMILY_MAX_EDGE` the largest image size of the family (the Mistral3 models' 1540).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models.mistral3.args import VISION_DEFAULTS as MISTRAL3_VISION
from .models.pixtral.args import CONTEXT_LENGTH, VISION_DEFAULTS

__all__ = [
    "CONTEXT_LENGTH",
    "FAMILY_MAX_EDGE",
    "MAX_EDGE",
    "MIN_EDGE",
    "bundled_tekken",
    "check_context_length",
    "check_max_edge",
    "check_model_edge",
]

MIN_CONTEXT = 16  # the smallest context length that holds a prompt and a reply

# Generation defaults, shared by the library, the CLI and the chat app.
DEFAULT_TEMPERATURE = 0.35  # mistral-inference's example for Pixtral; temperature 0 is greedy
DEFAULT_TOP_P = 0.8  # mistral-inference applies top-p 0.8 whenever it samples
DEFAULT_MAX_TOKENS = 512

# `max_edge`: the longest image edge the encoder resizes to, at most the model's vision image_size: 1024 for
# Pixtral-12B (MAX_EDGE, the default model's), 1540 for the Mistral3 models (FAMILY_MAX_EDGE, the family's largest).
# Before a model is loaded a value is checked against the family's largest; the encoder checks the model's own.
MIN_EDGE = 16  # one patch
MAX_EDGE = VISION_DEFAULTS["image_size"]
FAMILY_MAX_EDGE = max(MAX_EDGE, MISTRAL3_VISION["image_size"])


def bundled_tekken() -> Path:
    """The Pixtral tokenizer (tekken v3, `tekken_240911.json`) that ships inside mistral_common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def check_max_edge(value: int | None, limit: int = FAMILY_MAX_EDGE) -> int | None:
    """`value` if it is a usable longest-edge cap up to `limit` (or None); else PromptError with the allowed range.
    The default limit is the family's largest image size: what any model may take, before one is loaded."""
    from .errors import PromptError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_EDGE <= value <= limit:
        raise PromptError(
            f"max edge must be between {MIN_EDGE} and {limit} pixels (a whole number), got {value!r}.", param="max_edge"
        )
    return value


def check_model_edge(value: int | None, image_size: int) -> int | None:
    """`check_max_edge` for a loaded model: a value above its vision image size is refused in words that name it."""
    from .errors import PromptError

    if isinstance(value, int) and not isinstance(value, bool) and value > image_size:
        raise PromptError(
            f"max edge {value} is above this model's image size of {image_size} pixels: use {image_size} or less.",
            param="max_edge",
        )
    return check_max_edge(value, image_size)


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
