"""Messages the engine thread posts to the chat screen (`post_message` is thread-safe)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from pixtral_mlx.turn import Reply


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
    reasoning: str = ""  # a reasoning model's thinking streamed since the last Token (shown collapsed)


@dataclass
class ReplyFinished(Message):
    reply: Reply  # text, finish_reason ("stop", "length" or "interrupted") and mlx-lm's statistics
    context_used: int


@dataclass
class ContextUpdated(Message):
    context_used: int


@dataclass
class MemoryUpdated(Message):
    """The memory plan's figures for the history so far (`MemoryPlan.summary()`)."""

    summary: str


@dataclass
class EngineFailed(Message):
    """A request failed; `expected` errors carry one sentence meant for the user."""

    request: str
    error: str
    expected: bool = True
