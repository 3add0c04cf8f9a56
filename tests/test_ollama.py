"""Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/version`) on the real server with
the tiny checkpoint: replies equal the OpenAI endpoint's for the same messages, streamed lines parse and end
with `done` and counts that match, errors are Ollama's `{"error": "..."}`, and the Host/Origin guard applies."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from test_serve import IMG_A, IMG_C, Live, data_url, user

from pixtral_mlx.server.app import Settings

N = 8
GREEDY = {"temperature": 0, "num_predict": N}


@pytest.fixture(scope="module")
def live(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny", aliases=("some/folder/tiny",)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def keyed(mlx_dir):
    server = Live(mlx_dir, Settings(model_id="tiny", api_key="sekrit"), queue_size=1)
    yield server
    server.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(server: Live, path: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def lines(response: httpx.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def openai(server: Live, messages: list, **options) -> dict:
    """The OpenAI endpoint's reply to the same messages (greedy, N tokens unless told)."""
    body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": N, **options}
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def check_final(last: dict, reference: dict) -> None:
    """The `done` line: why it ended and counts that match the OpenAI reply's usage (durations in ns)."""
    usage = reference["usage"]
    assert last["done"] is True and last["done_reason"] == reference["choices"][0]["finish_reason"]
    assert last["prompt_eval_count"] == usage["prompt_tokens"] and last["eval_count"] == usage["completion_tokens"]
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0
    assert last["total_duration"] >= last["eval_duration"] > 0
    assert last["model"] in ("tiny", "tiny:latest") and last["created_at"].endswith("Z")  # the name the client sent


# --- /api/chat -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_an_image_equals_the_openai_endpoint(live, stream):
    question = "What is in this picture?"
    reference = openai(live, [user(data_url(IMG_A), question)])
    want = reference["choices"][0]["message"]["content"]
    assert reference["usage"]["completion_tokens"] == N and want
    body = {"model": "tiny", "messages": [{"role": "user", "content": question, "images": [b64(IMG_A)]}]}
    r = post(live, "/api/chat", {**body, "stream": stream, "options": GREEDY})
    assert r.status_code == 200, r.text
    if not stream:
        reply = r.json()
        assert reply["message"] == {"role": "assistant", "content": want}
        check_final(reply, reference)
        return
    got = lines(r)
    assert all(line["done"] is False and line["message"]["role"] == "assistant" for line in got[:-1])
    assert "".join(line["message"]["content"] for line in got) == want
    assert len(got) >= 2 and got[-1]["message"]["content"] == ""
    check_final(got[-1], reference)


def test_chat_streams_by_default_and_keeps_a_conversation(live):
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Describe it.", "images": [b64(IMG_C)]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And the colours?"},
    ]
    reference = openai(
        live,
        [history[0], user(data_url(IMG_C), "Describe it."), history[2], history[3]],
        max_tokens=5,
    )
    body = {"model": "tiny:latest", "messages": history, "options": {**GREEDY, "num_predict": 5}, "keep_alive": "5m"}
    got = lines(post(live, "/api/chat", body))  # no "stream": Ollama streams by default
    assert "".join(line["message"]["content"] for line in got) == reference["choices"][0]["message"]["content"]
    check_final(got[-1], reference)
    assert got[-1]["done_reason"] == "length"


def test_chat_options_map_to_the_request(live):
    question = [{"role": "user", "content": "Count: one, two"}]
    stop_at = openai(live, question, max_tokens=12)["choices"][0]["message"]["content"]
    options = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "num_predict": 6}
    sampled = openai(live, question, temperature=0.9, top_p=0.95, seed=1234, max_tokens=6)
    r = post(live, "/api/chat", {"model": "tiny", "messages": question, "stream": False, "options": options})
    assert r.json()["message"]["content"] == sampled["choices"][0]["message"]["content"]
    assert r.json()["eval_count"] == 6
    if len(stop_at) > 3:  # a stop string from the greedy reply's middle: the reply ends before it
        stop = stop_at[2:4]
        body = {"model": "tiny", "messages": question, "stream": False, "options": {"temperature": 0, "stop": [stop]}}
        reply = post(live, "/api/chat", body).json()
        assert stop not in reply["message"]["content"] and reply["done_reason"] == "stop"


