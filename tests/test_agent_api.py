"""What agent frameworks ask of the chat-completions API: the model card, logprobs, `logit_bias`, the presence and
frequency penalties, `n` replies, and JSON replies that start with their value. The real server on the tiny
checkpoint (`test_serve.Live`), talked to with the `openai` client; values checked against an independent forward
pass, the processors with exact logits."""

from __future__ import annotations

import json

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from test_serve import Live

from pixtral_mlx.errors import PromptError
from pixtral_mlx.generate import Penalties, sampling_processors, token_logprobs
from pixtral_mlx.prompt import Prompt
from pixtral_mlx.server.app import Settings
from pixtral_mlx.turn import Options

N = 8
GREEDY = {"temperature": 0.0, "max_tokens": N}
MESSAGES = [{"role": "user", "content": "Say something"}]
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def live(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny", aliases=("org/tiny-alias",)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def log_softmax_rows(pixtral, prompt_tokens: list[int], generated: list[int]) -> np.ndarray:
    """log-softmax of the logits that predict each generated token: one full forward pass of prompt + reply."""
    full = Prompt(tokens=prompt_tokens + generated)
    out = pixtral.model(mx.array(full.tokens)[None], input_embeddings=pixtral.embeddings(full)[None])
    logits = np.array(out[0].astype(mx.float32), dtype=np.float64)[len(prompt_tokens) - 1 : -1]
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def streamed(client, **kwargs) -> dict[int, dict]:
    """Per choice index: its text, content logprob entries, token ids and finish reason, from a stream."""
    out: dict[int, dict] = {}
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kwargs):
        for c in chunk.choices:
            got = out.setdefault(c.index, {"text": "", "logprobs": [], "ids": None, "finish": None})
            got["text"] += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                got["logprobs"] += c.logprobs.content
            if c.finish_reason:
                got["finish"], got["ids"] = c.finish_reason, c.token_ids
    return out


# --- the model card -----------------------------------------------------------------------------------------


def test_model_card_and_404_for_another_id(live, client):
    card = client.models.retrieve("tiny")
    assert (card.id, card.object) == ("tiny", "model")
    assert client.models.retrieve("org/tiny-alias").id == "tiny"  # an alias, with a slash
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "gpt-4o" in e.value.body["message"]
    assert httpx.get(f"{live.url}/v1/models/other").json()["error"]["code"] == "model_not_found"


# --- logprobs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_log_softmax_of_each_generated_token(client, pixtral, stream):
    kwargs = {**GREEDY, "logprobs": True, "top_logprobs": 5, "extra_body": IDS}
    if stream:
        got = streamed(client, **kwargs)[0]
        entries, ids = got["logprobs"], got["ids"]
    else:
        choice = client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs).choices[0]
        entries, ids = choice.logprobs.content, choice.token_ids
    assert len(ids) == N and len(entries) == len(ids)  # one entry per generated token
    rows = log_softmax_rows(pixtral, pixtral.encode(MESSAGES).tokens, ids)
    tekken = pixtral.encoder.text
    for row, token, entry in zip(rows, ids, entries):
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert bytes(entry.bytes) == tekken.id_to_byte_piece(token)
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        np.testing.assert_allclose(top, np.sort(row)[::-1][:5], atol=1e-4)
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the most likely one


def test_logprobs_without_top_logprobs_and_off_by_default(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, logprobs=True, **GREEDY)
    assert len(r.choices[0].logprobs.content) == N
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, **GREEDY).choices[0].logprobs is None


def test_token_logprobs_unit():
    lp = mx.array([-3.0, -1.0, -float("inf"), -2.0, -1.0])
    chosen, top = token_logprobs(lp, 3, 4)
    assert chosen == -2.0
    assert top == [(1, -1.0), (4, -1.0), (3, -2.0), (0, -3.0)]  # sorted, ties by id
    assert token_logprobs(lp, 0, 10)[1] == [(1, -1.0), (4, -1.0), (3, -2.0), (0, -3.0)]  # -inf (masked) left out
    assert token_logprobs(lp, 0, 0) == (-3.0, [])


# --- logit_bias and penalties --------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_plus_100_forces_a_token(client, pixtral, stream):
    kwargs = {**GREEDY, "logit_bias": {"1500": 100}, "extra_body": IDS}
    if stream:
        ids = streamed(client, **kwargs)[0]["ids"]
    else:
        ids = client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs).choices[0].token_ids
    assert ids == [1500] * N
    baseline = pixtral.generate(MESSAGES, **GREEDY).tokens
    assert baseline[0] != 1500
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, logit_bias={str(baseline[0]): -100}, extra_body=IDS, **GREEDY
    )
    assert r.choices[0].token_ids[0] != baseline[0]  # -100 bans it


def test_penalty_processor_exact_logits():
    """OpenAI's formula on exact logits: only generated tokens count (not the prompt's), frequency x count,
    presence once."""
    p = Penalties(presence=0.5, frequency=0.25)
    logits = mx.arange(8, dtype=mx.float32)[None]
    prompt = [3, 3, 5]
    np.testing.assert_array_equal(np.array(p(mx.array(prompt), logits)), np.array(logits))  # nothing generated
    out = np.array(p(mx.array(prompt + [4]), logits))[0]
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 4 - 0.75, 5, 6, 7])
    out = np.array(p(mx.array(prompt + [4, 4]), logits))[0]
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 4 - 1.0, 5, 6, 7])
    out = np.array(p(mx.array(prompt + [4, 4, 3]), logits))[0]
    np.testing.assert_array_equal(out, [0, 1, 2, 3 - 0.75, 4 - 1.0, 5, 6, 7])
    negative = Penalties(presence=-1.0, frequency=0.0)  # a negative penalty favours what was said
    negative(mx.array(prompt), logits)
    np.testing.assert_array_equal(np.array(negative(mx.array(prompt + [6]), logits))[0], [0, 1, 2, 3, 4, 5, 7, 7])


