"""Continuous batching (`pixtral_mlx.batching`) with the tiny checkpoint: rows joining a running batch at different
steps decode token for token what each turn decodes alone; each row keeps its own stop strings, grammar and
cancellation; the server batches concurrent requests and keeps a prefix cache per conversation."""

from __future__ import annotations

import json
import threading

import pytest

from pixtral_mlx.batching import Batch, run, solo
from pixtral_mlx.server.app import Settings
from pixtral_mlx.turn import Options, Reply
from tests.test_serve import IMG_A, Live, ask, data_url, expected, user

N = 12
GREEDY = Options(temperature=0.0, max_tokens=N)


def turn(pixtral, messages, options=GREEDY):
    prompt = pixtral.encode(messages)
    return pixtral.plan_turn(prompt, pixtral.new_cache(), options)


def replies(chunks, n):
    out = [Reply() for _ in range(n)]
    for i, chunk in chunks:
        out[i].add(chunk)
    return out


PROMPTS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [user(data_url(IMG_A), "What is in this picture?")],
    [{"role": "user", "content": "Count: one, two"}],
]


def test_rows_joining_at_different_steps_equal_each_prompt_alone(pixtral):
    alone = [pixtral.generate(m, GREEDY) for m in PROMPTS]
    got = replies(run(pixtral, [(step, turn(pixtral, m)) for step, m in zip((0, 3, 5), PROMPTS)]), 3)
    for a, g in zip(alone, got):
        assert (g.tokens, g.text, g.finish_reason) == (a.tokens, a.text, a.finish_reason)
    batch = Batch(pixtral)
    for m in PROMPTS:
        batch.add(turn(pixtral, m))
    assert batch.max_rows == 3


def test_joining_rows_get_their_first_token_from_the_batch_step_except_where_they_cannot(pixtral, monkeypatch):
    """A prefilled row joins with its last prompt token still to feed: the next batched step gives every joining
    row its first token (no forward pass of one row each). A prompt ending at an [IMG] position (its embedding is
    the image's, not the token's) or of one token (nothing to merge) samples its first token alone. Either way
    each row decodes what it decodes alone."""
    from pixtral_mlx.prompt import Prompt

    image = pixtral.encode(PROMPTS[1])
    last_img = len(image.tokens) - 1 - image.tokens[::-1].index(pixtral.args.image_token_id)
    ends_in_image = Prompt(tokens=image.tokens[: last_img + 1], images=image.images)
    one_token = Prompt(tokens=pixtral.encode(PROMPTS[0]).tokens[:1])
    alone_samples = []
    sample = Batch._sample

    def counting(self, row, logits, i=None):
        if i is None:
            alone_samples.append(len(row.tokens))
        return sample(self, row, logits, i)

    monkeypatch.setattr(Batch, "_sample", counting)
    prompts = [pixtral.encode(m) for m in PROMPTS] + [ends_in_image, one_token]
    alone = [pixtral.generate(p, GREEDY) for p in prompts]
    batch = Batch(pixtral)
    rows = batch.add_many([pixtral.plan_turn(p, pixtral.new_cache(), GREEDY) for p in prompts])
    assert alone_samples == [len(ends_in_image.tokens), 1]  # the normal prompts: none
    assert [row.first is not None for row in rows] == [False, False, False, True, True]
    got = [Reply() for _ in prompts]
    index = {id(row): i for i, row in enumerate(rows)}
    while batch.rows:
        for row, chunk in batch.step():
            got[index[id(row)]].add(chunk)
    for a, g in zip(alone, got):
        assert (g.tokens, g.text, g.finish_reason) == (a.tokens, a.text, a.finish_reason)
        assert len(g.tokens) == N


def test_rows_joining_together_encode_their_images_in_one_call(pixtral, monkeypatch):
    """Turns admitted together (`add_many`) send their new images through the vision encoder in one call (as the
    batch's memory plan counts them) and still decode what each decodes alone."""
    from pixtral_mlx.pipeline import Pixtral
    from tests.test_serve import IMG_B

    messages = [PROMPTS[1], [user(data_url(IMG_B), "And this one?")], PROMPTS[0]]
    alone = [pixtral.generate(m, GREEDY) for m in messages]
    fresh = Pixtral(pixtral.model, pixtral.encoder)
    calls = []
    encode = pixtral.model.encode_images
    monkeypatch.setattr(pixtral.model, "encode_images", lambda imgs: calls.append(len(imgs)) or encode(imgs))
    batch = Batch(fresh)
    rows = batch.add_many([turn(fresh, m) for m in messages])
    assert calls == [2]
    got = [Reply() for _ in messages]
    index = {id(row): i for i, row in enumerate(rows)}
    while batch.rows:
        for row, chunk in batch.step():
            got[index[id(row)]].add(chunk)
    assert [g.tokens for g in got] == [a.tokens for a in alone]


