"""OpenAI's Responses API (`/v1/responses`) on the real server with the tiny checkpoint, talked to with the `openai`
client (`client.responses`): replies equal the chat-completions endpoint's for the same conversation at temperature 0
(text and images, `instructions`, `previous_response_id`), streamed deltas concatenate to the whole reply in the
documented event order, `text.format` JSON schemas validate, `max_output_tokens` ends a reply `incomplete`, and
unknown ids are 404s in OpenAI's error shape."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from test_serve import IMG_A, Live, data_url, user

from pixtral_mlx.server.app import Settings
from pixtral_mlx.server.responses import ResponseStore, Stored

N = 8
GREEDY = {"temperature": 0.0, "max_output_tokens": N}


@pytest.fixture(scope="module")
def live(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny"))
    yield server
    server.close()


def chat(client: openai.OpenAI, messages: list, max_tokens: int = N, **options) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of the chat-completions endpoint, greedy."""
    r = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0.0, max_tokens=max_tokens, **options
    )
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump()


def image_input(text: str, url: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": text}]}
    ]


def test_text_equals_chat_completions(live):
    client = live.client()
    r = client.responses.create(model="tiny", input="Say something", **GREEDY)
    text, finish, usage = chat(client, [{"role": "user", "content": "Say something"}])
    assert r.output_text == text and r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert r.incomplete_details.reason == "max_output_tokens"
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.usage.input_tokens == usage["prompt_tokens"] and r.usage.output_tokens == usage["completion_tokens"]
    assert r.usage.total_tokens == usage["total_tokens"] and r.usage.output_tokens_details.reasoning_tokens == 0


def test_image_and_instructions_equal_chat_completions(live):
    client = live.client()
    url = data_url(IMG_A)
    r = client.responses.create(
        model="tiny", instructions="Be brief.", input=image_input("What is this?", url), **GREEDY
    )
    messages = [{"role": "system", "content": "Be brief."}, user(url, "What is this?")]
    assert r.output_text == chat(client, messages)[0] and r.instructions == "Be brief."


def test_stream_deltas_make_the_reply_in_the_documented_order(live):
    client = live.client()
    whole = client.responses.create(model="tiny", input="Tell me a story", **GREEDY)
    events = list(client.responses.create(model="tiny", input="Tell me a story", stream=True, **GREEDY))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == whole.output_text
    end = f"response.{whole.status}"
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        end,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1].response
    assert done.output_text == whole.output_text and done.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[-4].text == whole.output_text
    # and it is stored like a whole one
    assert client.responses.retrieve(done.id).output_text == whole.output_text


def test_stream_raw_sse_lines(live):
    body = {"model": "tiny", "input": "Hi", "stream": True, **GREEDY}
    r = httpx.post(f"{live.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")


def test_previous_response_id_continues_as_the_full_history(live):
    client = live.client()
    url = data_url(IMG_A)
    first = client.responses.create(model="tiny", input=image_input("Describe it.", url), **GREEDY)
    second = client.responses.create(
        model="tiny", input="And the colours?", previous_response_id=first.id, instructions="Answer well.", **GREEDY
    )
    third = client.responses.create(model="tiny", input="Thanks.", previous_response_id=second.id, **GREEDY)
    history = [
        user(url, "Describe it."),
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And the colours?"},
    ]
    system = [{"role": "system", "content": "Answer well."}]
    assert second.output_text == chat(client, system + history)[0]
    assert second.previous_response_id == first.id
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Thanks."}]
    assert third.output_text == chat(client, history)[0]  # instructions are not carried over, as in OpenAI's API


def test_message_items_equal_chat_completions(live):
    client = live.client()
    items = [
        {"type": "message", "role": "developer", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi there."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "How are you?"}]},
    ]
    r = client.responses.create(model="tiny", input=items, **GREEDY)
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "How are you?"},
    ]
    assert r.output_text == chat(client, messages)[0]


def test_unknown_ids_are_404(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_nope", **GREEDY)
    error = e.value.body
    assert error["param"] == "previous_response_id" and error["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    r = httpx.post(f"{live.url}/v1/responses", json={"input": "Hi", "previous_response_id": "resp_x"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_store_false_and_delete(live):
    client = live.client()
    kept = client.responses.create(model="tiny", input="Hi", **GREEDY)
    assert client.responses.retrieve(kept.id).id == kept.id
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    unkept = client.responses.create(model="tiny", input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="Hi", previous_response_id=unkept.id, **GREEDY)


def test_text_format_json_schema_validates(live):
    client = live.client()
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["colour", "n"], "additionalProperties": False}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    r = client.responses.create(
        model="tiny", input=image_input("Main colour and a digit, as JSON.", data_url(IMG_A)), text=fmt,
        temperature=0.0, max_output_tokens=40,
    )  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    obj = client.responses.create(
        model="tiny", input="Some JSON", text={"format": {"type": "json_object"}}, temperature=0.0, max_output_tokens=40
    )
    if obj.status == "completed":
        json.loads(obj.output_text)


def test_max_output_tokens_is_incomplete(live):
    r = live.client().responses.create(model="tiny", input="Write a long story.", temperature=0.0, max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"


def test_errors_name_the_responses_fields(live):
    def post(body: dict) -> dict:
        r = httpx.post(f"{live.url}/v1/responses", json={"model": "tiny", **body}, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    assert post({})["param"] == "input"
    assert post({"input": "Hi", "max_output_tokens": 0})["param"] == "max_output_tokens"
    assert post({"input": "Hi", "text": {"format": {"type": "xml"}}})["param"] == "text.format.type"
    assert post({"input": [{"type": "web_search_call"}]})["param"] == "input[0].type"
    assert post({"input": "Hi", "tools": [{"type": "web_search"}]})["param"] == "tools[0].type"
    assert (
        post({"input": [{"role": "user", "content": [{"type": "input_file"}]}]})["param"] == "input[0].content[0].type"
    )
    schema_error = post(
        {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}}
    )
    assert schema_error["param"] == "text.format"
    r = httpx.post(f"{live.url}/v1/responses", json={"model": "other", "input": "Hi"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_function_tools_reach_the_chat_request(live):
    """Function tools map onto the chat request's `tools`: answered as /v1/chat/completions answers them (a 400
    naming `tools` while that endpoint refuses tools)."""
    tool = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
    r = httpx.post(f"{live.url}/v1/responses", json={"model": "tiny", "input": "Hi", "tools": [tool], **GREEDY})
    function = {k: v for k, v in tool.items() if k != "type"}
    c = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": [
            {"type": "function", "function": function}], "temperature": 0.0, "max_tokens": N},
        timeout=60,
    )  # fmt: skip
    assert r.status_code == c.status_code
    if r.status_code == 400:
        assert r.json()["error"]["param"] == c.json()["error"]["param"] == "tools"


def test_store_is_bounded():
    store = ResponseStore(limit=3, max_bytes=10_000)
    for i in range(5):
        store.put(Stored({"id": f"resp_{i}"}, [{"role": "user", "content": "x"}]))
    assert list(store.items) == ["resp_2", "resp_3", "resp_4"]
    store.get("resp_2")  # used: the last to go
    store.put(Stored({"id": "resp_5"}, []))
    assert list(store.items) == ["resp_4", "resp_2", "resp_5"]
    store.put(Stored({"id": "big"}, [{"content": "x" * 9_960}]))
    assert list(store.items) == ["big"] and store.bytes == store.items["big"].size
    store.put(Stored({"id": "huge"}, [{"content": "x" * 20_000}]))  # larger than the store: not kept
    assert "huge" not in store.items
