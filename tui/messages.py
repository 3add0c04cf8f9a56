"""Messages the engine thread posts to the chat screen (`post_message` is thread-safe)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


def sentence(error: str) -> str:
    """Library errors are sentences without the capital; a leading file name keeps its case."""
    first = error.split(" ", 1)[0]
    return error[:1].upper() + error[1:] if first.isalpha() else error


@dataclass
class ModelLoading(Message):
    text: str


@dataclass
class ModelLoaded(Message):
    name: str
    seconds: float


@dataclass
class LoadFailed(Message):
    error: str


@dataclass
class ReplyStarted(Message):
    pass


@dataclass
class Token(Message):
    text: str


@dataclass
class ReplyFinished(Message):
    text: str
    finish_reason: str  # "stop", "length" or "interrupted"
    prompt_tokens: int  # tokens prefilled this turn (the cached prefix is not counted)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    context_used: int


@dataclass
class ContextUpdated(Message):
    context_used: int


@dataclass
class EngineFailed(Message):
    """A request failed; `expected` errors carry one sentence meant for the user."""

    request: str
    error: str
    expected: bool = True