def test_stop_string_and_grammar_rows_behave_as_alone(pixtral):
    plain = PROMPTS[0]
    first = pixtral.generate(plain, GREEDY).text
    stop = Options(temperature=0.0, max_tokens=N, stop=(first[3:6] or first[:1],))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = Options(temperature=0.0, max_tokens=40, json_schema=schema)
    cases = [(PROMPTS[2], GREEDY), (plain, stop), ([{"role": "user", "content": "JSON please"}], grammar)]
    alone = [pixtral.generate(m, o) for m, o in cases]
    got = replies(run(pixtral, [(k, turn(pixtral, m, o)) for k, (m, o) in enumerate(cases)]), 3)
    for a, g in zip(alone, got):
        assert (g.tokens, g.text, g.finish_reason) == (a.tokens, a.text, a.finish_reason)
    assert got[1].finish_reason == "stop" and stop.stop[0] not in got[1].text
    if got[2].finish_reason == "stop":
        json.loads(got[2].text)


def test_cancelling_one_row_leaves_the_others_unchanged_and_caches_hold_their_rows(pixtral):
    alone = [pixtral.generate(m, GREEDY) for m in PROMPTS]
    batch = Batch(pixtral)
    flag = threading.Event()
    turns = [turn(pixtral, m) for m in PROMPTS]
    rows = [batch.add(t, cancelled=flag.is_set if i == 1 else (lambda: False)) for i, t in enumerate(turns)]
    got = {id(r): Reply() for r in rows}
    steps = 0
    while batch.rows:
        for row, chunk in batch.step():
            if chunk is not None:
                got[id(row)].add(chunk)
        steps += 1
        if steps == 3:
            flag.set()
    for i in (0, 2):
        assert got[id(rows[i])].tokens == alone[i].tokens
    assert len(got[id(rows[1])].tokens) < len(alone[1].tokens)
    for t in turns:  # each conversation's cache got its row back: the next turn reuses it
        assert t.cache.offset == len(t.cache.tokens) > len(t.prompt.tokens)
        assert t.cache.tokens[: len(t.prompt.tokens)] == t.prompt.tokens
    follow = PROMPTS[0] + [{"role": "assistant", "content": alone[0].text}, {"role": "user", "content": "More."}]
    again = pixtral.plan_turn(pixtral.encode(follow), turns[0].cache, GREEDY)
    assert again.keep >= len(turns[0].prompt.tokens)
    assert pixtral.generate(follow, GREEDY).tokens == replies(run(pixtral, [(0, again)]), 1)[0].tokens


def test_solo_reasons():
    assert solo(GREEDY) is None and solo(Options(temperature=0.7)) is None
    assert solo(GREEDY, n=2) and solo(Options(logprobs=True)) and solo(Options(temperature=0.5, seed=1))


# The server -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny"))
    yield server
    server.close()


def test_concurrent_clients_get_their_alone_replies_in_one_batch(live, pixtral):
    requests = [[{"role": "user", "content": f"Client {i} says hello, {'and more ' * i}"}] for i in range(3)] + [
        [user(data_url(IMG_A), "Describe.")]
    ]
    want = [expected(pixtral, m, max_tokens=24)[:2] for m in requests]
    results: dict[int, tuple] = {}
    start = threading.Barrier(4)

    def client(i: int) -> None:
        start.wait()
        results[i] = ask(live.client(), requests[i], stream=i % 2 == 0, max_tokens=24)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results[i][:2] for i in range(4)] == want
    assert live.engine.max_batch_seen >= 2
    assert max(r.batch for r in live.engine.records) >= 2


def test_alternating_conversations_both_reuse_their_prefix(live, pixtral):
    engine = live.engine
    convs = [
        [{"role": "user", "content": "First conversation here, about the weather and the sea."}],
        [user(data_url(IMG_A), "Second conversation, with a picture.")],
    ]
    for turn_no in range(2):
        for conv in convs:
            text, ids, usage, _ = ask(live.client(), conv)
            assert (text, ids) == expected(pixtral, conv)[:2]
            record = engine.records[-1]
            assert record.prompt_tokens == usage["prompt_tokens"]
            if turn_no:
                assert record.prefilled < record.prompt_tokens / 2, (record, usage)
            conv += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_log_softmax_rows_is_the_same_op(rows, extension, monkeypatch):
    """A decode step's log-softmax (`log_softmax_rows`, used by `stream_batch` and `Batch`), through the extension's
    logsumexp or with the batch's rows spread over the CPU streams, gives exactly `logits - logsumexp(logits)` (what
    mlx-lm's `generate_step` hands a sampler), and a row alone gives what it gives in the batch."""
    import mlx.core as mx
    import numpy as np

    from pixtral_mlx import cpu_kernel
    from pixtral_mlx.generate import log_softmax_rows

    if extension:
        assert cpu_kernel.logsumexp(mx.zeros((1, 8))) is not None or cpu_kernel.extension() is None
    else:
        monkeypatch.setattr(cpu_kernel, "logsumexp", lambda x: None)

    logits = mx.random.normal((rows, 131072), key=mx.random.key(rows)) * 4
    want = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    got = np.array(log_softmax_rows(logits))
    assert np.array_equal(got, want)
    assert np.array_equal(np.array(log_softmax_rows(logits[-1:]))[0], got[-1])
    assert np.abs(np.log(np.exp(got.astype(np.float64)).sum(-1))).max() < 1e-3  # a real log-softmax
