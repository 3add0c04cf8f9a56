"""The errors pixtral-mlx raises for its users: each carries one sentence meant to be shown as is.

Every surface (CLI, chat app, server, captioner) catches `PixtralError` and prints its message; any
other exception is a bug. The base derives from `ValueError` so callers that caught the old
per-module errors as `ValueError` keep working.
"""

from __future__ import annotations


class PixtralError(ValueError):
    """A problem with the user's input, files or environment, described in one sentence.

    `param` names the offending argument or request field when there is one (the server reports it).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ImageError(PixtralError):
    """An image that cannot be used."""


class PromptError(PixtralError):
    """Messages (or generation options) that cannot be encoded or used."""


class ContextError(PixtralError):
    """A prompt that does not fit the model's context."""


class ModelError(PixtralError):
    """A model that cannot be found or loaded."""


class ConversionError(PixtralError):
    """A checkpoint source or conversion output problem."""


class ConfigError(PixtralError):
    """A model configuration (config.json / params.json) that does not describe a usable Pixtral."""


class MemoryPlanError(PixtralError):
    """A turn whose estimated memory exceeds what the machine has (refused before any work)."""


class ContextLengthWarning(UserWarning):
    """A context length set above the window the model was trained on (allowed, but replies may degrade)."""


def first_line(reason: object) -> str:
    """The first line of an exception's (or any object's) text, to quote inside one sentence; else its type's name."""
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else type(reason).__name__
