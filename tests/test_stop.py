"""Stop strings: part of the one turn path (`Options.stop`, `_decode`), never shown, split across tokens or not."""

from __future__ import annotations

import pytest

from pixtral_mlx.errors import PromptError
from pixtral_mlx.generate import _decode, split_stop
from pixtral_mlx.turn import Options, collect

PIECES = {5: "Hel", 6: "lo ", 7: "wor", 8: "ld", 9: "!", 10: " ok"}


class PieceDetok:
    def add(self, token):
        return PIECES[token]

    def flush(self):
        return ""


def run(tokens, stop, max_tokens=10):
    steps = iter([(t, None) for t in tokens])
    return list(_decode(steps, PieceDetok(), 3, max_tokens, eos_id=2, tic=0.0, stop=stop))


def test_split_stop():
    assert split_stop("Hello wor", ("o w",)) == ("Hell", "", True)
    assert split_stop("Hello", ("o w",)) == ("Hell", "o", False)  # could still become "o w"
    assert split_stop("Hello ", ("o w", "xyz")) == ("Hell", "o ", False)
    assert split_stop("Hello", ("xyz",)) == ("Hello", "", False)
    assert split_stop("abcab", ("cab", "b")) == ("a", "", True)  # the earliest stop string wins
    assert split_stop("anything", ()) == ("anything", "", False)


def test_stop_string_across_tokens_is_cut_and_never_shown():
    chunks = run([5, 6, 7, 8, 2], stop=("o w",))
    assert [c.text for c in chunks] == ["Hel", "l", ""]  # "lo " is held back, then the stop appears in "wor"
    assert [c.token for c in chunks] == [5, 6, 7]  # the token that completed the stop is the last one
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert chunks[-1].generation_tokens == 3


def test_held_back_text_that_never_becomes_a_stop_is_released():
    chunks = run([5, 6, 8, 9], stop=("o w",))
    assert "".join(c.text for c in chunks) == "Hello ld!" and [c.text for c in chunks] == ["Hel", "l", "o ld", "!", ""]
    assert chunks[-1].finish_reason == "length" and chunks[-1].token is None  # steps ran out before max_tokens

    at_eos = run([5, 6, 2], stop=("o w",))  # text held back when the reply ends is shown then
    assert [c.text for c in at_eos] == ["Hel", "l", "o "] and at_eos[-1].finish_reason == "stop"
    assert at_eos[-1].token is None  # ended by the end-of-sequence token

    at_length = run([5, 6, 7, 8], stop=("o wx",), max_tokens=3)
    assert "".join(c.text for c in at_length) == "Hello wor" and at_length[-1].finish_reason == "length"
    assert at_length[-1].token == 7


def test_stop_in_the_first_token_and_several_stops():
    chunks = run([5, 6, 7], stop=("!", "He"))
    assert [(c.text, c.token, c.finish_reason) for c in chunks] == [("", 5, "stop")]
    chunks = run([5, 6, 7, 8, 9, 10], stop=("ld", "!"))
    assert "".join(c.text for c in chunks) == "Hello wor" and chunks[-1].token == 8


def test_options_stop_validation():
    assert Options(stop="x").stop == ("x",)
    assert Options(stop=["a", "b"]).stop == ("a", "b") and Options().stop == ()
    assert Options(stop=("a",)).merge(stop=None).stop == ("a",)
    for bad in ("", [""], ["a", 3], ["a", "b", "c", "d", "e"], 7):
        with pytest.raises(PromptError) as e:
            Options(stop=bad)
        assert e.value.param == "stop"


def test_stop_through_the_model_equals_the_cut_reply(pixtral):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = pixtral.generate(messages, temperature=0.0, max_tokens=12)
    assert len(full.text) > 6
    stop = full.text[3:6]  # a piece from the middle, wherever the token boundaries are
    cut = full.text[: full.text.find(stop)]
    chunks = list(pixtral.stream(messages, temperature=0.0, max_tokens=12, stop=[stop, "\x00never"]))
    assert "".join(c.text for c in chunks) == cut
    assert chunks[-1].finish_reason == "stop" and stop not in "".join(c.text for c in chunks)
    reply = collect(iter(chunks))
    assert reply.tokens == full.tokens[: len(reply.tokens)]  # the same tokens, up to the one that made the stop
    assert pixtral.encoder.decode(reply.tokens).find(stop) >= 0


def test_chat_with_stop_keeps_the_cache_consistent(pixtral):
    chat = pixtral.chat(temperature=0.0, max_tokens=12)
    full = pixtral.generate([{"role": "user", "content": "Hi."}], temperature=0.0, max_tokens=12)
    stop = full.text[2:4]
    first = chat.send("Hi.", stop=stop)
    assert first.finish_reason == "stop" and first.text == full.text[: full.text.find(stop)]
    assert chat.messages[-1] == {"role": "assistant", "content": first.text}
    second = chat.send("And then?")
    fresh = pixtral.generate(chat.messages[:-1], temperature=0.0, max_tokens=12)
    assert second.tokens == fresh.tokens and second.text == fresh.text
