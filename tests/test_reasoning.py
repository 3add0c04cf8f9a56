"""Reasoning models: `[THINK]…[/THINK]` is kept apart from the answer, end to end (library, describe, server, JSON).

A tiny random Pixtral with a tekken v13 tokenizer (tests/tekken_files.py: [THINK] 35, [/THINK] 36) is driven by a
scripted sampler (`Options.sampler` replaced: it returns the script's tokens in order, whatever the logits), so
every front end sees exactly [THINK] "Let me think." [/THINK] "The answer is 4." </s>.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tekken_files

from pixtral_mlx import reasoning
from pixtral_mlx.generate import _decode
from pixtral_mlx.turn import Options, collect

THOUGHT, ANSWER = "Let me think.", "The answer is 4."
THINK, END = 35, 36  # tekken_files' layout


@pytest.fixture(scope="module")
def thinker(think_dir):
    import pixtral_mlx

    return pixtral_mlx.load(str(think_dir))


def encode(pixtral, text: str) -> list[int]:
    return pixtral.encoder.text.encode(text, bos=False, eos=False)


def script(pixtral, *, answer: str = ANSWER, close: bool = True, end: bool = True) -> list[int]:
    tokens = [THINK, *encode(pixtral, THOUGHT)] + ([END] if close else []) + encode(pixtral, answer)
    return tokens + ([pixtral.encoder.eos_id] if end else [])


def scripted(monkeypatch, tokens: list[int]) -> None:
    """Every sampler made from now on returns `tokens` in order (then the last one again), one per row."""

    def sampler(self):
        import mlx.core as mx

        state = {"i": 0}

        def sample(logprobs):
            token = tokens[min(state["i"], len(tokens) - 1)]
            state["i"] += 1
            return mx.array([token] * logprobs.shape[0], dtype=mx.uint32)

        return sample

    monkeypatch.setattr(Options, "sampler", sampler)


# reasoning.py ------------------------------------------------------------------------------------------------------
def test_think_ids_come_from_the_tokenizer_file(tmp_path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from pixtral_mlx.config import bundled_tekken

    def ids(path):
        return reasoning.think_ids(MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer)

    assert ids(tekken_files.make_tekken(tmp_path / "tekken_v13.json", "v13")) == (THINK, END)
    assert ids(tekken_files.make_tekken(tmp_path / "tekken_v13_plain.json", "v13", think=False)) is None
    assert ids(tekken_files.make_tekken(tmp_path / "tekken_v11.json", "v11")) is None
    assert ids(bundled_tekken()) is None  # Pixtral-12B's v3: nothing is split
    spm = Path(bundled_tekken()).parent / "mistral_instruct_tokenizer_241114.model.v7m1"  # Pixtral-Large's
    assert ids(spm) is None  # (SentencePiece answers <unk>'s id for a piece it lacks)
    assert reasoning.think_ids(None) is None


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_tekken_files_load_and_encode(tmp_path, version):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralTokenizer.from_file(str(tekken_files.make_tekken(tmp_path, version)))
    inner = tokenizer.instruct_tokenizer.tokenizer
    assert inner.version.value == version and inner.image.image_patch_size == 14
    assert inner.get_special_token("[SYSTEM_PROMPT]") == 17 and inner.get_special_token("[TOOL_CALLS]") == 9
    if version != "v7":
        assert (inner.get_special_token("[ARGS]"), inner.get_special_token("[CALL_ID]")) == (32, 33)
    msgs = [
        SystemMessage(content="S"),
        UserMessage(content="Hi"),
        AssistantMessage(content="Yo"),
        UserMessage(content="Q"),
    ]
    tokens = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens
    text = tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP)
    assert text == "<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]Hi[/INST]Yo</s>[INST]Q[/INST]"


def test_split_tokens_and_answer_tokens():
    assert reasoning.split_tokens([THINK, 1000, 1001, END, 1002, 2], (THINK, END)) == ([1000, 1001], [1002, 2])
    assert reasoning.split_tokens([THINK, 1000], (THINK, END)) == ([1000], [])  # never closed: all thinking
    assert reasoning.split_tokens([1000, END, 1001], (THINK, END)) == ([], [1000, END, 1001])  # a stray close stays
    assert reasoning.split_tokens([THINK, 1000, END], None) == ([], [THINK, 1000, END])


class Detok:
    """A detokenizer over a real v13 tekken (what `_decode` is given)."""

    def __init__(self, tekken):
        from pixtral_mlx.prompt import StreamingDetokenizer

        self.inner = StreamingDetokenizer(tekken)
        self.tekken = tekken

    def add(self, token):
        return self.inner.add(token)

    def flush(self):
        return self.inner.flush()


@pytest.fixture(scope="module")
def tekken13(tmp_path_factory):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = tekken_files.make_tekken(tmp_path_factory.mktemp("tk") / "tekken.json", "v13")
    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def decode(tekken, tokens, **kw):
    from pixtral_mlx.prompt import StreamingDetokenizer

    steps = iter([(t, None) for t in tokens])
    kw.setdefault("max_tokens", 100)
    return list(_decode(steps, StreamingDetokenizer(tekken), 3, kw.pop("max_tokens"), 2, 0.0, **kw))


def test_decode_splits_thinking_from_answer(tekken13):
    enc = lambda s: tekken13.encode(s, bos=False, eos=False)  # noqa: E731
    tokens = [THINK, *enc(THOUGHT), END, *enc(ANSWER), 2]
    chunks = decode(tekken13, tokens)
    reply = collect(iter(chunks))
    assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert reply.tokens == tokens[:-1]  # [THINK] and [/THINK] are tokens of the reply; </s> ends it
    assert all(not (c.text and c.reasoning) for c in chunks)  # a piece is one or the other
    # a character cut by [/THINK] (the first byte of "é" alone) is flushed to the thinking as U+FFFD
    byte = {tekken13.id_to_byte_piece(t): t for t in range(1000, 1256)}
    cut = collect(iter(decode(tekken13, [THINK, byte[b"\xc3"], END, *enc("x"), 2])))
    assert (cut.reasoning, cut.text) == ("\ufffd", "x")


def test_stop_strings_apply_to_the_answer_only(tekken13):
    enc = lambda s: tekken13.encode(s, bos=False, eos=False)  # noqa: E731
    tokens = [THINK, *enc(THOUGHT), END, *enc(ANSWER), 2]
    reply = collect(iter(decode(tekken13, tokens, stop=("think",))))
    assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, ANSWER, "stop")  # "think" is thought
    reply = collect(iter(decode(tekken13, tokens, stop=(" is",))))
    assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, "The answer", "stop")


def test_max_tokens_counts_every_token_and_an_open_think_is_all_reasoning(tekken13):
    enc = lambda s: tekken13.encode(s, bos=False, eos=False)  # noqa: E731
    thought = enc(THOUGHT)
    tokens = [THINK, *thought, END, *enc(ANSWER), 2]
    reply = collect(iter(decode(tekken13, tokens, max_tokens=len(thought) + 1)))
    assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, "", "length")
    assert len(reply.tokens) == len(thought) + 1
    reply = collect(iter(decode(tekken13, [THINK, *thought], max_tokens=100)))  # the steps end, never closed
    assert (reply.reasoning, reply.text) == (THOUGHT, "")


# The library, on a tiny model --------------------------------------------------------------------------------------
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


def test_generate_stream_and_batch_split_the_thinking(thinker, monkeypatch):
    scripted(monkeypatch, script(thinker))
    reply = thinker.generate(ASK, max_tokens=60)
    assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, ANSWER, "stop")
    assert reply.tokens == script(thinker)[:-1]
    chunks = list(thinker.stream(ASK, max_tokens=60))
    assert "".join(c.reasoning for c in chunks) == THOUGHT and "".join(c.text for c in chunks) == ANSWER
    assert chunks[0].reasoning == "" and chunks[0].token == THINK  # [THINK] itself shows nothing
    for reply in thinker.generate_batch([ASK, ASK], max_tokens=60):  # stream_batch: the batched decode
        assert (reply.reasoning, reply.text, reply.finish_reason) == (THOUGHT, ANSWER, "stop")
    # max_tokens counts the thinking: cut inside it, the reply is all reasoning
    cut = thinker.generate(ASK, max_tokens=3)
    assert cut.text == "" and cut.reasoning and THOUGHT.startswith(cut.reasoning) and cut.finish_reason == "length"


def test_a_tokenizer_without_think_tokens_splits_nothing(pixtral, monkeypatch):
    """Pixtral-12B's v3 tekken: id 35 is a filler special token, dropped from the text as before."""
    tokens = [THINK, *encode(pixtral, THOUGHT), END, *encode(pixtral, ANSWER), pixtral.encoder.eos_id]
    scripted(monkeypatch, tokens)
    reply = pixtral.generate(ASK, max_tokens=60)
    assert (reply.reasoning, reply.text) == ("", THOUGHT + ANSWER)


