"""A reasoning model's thinking, kept apart from its answer.

Magistral Small 2509 and Ministral 3 Reasoning (tekken v13 and later) write their thinking between the control
tokens `[THINK]` and `[/THINK]`, before the answer (/work/shared/FAMILY.md §5.2). The split happens on token ids,
in the one decode loop (`generate._decode`, under `stream_tokens`, `stream_batch` and the server's continuous
batching): `Splitter` routes each token's text to the chunk's `reasoning` or its `text` (the answer). The ids come
from the tokenizer file; a tokenizer without them (Pixtral-12B's v3 tekken) splits nothing.

Where the thinking goes from there: stop strings, tool-call parsing and the JSON of structured output look at the
answer only (`answer_tokens`; `optional_think` lets a grammar accept a free `[THINK]…[/THINK]` prefix), and a
conversation feeds back each earlier assistant turn as its answer alone (what the model cards recommend), so the
thinking never re-enters the prompt: mistral_common 1.13 would encode an assistant message's `ThinkChunk` back as
`[THINK]…[/THINK]` before the text, but the OpenAI messages we build carry only `content` (a client's
`reasoning_content`, Ollama's `thinking` and Responses' `reasoning` items are ignored). No MLX at import.
"""

from __future__ import annotations

from typing import Any

BEGIN, END = "[THINK]", "[/THINK]"


def think_ids(tekken: Any) -> tuple[int, int] | None:
    """The ids of `[THINK]` and `[/THINK]` in this tokenizer (mistral_common's `Tekkenizer`), or None where it
    lacks either (every tokenizer before v13, and v13 files of models that do not reason)."""
    get = getattr(tekken, "get_special_token", None)
    if get is None:
        return None
    try:
        ids = int(get(BEGIN)), int(get(END))
        # tekken raises ValueError for a token it lacks; SentencePiece (Pixtral-Large) answers <unk>'s id instead
        if [tekken.id_to_piece(i) for i in ids] != [BEGIN, END]:
            return None
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return ids


def thinks(tekken: Any) -> bool:
    """Whether a model with this tokenizer can think (its file has `[THINK]` and `[/THINK]`)."""
    return think_ids(tekken) is not None


class Splitter:
    """A streaming detokenizer (`prompt.StreamingDetokenizer`) whose text goes two ways: `add(token)` returns
    `(reasoning, answer)`, the text this token adds to each. `[THINK]` opens the thinking and `[/THINK]` closes
    it (both show no text; the bytes of a character cut by them are flushed to the side they end); with no ids
    every text is answer."""

    def __init__(self, detokenizer: Any, ids: tuple[int, int] | None):
        self.detokenizer = detokenizer
        self.begin, self.end = ids if ids is not None else (None, None)
        self.thinking = False

    @classmethod
    def of(cls, detokenizer: Any) -> Splitter:
        """The splitter of a detokenizer, with the ids of the tokenizer it decodes for."""
        return cls(detokenizer, think_ids(getattr(detokenizer, "tekken", None)))

    def _route(self, text: str) -> tuple[str, str]:
        return (text, "") if self.thinking else ("", text)

    def add(self, token: int) -> tuple[str, str]:
        if token == self.begin and not self.thinking or token == self.end and self.thinking:
            out = self._route(self.detokenizer.flush())
            self.thinking = not self.thinking
            return out
        return self._route(self.detokenizer.add(token))

    def flush(self) -> tuple[str, str]:
        return self._route(self.detokenizer.flush())


def split_tokens(tokens: list[int], ids: tuple[int, int] | None) -> tuple[list[int], list[int]]:
    """(the thinking's tokens, the answer's tokens) of a reply's ids, the `[THINK]`/`[/THINK]` tokens in
    neither: what `Splitter` does to the text, on ids."""
    if ids is None:
        return [], list(tokens)
    begin, end = ids
    thought: list[int] = []
    answer: list[int] = []
    thinking = False
    for t in tokens:
        if t == begin and not thinking or t == end and thinking:
            thinking = not thinking
        else:
            (thought if thinking else answer).append(t)
    return thought, answer


def answer_tokens(tekken: Any, tokens: list[int]) -> list[int]:
    """A reply's ids without its thinking (for tool-call parsing, which reads the answer only)."""
    return split_tokens(tokens, think_ids(tekken))[1]


def optional_think(grammar: str, ids: tuple[int, int] | None) -> str:
    """A Lark grammar (llguidance's dialect) whose `start` rule may be preceded by a thinking section
    `[THINK] free text [/THINK]` (and up to 8 whitespace characters after it): the constraint leaves the
    thinking free and applies to the answer. Unchanged without think ids."""
    if ids is None:
        return grammar
    begin, end = ids
    lines = grammar.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("start:"):
            lines[i] = "answer:" + line[len("start:") :]
            break
    else:
        raise RuntimeError("the grammar has no start rule")  # a bug of ours or an upstream change, never input
    head = [
        "start: (reasoning THINK_WS?)? answer",
        f"reasoning: <[{begin}]> THOUGHT? <[{end}]>",
        r"THOUGHT: /(.|\n)+/",
        r"THINK_WS: /[ \t\r\n]{1,8}/",
    ]
    return "\n".join(head + lines)
