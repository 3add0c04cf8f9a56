"""Tool calls: OpenAI's tools through mistral_common, the two call formats parsed, forced calls by grammar, the
server (real openai client, tiny random model) and `Chat`."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pixtral_mlx.errors import PromptError
from pixtral_mlx.server.app import Settings
from pixtral_mlx.tools import mistral_id, parse_tool_calls
from pixtral_mlx.turn import Options
from tests.test_serve import Live

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# Parsing ------------------------------------------------------------------------------------------------------
class FakeTekken:
    """A tekken-like vocabulary: special tokens first, then one token per byte."""

    def __init__(self, specials: list[str]):
        self.specials = specials
        self.num_special_tokens = len(specials)
        self.eos_id = specials.index("</s>")

    def id_to_piece(self, i: int) -> str:
        return self.specials[i]

    def id_to_byte_piece(self, i: int) -> bytes:
        return bytes([i - self.num_special_tokens])

    def ids(self, text: str) -> list[int]:
        return [b + self.num_special_tokens for b in text.encode()]


def test_parse_v3_json_list():
    tk = FakeTekken(["<unk>", "<s>", "</s>", "[TOOL_CALLS]"])
    body = '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, {"name": "get_time", "arguments": {}}]'
    tokens = [3, *tk.ids(body), 2]
    content, calls = parse_tool_calls(tk, tokens)
    assert content == ""
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    assert all(c["type"] == "function" and len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    assert calls[0]["id"] != calls[1]["id"] and parse_tool_calls(tk, tokens)[1] == calls  # deterministic
    assert parse_tool_calls(tk, tk.ids("plain text") + [2]) is None
    assert parse_tool_calls(tk, [3, *tk.ids('[{"name": "get_wea')]) is None  # cut short


def test_parse_v11_name_args():
    tk = FakeTekken(["<unk>", "<s>", "</s>", "[TOOL_CALLS]", "[ARGS]"])
    tokens = tk.ids("Sure.") + [3, *tk.ids("get_weather"), 4, *tk.ids('{"city": "Rome", "days": 1}')]
    tokens += [3, *tk.ids("get_time"), 4, *tk.ids('{"zone": "UTC"}'), 2]
    content, calls = parse_tool_calls(tk, tokens)
    assert content == "Sure."
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'},
        {"name": "get_time", "arguments": '{"zone": "UTC"}'},
    ]


def test_ids_map_to_tekken_form():
    assert mistral_id("abc123XYZ") == "abc123XYZ"
    mapped = mistral_id("call_0123456789")
    assert len(mapped) == 9 and mapped.isalnum() and mapped == mistral_id("call_0123456789")
    assert mapped != mistral_id("call_0123456780")


def test_options_check_tools():
    with pytest.raises(PromptError) as e:
        Options(tools=[{"type": "function", "function": {}}])
    assert e.value.param == "tools"
    with pytest.raises(PromptError) as e:
        Options(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
    with pytest.raises(PromptError):
        Options(tool_choice="required")
    assert Options(tools=TOOLS, tool_choice="required").tools[0]["function"]["name"] == "get_weather"


# Prompts ------------------------------------------------------------------------------------------------------
def mistral_reference(pixtral, messages_mc, tools=True):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    mc_tools = [Tool(function=Function(**t["function"])) for t in TOOLS] if tools else None
    return pixtral.encoder.tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages_mc, tools=mc_tools))


def round_trip():
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    ours = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
    ]
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    cid = mistral_id("call_abc")
    theirs = [
        UserMessage(content=ASK[0]["content"]),
        AssistantMessage(tool_calls=[ToolCall(id=cid, function=FunctionCall(**call["function"]))]),
        ToolMessage(content="sunny, 21 C", tool_call_id=cid),
    ]
    return ours, theirs


def test_round_trip_encodes_as_mistral_common(pixtral):
    ours, theirs = round_trip()
    prompt = pixtral.encoder.encode(ours, tools=Options(tools=TOOLS).tools)
    assert prompt.tokens == mistral_reference(pixtral, theirs).tokens
    plain = pixtral.encode(ours)  # no tools: retool adds them for a turn whose options carry them
    pixtral.encoder.retool(plain, Options(tools=TOOLS))
    assert plain.tokens == prompt.tokens


def test_system_after_assistant(pixtral):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

    msgs = ASK + [{"role": "assistant", "content": "Sunny."}, {"role": "system", "content": "Be brief."}]
    msgs += [{"role": "user", "content": "And tomorrow?"}]
    tokens = pixtral.encode(msgs).tokens
    ref = [SystemMessage(content="Be brief."), UserMessage(content=ASK[0]["content"])]
    ref += [AssistantMessage(content="Sunny."), UserMessage(content="And tomorrow?")]
    assert tokens == mistral_reference(pixtral, ref, tools=False).tokens  # v3: one system prompt, on the last turn


# The server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny"))
    yield server
    server.close()


def check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and len(call.id) == 9
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_gives_valid_calls(live, seed):
    client = live.client()
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=200, temperature=1.0,
        parallel_tool_calls=False,  # the random model would add calls up to max_tokens
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("seed", [3, 4])
def test_named_choice_calls_that_function(live, seed):
    client = live.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, seed=seed, max_tokens=200, temperature=1.0,
        parallel_tool_calls=False,
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    check_calls(calls, {"get_time"})


def test_streamed_calls_match(live):
    client = live.client()
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", seed=7, max_tokens=200, temperature=1.0)
    kw["parallel_tool_calls"] = False
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for event in client.chat.completions.create(stream=True, **kw):
        for choice in event.choices:
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    expected = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]
    assert [calls[k] for k in sorted(calls)] == expected


def test_round_trip_usage(live):
    ours, theirs = round_trip()
    client = live.client()
    r = client.chat.completions.create(model="tiny", messages=ours, tools=TOOLS, max_tokens=3, seed=0)
    assert r.usage.prompt_tokens == len(mistral_reference(live.engine.pixtral, theirs).tokens)


def test_none_gives_text(live):
    r = live.client().chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, seed=0, temperature=1.0
    )
    choice = r.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_server_accepts_system_after_assistant(live):
    msgs = ASK + [{"role": "assistant", "content": "Sunny."}, {"role": "system", "content": "Be brief."}]
    msgs += [{"role": "user", "content": "And tomorrow?"}]
    r = live.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# The library --------------------------------------------------------------------------------------------------
def test_chat_with_tools(pixtral):
    chat = pixtral.chat(tools=TOOLS, tool_choice="required", max_tokens=200, temperature=1.0, seed=5)
    chat.options = chat.options.merge(parallel_tool_calls=False)
    reply = chat.send("What is the weather in Paris?")
    assert reply.finish_reason == "tool_calls" and reply.tool_calls
    for call in reply.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])
    assert chat.messages[-1]["tool_calls"] == reply.tool_calls
    results = {call["id"]: {"ok": True} for call in reply.tool_calls}
    after = chat.send_tool_results(results, tool_choice="none", max_tokens=4)
    assert not after.tool_calls and chat.messages[-1]["role"] == "assistant"
    assert [m["role"] for m in chat.messages] == ["user", "assistant", *["tool"] * len(results), "assistant"]