def test_chat_feeds_back_the_answer_only(thinker, monkeypatch):
    scripted(monkeypatch, script(thinker))
    chat = thinker.chat(max_tokens=60)
    first = chat.send("What is 2 + 2?")
    assert (first.reasoning, first.text) == (THOUGHT, ANSWER)
    assert chat.messages[-1] == {"role": "assistant", "content": ANSWER}
    second = chat.send("And 3 + 3?")
    assert (second.reasoning, second.text) == (THOUGHT, ANSWER)
    history = thinker.encode([*chat.messages, {"role": "user", "content": "Next"}]).tokens  # a third turn's prompt
    assert THINK not in history and END not in history  # no [THINK] anywhere
    answer = encode(thinker, ANSWER)
    assert [history[i : i + len(answer)] == answer for i in range(len(history))].count(True) == 2


def test_tool_call_content_leaves_the_thinking_out(thinker, monkeypatch):
    tekken = thinker.encoder.text
    calls, args = tekken.get_special_token("[TOOL_CALLS]"), tekken.get_special_token("[ARGS]")
    tokens = [THINK, *encode(thinker, THOUGHT), END, calls, *encode(thinker, "add"), args]
    tokens += [*encode(thinker, '{"a": 2}'), thinker.encoder.eos_id]
    scripted(monkeypatch, tokens)
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    chat = thinker.chat(max_tokens=60, tools=[tool])
    reply = chat.send("Add.")
    assert reply.finish_reason == "tool_calls" and reply.reasoning == THOUGHT
    assert [c["function"] for c in reply.tool_calls] == [{"name": "add", "arguments": '{"a": 2}'}]
    assert chat.messages[-1]["content"] is None  # the thinking is not content before the calls


