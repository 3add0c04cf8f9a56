"""Conversations with tool calls: the storage format keeps them and the transcript shows the call and its result."""

from __future__ import annotations

import json

import pytest
from chat_fakes import FakeEngine, started, wait_for

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.storage import FORMAT, StorageError, Store, to_markdown
from pixtral_mlx.tui.widgets.transcript import ReplyMessage, ToolResult, short_result

CALL = {"id": "a1b2c3d4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
RESULT = "Sunny and 22 °C in Paris.\nWind: 10 km/h from the west.\nHumidity: 40%."
MESSAGES = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": RESULT},
    {"role": "assistant", "content": "It is sunny in Paris."},
]


def write(data_dir, messages, conv_id="20250101-120000-abcd"):
    folder = data_dir / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": 1, "id": conv_id, "model": "fake", "messages": messages}
    (folder / f"{conv_id}.json").write_text(json.dumps(doc), encoding="utf-8")
    return conv_id


def test_tool_calls_load_save_and_export(data_dir):
    store = Store(data_dir)
    conv = store.load(write(data_dir, MESSAGES))
    assert [t.role for t in conv.turns] == ["user", "assistant", "tool", "assistant"]
    assert conv.turns[1].tool_calls == [CALL] and conv.turns[1].text == ""
    assert conv.turns[2].tool_call_id == "a1b2c3d4e" and conv.turns[2].text == RESULT
    assert conv.messages()[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert conv.messages()[2] == {"role": "tool", "content": RESULT, "tool_call_id": "a1b2c3d4e"}
    store.save(conv)
    again = store.load(conv.id)
    assert again.messages() == conv.messages() and store.list()[0].turns == 1
    markdown = to_markdown(again)
    assert '→ `get_weather({"city": "Paris"})`' in markdown and "## Tool result" in markdown


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"role": "tool", "content": "x"}, "the tool_call_id of message 1 is null"),
        ({"role": "tool", "tool_call_id": "a", "content": None}, "the content of message 1 is null"),
        ({"role": "user", "content": "x", "tool_calls": [CALL]}, "message 1 has tool_calls but the role 'user'"),
        ({"role": "user", "content": "x", "tool_call_id": "a"}, "message 1 has a tool_call_id but the role 'user'"),
        ({"role": "assistant", "content": None, "tool_calls": {}}, "the tool_calls of message 1 are an object"),
        ({"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}, "tool call 1 of message 1 has no"),
        ({"role": "assistant", "content": None, "tool_calls": [{**CALL, "type": "x"}]}, "has the type 'x'"),
        ({"role": "assistant", "content": None}, "the content of message 1 is null"),
    ],
)
def test_damaged_tool_messages_are_refused(data_dir, message, reason):
    with pytest.raises(StorageError, match="damaged") as e:
        Store(data_dir).load(write(data_dir, [message]))
    assert reason in str(e.value)


def test_short_result():
    assert short_result("ok") == "← ok"
    assert short_result(RESULT) == "← Sunny and 22 °C in Paris. (+2 lines)"
    assert short_result("x" * 150) == "← " + "x" * 100 + "…"


async def test_a_saved_conversation_with_tool_calls_is_shown(data_dir):
    conv_id = write(data_dir, MESSAGES)
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir, resume=conv_id)
    async with app.run_test(size=(110, 36)) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: screen.query_one("#status").context_used > 0, what="the restored context")
        assert len(engine.chat.messages) == 4 and engine.chat.messages[2]["role"] == "tool"
        transcript = screen.query_one("#transcript")
        call = transcript.query_one(".tool-call")
        assert str(call.render()) == '→ get_weather({"city": "Paris"})'
        assert isinstance(call.parent, ReplyMessage)
        result = transcript.query_one(ToolResult)
        assert str(result.query_one(".text").render()) == "← Sunny and 22 °C in Paris. (+2 lines)"
        assert result.tooltip == RESULT  # the whole result is one hover away
        assert [type(w).__name__ for w in transcript.query(".message")] == [
            "UserMessage",
            "ReplyMessage",
            "ToolResult",
            "ReplyMessage",
        ]
        assert not transcript.query(ReplyMessage)[0].query_one(".stats").display  # no "thinking…" under a call
