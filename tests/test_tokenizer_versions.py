"""Every tekken version of the family (v3 Pixtral-12B, v7 Mistral Small 3.1, v11 Small 3.2, v13 Magistral and
Ministral 3; FAMILY.md §5.1), from tiny tekken.json files (tests/tekken_files.py): prompts equal to
mistral_common's for a system prompt, several turns, two images and tools with calls and results; and end to end
through a tiny random Mistral3 folder per version: load, generate, each version's tool-call format parsed back
into OpenAI `tool_calls`, forced calls (`required`, a named function) generated in that format."""

from __future__ import annotations

import functools
import json
import shutil

import family_checkpoints
import jsonschema
import numpy as np
import pytest
from PIL import Image
from tekken_files import VERSIONS, make_tekken

from pixtral_mlx.prompt import PromptEncoder
from pixtral_mlx.tools import mistral_id, parse_tool_calls

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [noise(100, 60, 1), noise(45, 80, 2)]
CALL = {
    "id": "call_0001",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Where is this?"}]},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "Weather here?"}, {"type": "image", "image": IMAGES[1]}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_0001", "content": '{"sky": "clear"}'},
    {"role": "user", "content": "Thanks, and the time?"},
]


def mistral_request():
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ImageChunk,
        SystemMessage,
        TextChunk,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    call_id = mistral_id("call_0001")
    return ChatCompletionRequest(
        messages=[
            SystemMessage(content="You are terse."),
            UserMessage(content=[ImageChunk(image=IMAGES[0]), TextChunk(text="Where is this?")]),
            AssistantMessage(content="Paris."),
            UserMessage(content=[TextChunk(text="Weather here?"), ImageChunk(image=IMAGES[1])]),
            AssistantMessage(
                tool_calls=[
                    ToolCall(
                        id=call_id, function=FunctionCall(name="get_weather", arguments='{"city": "Paris", "days": 2}')
                    )
                ]
            ),
            ToolMessage(content='{"sky": "clear"}', tool_call_id=call_id),
            UserMessage(content="Thanks, and the time?"),
        ],
        tools=[Tool(function=Function(**t["function"])) for t in TOOLS],
    )


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def tekken(version, tmp_path_factory):
    # v3 keeps Pixtral-12B's image settings (patch 16, no merge); the newer files get Mistral3's
    image = {"image_patch_size": 16, "max_image_size": 1024, "spatial_merge_size": 1} if version == "v3" else None
    return make_tekken(tmp_path_factory.mktemp(version) / "tekken.json", version, image=image)


@functools.cache
def reference(path):
    """mistral_common's tokenizer of a file (read once: a 131072-token tekken takes a second or two)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def encoder(tekken):
    return PromptEncoder(tekken)


def test_file_gives_the_version(version, encoder):
    assert encoder.text.version.value == version
    assert encoder.image_token_ids() == (10, 12, 13)
    merge = encoder.image_encoder.image_config.spatial_merge_size
    assert merge == (1 if version == "v3" else 2)


def test_prompt_equals_mistral_common(version, tekken, encoder):
    prompt = encoder.encode(MESSAGES, tools=TOOLS)
    ref = reference(tekken).encode_chat_completion(mistral_request())
    assert prompt.tokens == ref.tokens
    assert len(prompt.images) == 2
    assert all(np.array_equal(a.pixels, b) for a, b in zip(prompt.images, ref.images))
    text = encoder.text
    assert prompt.tokens.count(text.get_special_token("[TOOL_CALLS]")) == 1
    if version in ("v11", "v13"):
        args = text.get_special_token("[ARGS]")
        assert args in prompt.tokens
        call_id = text.get_special_token("[CALL_ID]")
        assert (call_id in prompt.tokens) == (version == "v11")  # v13 drops call ids


def calls_in_format(tekken, calls):
    """The token ids mistral_common writes for an assistant message with these tool calls (the model's format)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    tool_calls = [
        ToolCall(id=i, function=FunctionCall(name=name, arguments=json.dumps(args))) for i, name, args in calls
    ]
    instruct = reference(tekken).instruct_tokenizer
    return instruct._encode_tool_calls_in_assistant_message(AssistantMessage(tool_calls=tool_calls))


def test_each_format_parses_back(version, tekken, encoder):
    text = encoder.text
    calls = [("abc123XYZ", "get_weather", {"city": "Rome", "days": 1}), ("zz9988776", "get_time", {"zone": "UTC"})]
    tokens = text.encode("Sure.", bos=False, eos=False) + calls_in_format(tekken, calls) + [text.eos_id]
    if version in ("v11", "v13"):
        assert tokens.count(text.get_special_token("[TOOL_CALLS]")) == 2  # name[ARGS]{…} once per call
    content, parsed = parse_tool_calls(text, tokens)
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
        (name, args) for _, name, args in calls
    ]
    if version == "v11":  # the model's own call ids
        assert [c["id"] for c in parsed] == ["abc123XYZ", "zz9988776"]
    else:
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in parsed)


# End to end through a tiny random Mistral3 folder, one per version ----------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return family_checkpoints.write_checkpoint(family_checkpoints.hf_model("A"), tmp_path_factory.mktemp("w") / "A")


@pytest.fixture(scope="module")
def model(version, weights, tmp_path_factory):
    import pixtral_mlx

    folder = tmp_path_factory.mktemp(f"m{version}") / f"tiny-{version}"
    shutil.copytree(weights, folder)
    make_tekken(folder / "tekken.json", version)
    return pixtral_mlx.load(str(folder))


def test_load_encode_generate(version, model):
    prompt = model.encode(MESSAGES, options=None)
    ref = reference(model.path / "tekken.json").encode_chat_completion(
        mistral_request().model_copy(update={"tools": None})
    )
    assert prompt.tokens == ref.tokens
    reply = model.generate(MESSAGES, temperature=0, max_tokens=6)
    assert reply.tokens and reply.text == model.encoder.decode(reply.tokens)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_in_the_versions_format(version, model, choice):
    from pixtral_mlx.reasoning import answer_tokens

    tool_choice = {"type": "function", "function": {"name": "get_time"}} if choice == "named" else "required"
    chat = model.chat(tools=TOOLS, tool_choice=tool_choice, max_tokens=120, temperature=1.0, seed=3)
    chat.options = chat.options.merge(parallel_tool_calls=False)
    reply = chat.send("What is the weather in Paris?")
    assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert choice != "named" or call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])
    text = model.encoder.text
    tokens = answer_tokens(text, reply.tokens)
    marker = text.get_special_token("[TOOL_CALLS]")
    assert tokens[0] == marker
    if version in ("v11", "v13"):  # [TOOL_CALLS]name[ARGS]{…}: the name is text, then [ARGS]
        args = text.get_special_token("[ARGS]")
        assert args in tokens and text.decode(tokens[1 : tokens.index(args)]).strip().startswith(
            call["function"]["name"]
        )
    else:  # [TOOL_CALLS][{"name": …, "arguments": …}]
        assert json.loads(text.decode(tokens[1:]))[0]["name"] == call["function"]["name"]
    # the call and its result go back into the next prompt in the version's layout
    after = chat.send_tool_results({call["id"]: {"ok": True}}, tool_choice="none", max_tokens=3)
    assert not after.tool_calls and [m["role"] for m in chat.messages][-3:] == ["assistant", "tool", "assistant"]