class Prefix:
    """A logits processor that forces `tokens` as the first ones (a large bias: the grammar's mask still rules)."""

    def __init__(self, tokens):
        self.tokens, self.calls = tokens, 0

    def __call__(self, tokens, logits):
        n, self.calls = self.calls, self.calls + 1
        return logits if n >= len(self.tokens) else logits.at[:, self.tokens[n]].add(1e4)


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["four", "five"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


def test_json_grammar_leaves_the_thinking_free(thinker):
    import jsonschema

    thought = "{not json at all"  # free text, even text the schema would refuse
    options = Options(json_schema=SCHEMA, temperature=0.0, max_tokens=80)
    turn = thinker.plan_turn(thinker.encode(ASK, options=options), thinker.new_cache(), options)
    turn.processors.insert(0, Prefix([THINK, *encode(thinker, thought), END]))
    reply = collect(thinker.run_turn(turn))
    assert reply.reasoning == thought and reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), SCHEMA)
    assert reply.tokens[0] == THINK and END in reply.tokens
    # without a thinking prefix the answer is the JSON at once, as before
    plain = thinker.generate(ASK, options)
    assert plain.reasoning == "" and THINK not in plain.tokens
    jsonschema.validate(json.loads(plain.text), SCHEMA)


# describe ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("pic") / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_describe_hides_the_thinking_unless_asked(thinker, think_dir, picture, monkeypatch, capsys):
    from pixtral_mlx.cli import describe

    scripted(monkeypatch, script(thinker))
    assert describe.main([picture, "--model", str(think_dir), "--max-tokens", "60"]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n" and THOUGHT not in err  # stderr is no terminal here: not even "Thinking…"
    assert describe.main([picture, "--model", str(think_dir), "--max-tokens", "60", "--show-thinking"]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n" and err.endswith(THOUGHT + "\n\n")  # stdout stays the answer only
    assert describe.main([picture, "--model", str(think_dir), "--max-tokens", "60", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == ANSWER and "reasoning" not in result
    assert describe.main([picture, "--model", str(think_dir), "--max-tokens", "60", "--each", "--show-thinking"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["text"], result["reasoning"]) == (ANSWER, THOUGHT)


# The server ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(think_dir):
    from test_serve import Live

    from pixtral_mlx.server.app import Settings

    live = Live(think_dir, Settings(model_id="thinker"))
    yield live
    live.close()


def post(server, path: str, body: dict):
    import httpx

    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def sse(response) -> list[dict]:
    """The JSON payloads of a server-sent-event body (up to `[DONE]`)."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: ") :]))
    return out


CHAT = {"messages": ASK, "max_tokens": 60}


def test_chat_completions_return_reasoning_content(server, thinker, monkeypatch):
    scripted(monkeypatch, script(thinker))
    body = post(server, "/v1/chat/completions", CHAT).json()
    message = body["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (ANSWER, THOUGHT)
    n_thought = len(encode(thinker, THOUGHT)) + 2  # with [THINK] and [/THINK]
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": n_thought}
    assert body["usage"]["completion_tokens"] == len(script(thinker))  # </s> counted, as before
    events = sse(post(server, "/v1/chat/completions", {**CHAT, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    assert all(not (d.get("reasoning_content") and d.get("content")) for d in deltas)
    first = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first:])  # the thinking comes first
    # a client that sends the thinking back: it is not part of the prompt
    history = [*ASK, {**message, "role": "assistant"}, {"role": "user", "content": "And 3 + 3?"}]
    again = post(server, "/v1/chat/completions", {**CHAT, "messages": history, "return_token_ids": True}).json()
    prompt = again["prompt_token_ids"]
    answer_only = [*ASK, {"role": "assistant", "content": ANSWER}, history[-1]]
    assert THINK not in prompt and prompt == thinker.encode(answer_only).tokens


def test_responses_api_returns_a_reasoning_item(server, thinker, monkeypatch):
    scripted(monkeypatch, script(thinker))
    body = post(server, "/v1/responses", {"input": "What is 2 + 2?", "max_output_tokens": 60}).json()
    kinds = [item["type"] for item in body["output"]]
    assert kinds == ["reasoning", "message"]
    thought, message = body["output"]
    assert thought["content"] == [{"type": "reasoning_text", "text": THOUGHT}] and thought["summary"] == []
    assert message["content"][0]["text"] == ANSWER
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == len(encode(thinker, THOUGHT)) + 2
    # the stored turn goes on with the answer only
    events = sse(post(server, "/v1/responses", {"input": "Again", "stream": True, "previous_response_id": body["id"]}))
    kinds = [e["type"] for e in events]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == THOUGHT
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == ANSWER
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    done = events[-1]["response"]
    assert [item["type"] for item in done["output"]] == ["reasoning", "message"]
    assert done["output"][0]["content"][0]["text"] == THOUGHT and done["output"][0]["status"] == "completed"
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1]


def test_ollama_chat_thinking(server, thinker, monkeypatch):
    scripted(monkeypatch, script(thinker))
    ollama = {"model": "thinker", "messages": ASK, "options": {"num_predict": 60}, "stream": False}
    body = post(server, "/api/chat", {**ollama, "think": True}).json()
    assert (body["message"]["content"], body["message"]["thinking"]) == (ANSWER, THOUGHT)
    hidden = post(server, "/api/chat", {**ollama, "think": False}).json()
    assert hidden["message"] == {"role": "assistant", "content": ANSWER}
    lines = [json.loads(x) for x in post(server, "/api/chat", {**ollama, "stream": True}).text.splitlines()]
    assert "".join(x["message"].get("thinking", "") for x in lines) == THOUGHT
    assert "".join(x["message"]["content"] for x in lines) == ANSWER and lines[-1]["done"]
    generate = post(server, "/api/generate", {"model": "thinker", "prompt": "2 + 2?", "stream": False}).json()
    assert (generate["response"], generate["thinking"]) == (ANSWER, THOUGHT)
    assert "thinking" in post(server, "/api/show", {"model": "thinker"}).json()["capabilities"]


def test_forced_tool_call_grammar_leaves_the_thinking_free(thinker):
    """mistral_common's tool-call grammar for a v13 tokenizer with [THINK] (its think template) allows the prefix."""
    tool = {
        "type": "function",
        "function": {
            "name": "confirm",
            "parameters": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
    }
    options = Options(tools=[tool], tool_choice="required", temperature=0.0, max_tokens=80)
    turn = thinker.plan_turn(thinker.encode(ASK, options=options), thinker.new_cache(), options)
    thought = "I must call it."
    turn.processors.insert(0, Prefix([THINK, *encode(thinker, thought), END]))
    reply = collect(thinker.run_turn(turn))
    assert reply.reasoning == thought and reply.finish_reason == "stop"
    from pixtral_mlx.tools import parse_tool_calls

    content, calls = parse_tool_calls(thinker.encoder.text, reasoning.answer_tokens(thinker.encoder.text, reply.tokens))
    assert content.strip() == "" and calls[0]["function"]["name"] == "confirm"  # (text may come before a call)
    assert json.loads(calls[0]["function"]["arguments"]) in ({"ok": True}, {"ok": False})


def test_describe_on_a_terminal_dims_the_thinking_or_says_thinking(monkeypatch):
    import io
    import sys

    from pixtral_mlx.cli.describe import _Thinking

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for show, expected in ((True, "\x1b[2mhm, ok\x1b[0m\n\n"), (False, "\x1b[2mThinking…\x1b[0m\r\x1b[K")):
        monkeypatch.setattr(sys, "stderr", Terminal())
        thinking = _Thinking(show)
        thinking.write("hm, ")
        thinking.write("ok")
        thinking.end()
        thinking.end()  # once only
        assert sys.stderr.getvalue() == expected