def test_sampling_processors_bias_and_vocabulary():
    (bias,) = sampling_processors(Options(logit_bias={2: 100, 5: -1.5}), vocab_size=8)
    out = np.array(bias(mx.array([1]), mx.zeros((1, 8))))[0]
    np.testing.assert_array_equal(out, [0, 0, 100, 0, 0, -1.5, 0, 0])
    assert sampling_processors(Options(), vocab_size=8) == []
    with pytest.raises(PromptError, match="outside the model's vocabulary") as e:
        sampling_processors(Options(logit_bias={8: 1}), vocab_size=8)
    assert e.value.param == "logit_bias"


def test_penalties_through_the_server_change_greedy_output_in_their_direction(client, pixtral):
    def ids(**kw) -> list[int]:
        kwargs = {"temperature": 0.0, "max_tokens": 16, "extra_body": IDS, **kw}
        return client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs).choices[0].token_ids

    plain = ids()
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself
    for name in ("presence_penalty", "frequency_penalty"):
        penalized = ids(**{name: 2.0})
        assert len(set(penalized)) > len(set(plain))  # fewer repeats
        assert penalized == pixtral.generate(MESSAGES, temperature=0.0, max_tokens=16, **{name: 2.0}).tokens
        assert len(set(ids(**{name: -2.0}))) < len(set(plain))  # more repeats


# --- n replies ------------------------------------------------------------------------------------------------


def test_n_greedy_replies_all_equal_the_single_reply(client):
    one = client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body=IDS, **GREEDY)
    three = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, extra_body=IDS, **GREEDY)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for c in three.choices:
        assert (c.message.content, c.token_ids) == (one.choices[0].message.content, one.choices[0].token_ids)
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    got = streamed(client, n=3, extra_body=IDS, **GREEDY)
    assert sorted(got) == [0, 1, 2]
    for c in got.values():
        assert (c["text"], c["ids"], c["finish"]) == (
            one.choices[0].message.content,
            one.choices[0].token_ids,
            "length",
        )


def test_n_seeded_choice_i_samples_with_seed_plus_i(client):
    sampled = {"temperature": 1.0, "max_tokens": N, "extra_body": IDS}
    three = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, seed=7, **sampled)
    alone = [
        client.chat.completions.create(model="tiny", messages=MESSAGES, seed=7 + i, **sampled).choices[0].token_ids
        for i in range(3)
    ]
    assert [c.token_ids for c in three.choices] == alone
    assert len({tuple(a) for a in alone}) > 1  # different seeds, different replies


def test_n_with_logprobs_gives_each_choice_its_entries(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, logprobs=True, extra_body=IDS, **GREEDY)
    assert [len(c.logprobs.content) for c in r.choices] == [len(c.token_ids) for c in r.choices] == [N, N]


# --- JSON replies start with their value ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
)
def test_constrained_reply_starts_with_its_json_value(client, response_format):
    for seed in range(6):
        r = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            response_format=response_format,
            temperature=1.0,
            seed=seed,
            max_tokens=6,
        )
        assert r.choices[0].message.content.startswith("{"), (seed, r.choices[0].message.content)


def test_first_grammar_mask_allows_only_tokens_that_start_the_value(pixtral):
    from pixtral_mlx.structured import logits_processors

    for options in (Options(json_object=True), Options(json_schema={"type": "array"})):
        (constraint,) = logits_processors(options, pixtral.encoder)
        allowed = np.unpackbits(constraint.bitmask.view(np.uint8), bitorder="little").astype(bool)
        pieces = [pixtral.encoder.text.id_to_byte_piece(int(t)) for t in np.nonzero(allowed)[0]]
        first = b"{" if options.json_object else b"["
        assert pieces and all(p.startswith(first) for p in pieces), pieces[:10]


def test_greedy_json_reply_is_valid_and_unpadded(client):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    text = (
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format=fmt, temperature=0.0, max_tokens=64
        )
        .choices[0]
        .message.content
    )
    assert text == json.dumps(json.loads(text))


# --- what is checked ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "from -2 to 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "from -2 to 2"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "-100 to 100"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "vocabulary"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
        ({"top_logprobs": 3}, "top_logprobs", "logprobs"),
        ({"n": 9}, "n", "1 to 8"),
        ({"n": 0}, "n", "1 to 8"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": "g"}}},
            "tool_choice",
            "not among",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"audio": {"voice": "x"}}, "audio", "not supported"),
    ],
)
def test_bad_values_are_400s_naming_the_field(live, body, param, words):
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["message"].count(". ") == 0 and error["message"].endswith(".")  # one sentence


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {1: "x"}}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ],
)
def test_options_check_the_new_fields(kwargs, param):
    with pytest.raises(PromptError) as e:
        Options(**kwargs)
    assert e.value.param == param and param in str(e.value)
    assert Options(logit_bias={3: 1}, logprobs=True, top_logprobs=20).logit_bias == {3: 1.0}
