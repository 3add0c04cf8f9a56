"""Conversations: KV cache reuse across turns, vision features cached by content, equality with fresh runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.generate import ContextError


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def parts(*items):
    return [{"type": "image", "image": i} if isinstance(i, Image.Image) else {"type": "text", "text": i} for i in items]


GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_second_turn_prefills_only_new_tokens(pixtral):
    from pixtral_mlx.generate import common_prefix as _common_prefix

    chat = pixtral.chat(**GREEDY)
    r1 = chat.send(parts(noise(64, 48, 1), "Describe."))
    turn1 = pixtral.encode(chat.messages[:1]).tokens
    assert r1.prompt_tokens == len(turn1)
    r2 = chat.send("And the colors?")
    history = pixtral.encode(chat.messages[:3]).tokens
    # In the cache after turn 1: its prompt and every generated token. The history re-encodes the reply
    # text, which a random model's output may not round-trip; the cache is reused up to where they agree.
    reused = _common_prefix(turn1 + r1.tokens, history)
    assert reused >= len(turn1)  # at least the whole first turn, image included, is not prefilled again
    assert r2.prompt_tokens == len(history) - reused
    assert r2.prompt_tokens < len(history) - len(turn1) + 1
    assert r2.tokens == pixtral.generate(chat.messages[:3], **GREEDY).tokens


def test_images_are_encoded_once_by_content(pixtral, tmp_path):
    img = noise(48, 32, 2)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    img.save(a)
    img.save(b)  # same content, another path
    before = pixtral.vision_runs
    chat = pixtral.chat(**GREEDY)
    chat.send([{"type": "image_url", "image_url": {"url": str(a)}}, {"type": "text", "text": "One."}])
    chat.send([{"type": "image_url", "image_url": {"url": str(b)}}, {"type": "text", "text": "Same?"}])
    assert pixtral.vision_runs - before == 1
    # Overwriting a file at the same path with new content is seen (the cache is not keyed by path).
    noise(48, 32, 3).save(a)
    chat.send([{"type": "image_url", "image_url": {"url": str(a)}}, {"type": "text", "text": "Now?"}])
    assert pixtral.vision_runs - before == 2


def test_multi_turn_equals_fresh_runs(pixtral):
    chat = pixtral.chat(system="Be brief.", **GREEDY)
    turns = [parts(noise(40, 70, 4), "Describe."), "More.", parts("Compare with", noise(90, 33, 5)), "Thanks."]
    for content in turns:
        reply = chat.send(content)
        fresh = pixtral.generate(chat.messages[:-1], **GREEDY)
        assert reply.tokens == fresh.tokens
        assert reply.text == fresh.text


def test_regenerate_and_undo(pixtral):
    chat = pixtral.chat(temperature=1.0, max_tokens=8)
    first = chat.send("Tell me something.", seed=1)
    again = "".join(c.text for c in chat.regenerate(seed=2))
    assert chat.messages[-1] == {"role": "assistant", "content": again}
    assert len(chat.messages) == 2 and again != first.text
    same = "".join(c.text for c in chat.regenerate(seed=1))
    assert same == first.text  # the cache was trimmed correctly: same seed, same reply
    chat.send("Second question.")
    removed = chat.undo()
    assert removed == {"role": "user", "content": "Second question."} and len(chat.messages) == 2
    follow = chat.send("Other question.", temperature=0.0)
    fresh = pixtral.generate(chat.messages[:-1], temperature=0.0, max_tokens=8)
    assert follow.tokens == fresh.tokens


def test_stop_keeps_partial_reply_and_next_turn_is_consistent(pixtral):
    chat = pixtral.chat(**{**GREEDY, "max_tokens": 50})
    stream = chat.stream("Write a long story.")
    got = [next(stream).text for _ in range(3)]
    stream.close()  # what the UI's Stop does
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(got)}
    assert chat.last_finish == "interrupted"
    reply = chat.send("Go on.")
    fresh = pixtral.generate(chat.messages[:-1], **{**GREEDY, "max_tokens": 50})
    assert reply.tokens == fresh.tokens


def test_context_overflow_is_refused_before_work(pixtral, monkeypatch):
    chat = pixtral.chat(**GREEDY)
    chat.send("Hello.")
    monkeypatch.setattr(pixtral, "context_length", 60)
    with pytest.raises(ContextError, match=r"this turn needs [\d,]+ more tokens .* of the 60-token context"):
        chat.send(parts(noise(128, 128, 6), "What is this?"))
    assert len(chat.messages) == 2  # the failed turn left the history unchanged
    assert chat.tokens_needed("ok") < 60


def test_chat_runs_on_another_thread(pixtral):
    """MLX streams are per thread: a chat used from a worker thread must work (mlx-lm's cross-thread test)."""
    import mlx.core as mx

    out = {}

    def work():
        out["reply"] = pixtral.chat(**GREEDY).send("Hi from a thread.")
        mx.clear_streams() if hasattr(mx, "clear_streams") else None

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert out["reply"].tokens == pixtral.generate([{"role": "user", "content": "Hi from a thread."}], **GREEDY).tokens