def test_format_json_and_a_schema_give_json_that_parses(live):
    """`format: "json"` is OpenAI's json_object (the same reply, and it parses), a schema its json_schema."""
    messages = [{"role": "user", "content": "A colour, as JSON.", "images": [b64(IMG_A)]}]
    options = {"temperature": 0.35, "seed": 5, "num_predict": 30}  # a seed whose reply closes
    body = {"model": "tiny", "messages": messages, "stream": False, "format": "json", "options": options}
    reply = post(live, "/api/chat", body).json()
    reference = openai(
        live, [user(data_url(IMG_A), "A colour, as JSON.")], response_format={"type": "json_object"},
        temperature=0.35, seed=5, max_tokens=30,
    )  # fmt: skip
    assert reply["message"]["content"] == reference["choices"][0]["message"]["content"]
    assert reply["done_reason"] == "stop" and isinstance(json.loads(reply["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    body = {"model": "tiny", "prompt": "A digit, as JSON.", "stream": False, "format": schema}
    body["options"] = {"num_predict": 40}
    reply = post(live, "/api/generate", body).json()
    assert reply["done_reason"] == "stop" and set(json.loads(reply["response"])) == {"n"}
    bad = post(live, "/api/chat", {**body, "messages": messages, "format": {"type": 5}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("format")


# --- /api/generate ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_generate_with_system_and_prompt_equals_the_openai_endpoint(live, stream):
    system, prompt = "Answer in one word.", "What is this?"
    reference = openai(live, [{"role": "system", "content": system}, user(data_url(IMG_C), prompt)])
    want = reference["choices"][0]["message"]["content"]
    body = {"model": "tiny", "system": system, "prompt": prompt, "images": [b64(IMG_C)], "stream": stream}
    r = post(live, "/api/generate", {**body, "options": GREEDY})
    assert r.status_code == 200, r.text
    if stream:
        got = lines(r)
        assert "".join(line["response"] for line in got) == want
        last = got[-1]
    else:
        last = r.json()
        assert last["response"] == want
    check_final(last, reference)
    assert "context" not in last


def test_generate_refuses_what_it_cannot_honour(live):
    for extra, word in (
        ({"raw": True}, "raw"),
        ({"context": [1, 2, 3]}, "context"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"suffix": "end"}, "suffix"),
        ({"think": True}, "thinking"),
    ):
        r = post(live, "/api/generate", {"model": "tiny", "prompt": "hi", **extra})
        assert r.status_code == 400 and word in r.json()["error"], (extra, r.text)
    ok = post(live, "/api/generate", {"model": "tiny", "prompt": "hi", "raw": False, "context": [], "stream": False,
                                      "options": {"num_predict": 2}})  # fmt: skip
    assert ok.status_code == 200 and ok.json()["done"] is True


def test_an_empty_request_loads_the_model(live):
    """Ollama clients "load" a model with an empty prompt or no messages: answered at once, nothing generated."""
    r = post(live, "/api/generate", {"model": "tiny"})
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = post(live, "/api/chat", {"model": "tiny", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"]["content"] == ""


# --- errors ----------------------------------------------------------------------------------------------------


def test_errors_are_ollamas_shape(live):
    for path in ("/api/chat", "/api/generate", "/api/show"):
        r = post(live, path, {"model": "llama3", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
        assert (r.status_code, r.json()) == (404, {"error": "model 'llama3' not found"})
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": msg, "options": {"temperature": "hot"}}, "options.temperature"),
        ({"messages": msg, "options": {"num_predict": 0}}, "options.num_predict"),
        ({"messages": msg, "options": {"temperature": -1}}, "options.temperature"),
        ({"messages": [{"role": "user", "content": "hi", "images": ["bm90IGFuIGltYWdl"]}]}, "image"),
        ({"messages": [{"role": "assistant", "content": "hi", "images": [b64(IMG_A)]}]}, "only user messages"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool"),
        ({"messages": msg, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": msg, "format": "yaml"}, "format"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ]
    for body, word in cases:
        r = post(live, "/api/chat", {"model": "tiny", **body})
        assert r.status_code == 400 and word in r.json()["error"], (body, r.text)
    r = httpx.post(f"{live.url}/api/chat", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = httpx.post(f"{live.url}/api/chat", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and isinstance(r.json()["error"], str)


def test_the_guard_and_the_api_key_apply(live, keyed):
    evil = {"Origin": "https://evil.example"}
    for r in (
        httpx.post(f"{live.url}/api/chat", json={"model": "tiny", "messages": []}, headers=evil),
        httpx.post(f"{live.url}/api/generate", json={"model": "tiny", "prompt": "hi"}, headers=evil),
        httpx.get(f"{live.url}/api/tags", headers=evil),
        httpx.get(f"{live.url}/api/tags", headers={"Host": "attacker.example"}),
    ):
        assert r.status_code == 403, r.text
    assert httpx.get(f"{live.url}/api/tags", headers={"Origin": live.url}).status_code == 200  # its own pages
    assert httpx.get(f"{keyed.url}/api/tags").status_code == 401
    assert post(keyed, "/api/chat", {"model": "tiny", "messages": []}).status_code == 401
    r = post(keyed, "/api/chat", {"model": "tiny", "messages": []}, Authorization="Bearer sekrit")
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    assert httpx.get(f"{keyed.url}/api/version").status_code == 200  # a probe, like /health


# --- the model -------------------------------------------------------------------------------------------------


def test_tags_show_and_version(live):
    version = httpx.get(f"{live.url}/api/version").json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 5, 0]
    models = httpx.get(f"{live.url}/api/tags").json()["models"]
    assert len(models) == 1
    entry = models[0]
    assert entry["name"] == entry["model"] == "tiny:latest"
    assert entry["size"] > 0 and len(entry["digest"]) == 64 and entry["modified_at"].endswith("Z")
    details = entry["details"]
    assert details["family"] == "pixtral" and details["format"] == "mlx"
    assert details["quantization_level"] == "F32"  # the test checkpoint is float32
    assert details["parameter_size"][-1] in "KMB" and details["parameter_size"][0].isdigit()
    pixtral = live.engine.pixtral
    for name in ("tiny", "tiny:latest", "some/folder/tiny"):
        show = post(live, "/api/show", {"model": name}).json()
        assert show["capabilities"] == ["completion", "vision"] and show["details"] == details
        info = show["model_info"]
        assert info["general.architecture"] == "pixtral"
        assert info["pixtral.context_length"] == pixtral.context_length
        assert info["pixtral.block_count"] == pixtral.args.text.num_hidden_layers
        assert info["general.parameter_count"] > 0
    assert post(live, "/api/show", {"name": "tiny"}).status_code == 200  # older clients send "name"
    assert post(live, "/api/show", {}).status_code == 400
    assert httpx.get(f"{live.url}/api/ps").json()["models"][0]["name"] == "tiny:latest"
