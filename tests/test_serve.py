"""`pixtral-mlx serve`: the real server on a free local port with the tiny checkpoint, talked to with the
`openai` client and raw HTTP. Replies are compared with the library's (`pixtral.generate`) token for token."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pixtral_mlx.fetch import FetchPolicy
from pixtral_mlx.generate import common_prefix, prompt_keys
from pixtral_mlx.server.app import Settings, create_app
from pixtral_mlx.server.engine import Engine

N = 8  # tokens per reply: enough to compare, small enough to stay fast
GREEDY = {"temperature": 0.0, "max_tokens": N}


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG that claims a huge size (only the header is ever read)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


IMG_A, IMG_B, IMG_C = png(40, 24, 0), png(24, 56, 1), png(33, 33, 2)
IMG_D, IMG_E = png(44, 20, 3), png(20, 44, 4)  # only the multi-turn test uses these: new to the feature cache


class Images(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path in ("/b.png", "/e.png"):
            data = IMG_B if self.path == "/b.png" else IMG_E
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/slow.png":  # headers, then a body that never comes in time
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMG_B)))
            self.end_headers()
            try:
                for byte in IMG_B[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def image_host():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "c.png").write_bytes(IMG_C)
    (outside / "secret.png").write_bytes(IMG_A)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    return allowed, outside


class Live:
    """The real app under uvicorn on a free 127.0.0.1 port, in this process (so tests can read the engine)."""

    def __init__(self, mlx_dir: Path, settings: Settings, queue_size: int = 16):
        import uvicorn

        import pixtral_mlx

        self.engine = Engine(lambda: pixtral_mlx.load(str(mlx_dir)), queue_size=queue_size)
        self.engine.start()
        assert self.engine.ready.wait(300) and self.engine.load_error is None
        settings.context_length = self.engine.pixtral.context_length
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings, self.engine), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive()
            time.sleep(0.05)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()


@pytest.fixture(scope="module")
def live(mlx_dir, folders):
    allowed, _ = folders
    private_ok = FetchPolicy.server(allow_private=True)  # image_host is on 127.0.0.1
    settings = Settings(model_id="tiny", local_dirs=[allowed.resolve()], image_timeout=1.0, fetch_policy=private_ok)
    server = Live(mlx_dir, settings)
    yield server
    server.close()


@pytest.fixture(scope="module")
def guarded(mlx_dir):
    """A server with an API key, a queue of one and a small body limit."""
    server = Live(mlx_dir, Settings(model_id="tiny", api_key="sekrit", max_body=1 << 20), queue_size=1)
    yield server
    server.close()


def user(*parts: str) -> dict:
    """A user message: parts that are image URLs or paths become `image_url` parts, the others text."""

    def part(p: str) -> dict:
        if p.startswith(("data:", "http://", "https://", "file://", "/")):
            return {"type": "image_url", "image_url": {"url": p}}
        return {"type": "text", "text": p}

    return {"role": "user", "content": [part(p) for p in parts]}


def ask(client: openai.OpenAI, messages: list, stream: bool = False, **options) -> tuple[str, list[int], dict, str]:
    """(text, token ids, usage, finish_reason) of one request, through the openai client."""
    extra = {"return_token_ids": True}
    options = {**GREEDY, **options}
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, extra_body=extra, **options)
        choice = r.choices[0]
        return choice.message.content, choice.token_ids, r.usage.model_dump(), choice.finish_reason
    text, ids, usage, finish = [], None, None, None
    usage_too = {"include_usage": True}
    chunks = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options=usage_too, extra_body=extra, **options
    )
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                finish, ids = choice.finish_reason, choice.token_ids
    return "".join(text), ids, usage, finish


def expected(pixtral, messages, **options):
    reply = pixtral.generate(messages, **{**GREEDY, **options})
    return reply.text, reply.tokens, reply.finish_reason


# --- replies equal the library's ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_one_image_equals_the_library(live, pixtral, stream):
    messages = [user(data_url(IMG_A), "What is in this picture?")]
    text, ids, usage, finish = ask(live.client(), messages, stream=stream)
    assert (text, ids, finish) == expected(pixtral, messages)
    assert usage["prompt_tokens"] == len(pixtral.encode(messages)) and usage["completion_tokens"] == len(ids)


def test_several_images_from_every_source_equal_the_library(live, pixtral, image_host, folders):
    allowed, _ = folders
    messages = [user(data_url(IMG_A), f"{image_host}/b.png", "Compare", f"file://{allowed / 'c.png'}", "these.")]
    reply = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": "tiny", "messages": messages, "return_token_ids": True, **GREEDY},
        timeout=60,
    ).json()
    prompt = pixtral.encode(messages)
    assert len(prompt.images) == 3 and reply["prompt_token_ids"] == prompt.tokens  # exactly model.encode(messages)
    choice = reply["choices"][0]
    assert (choice["message"]["content"], choice["token_ids"], choice["finish_reason"]) == expected(pixtral, messages)
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny" and reply["id"].startswith("chatcmpl-")


def test_response_format_json_schema_equals_the_library(live, pixtral):
    """OpenAI's `response_format` maps to the library's structured output: the reply parses, validates and
    equals `generate(json_schema=...)` token for token."""
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["colour", "n"], "additionalProperties": False}  # fmt: skip
    messages = [user(data_url(IMG_A), "Main colour and a digit, as JSON.")]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    text, ids, _, finish = ask(live.client(), messages, response_format=fmt, max_tokens=40)
    assert (text, ids, finish) == expected(pixtral, messages, json_schema=schema, max_tokens=40)
    assert finish == "stop" and set(json.loads(text)) == {"colour", "n"}


def test_seeded_sampling_equals_the_library(live, pixtral):
    messages = [user(data_url(IMG_C), "A story, please.")]
    options = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    got = ask(live.client(), messages, stream=True, **options)
    assert got[:2] == expected(pixtral, messages, **options)[:2]


def test_multi_turn_chat_keeps_each_image_in_its_turn_and_reuses_the_prefix(live, pixtral, image_host):
    client, engine = live.client(), live.engine
    turns = [
        user(data_url(IMG_D), "What is this?"),
        {"role": "user", "content": "And its colour?"},
        user(f"{image_host}/e.png", "And this one?"),
    ]
    messages: list = []
    seen = []
    for i, turn in enumerate(turns):
        messages.append(turn)
        before_keys, before_runs = list(engine.cache.keys), engine.pixtral.vision_runs
        text, ids, usage, finish = ask(client, messages, stream=i == 1)
        assert (text, ids, finish) == expected(pixtral, messages)  # images stay in turns 1 and 3
        encoded = pixtral.encode(messages)
        prompt = prompt_keys(encoded.tokens, encoded.images, pixtral.args.image_token_id)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert usage["prompt_tokens"] == len(prompt)
        assert cached == min(common_prefix(before_keys, prompt), len(prompt) - 1)
        assert engine.records[-1].prefilled == len(prompt) - cached
        seen.append((len(prompt), cached, engine.pixtral.vision_runs - before_runs))
        messages.append({"role": "assistant", "content": text})
    assert seen[1][1] >= seen[0][0] and seen[2][1] >= seen[1][0]  # each turn reuses at least the previous prompt
    assert [runs for *_, runs in seen] == [1, 0, 1]  # the vision encoder ran for new images only
    print(f"\n[serve] multi-turn (prompt tokens, cached, images encoded): {seen}")


def test_same_sized_images_in_turn_never_share_cached_keys_and_values(live, pixtral):
    for seed in (20, 21, 20):
        messages = [user(data_url(png(40, 24, seed)), "What is in this picture?")]
        assert ask(live.client(), messages)[:2] == expected(pixtral, messages)[:2], seed


def test_stop_strings_through_the_server(live, pixtral):
    messages = [{"role": "user", "content": "Say something."}]
    full, _, _ = expected(pixtral, messages)
    stop = full[2:5]
    for stream in (False, True):
        text, _, _, finish = ask(live.client(), messages, stream=stream, stop=[stop])
        assert text == full[: full.find(stop)] and finish == "stop"


# --- concurrency, queue, disconnects ----------------------------------------------------------------------


def test_eight_concurrent_streams_each_equal_their_sequential_run(live, pixtral):
    requests = []
    for i in range(8):
        parts = [data_url([IMG_A, IMG_B, IMG_C][i % 3])] if i % 2 else []
        options = {"temperature": 0.8, "seed": 100 + i} if i >= 6 else {}
        requests.append(([user(*parts, f"Request number {i}.")], options))
    sequential = [expected(pixtral, m, **o)[:2] for m, o in requests]
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        messages, options = requests[i]
        results[i] = ask(live.client(), messages, stream=True, **options)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8))
    for i in range(8):
        assert results[i][:2] == sequential[i], f"request {i}"
        assert results[i][3] == "length"


def test_queue_full_429_and_disconnect_frees_the_engine(guarded, pixtral):
    """A runs (long), B waits (the queue holds one), C gets 429; A's client leaves, B runs at once."""
    auth = {"Authorization": "Bearer sekrit"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "stream": True}
    body["temperature"] = 0  # greedy: this prompt runs for thousands of tokens without an end-of-sequence
    chat = f"{guarded.url}/v1/chat/completions"
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", chat, json={**body, "max_tokens": 100000}, headers=auth) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            while '"content": ""' in (line := next(lines)) or not line:  # wait for real tokens: A is decoding
                pass
            b_messages = [{"role": "user", "content": "Short one."}]
            b_result: queue.Queue = queue.Queue()
            b_thread = threading.Thread(
                target=lambda: b_result.put((ask(guarded.client(api_key="sekrit"), b_messages), time.monotonic()))
            )
            b_thread.start()
            while guarded.engine.waiting() < 1:
                time.sleep(0.01)
            c = http.post(chat, json={**body, "max_tokens": 4}, headers=auth)
            assert c.status_code == 429 and int(c.headers["Retry-After"]) >= 1
            assert c.json()["error"]["code"] == "queue_full" and c.json()["error"]["type"] == "rate_limit_error"
            health = httpx.get(f"{guarded.url}/health").json()
            assert health == {"status": "ok", "model": "tiny", "busy": True, "queued": 1}
            left = time.monotonic()
        # A's connection is closed here.
        b_thread.join(120)
    (b_text, b_ids, _, b_finish), b_done = b_result.get_nowait()
    assert (b_text, b_ids, b_finish) == expected(pixtral, b_messages)
    a_record = [r for r in guarded.engine.records if r.finish_reason == "cancelled"][-1]
    assert 0 < a_record.generation_tokens < 100000
    print(f"\n[serve] engine free for the next request {b_done - left:.3f} s after the client left "
          f"(A stopped after {a_record.generation_tokens} tokens)")  # fmt: skip


def test_a_request_whose_client_left_while_queued_is_skipped(guarded):
    auth = {"Authorization": "Bearer sekrit"}
    long = {"model": "tiny", "messages": [{"role": "user", "content": "Keep going."}], "max_tokens": 100000}
    long["temperature"] = 0  # greedy: this prompt runs for thousands of tokens without an end-of-sequence
    chat = f"{guarded.url}/v1/chat/completions"
    records = guarded.engine.records
    n0 = len(records)
    outcome: list = []

    def impatient() -> None:  # waits 1 s for its reply (it is queued behind A), then hangs up
        try:
            r = httpx.post(chat, json={**long, "max_tokens": 5}, headers=auth, timeout=httpx.Timeout(60, read=1.0))
            outcome.append((r.status_code, r.text))
        except httpx.ReadTimeout as e:
            outcome.append(e)

    with httpx.Client(timeout=120) as http:
        with http.stream("POST", chat, json={**long, "stream": True}, headers=auth) as a:
            lines = a.iter_lines()  # kept: dropping the iterator would close A's connection
            next(lines)  # A has started
            waiting = threading.Thread(target=impatient)
            waiting.start()
            waiting.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.ReadTimeout), outcome
    deadline = time.monotonic() + 60
    while len(records) < n0 + 2 or records[n0 + 1].finish_reason is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a_record, skipped = records[n0], records[n0 + 1]
    assert a_record.finish_reason == "cancelled" and 0 < a_record.generation_tokens < 100000
    assert (skipped.finish_reason, skipped.prompt_tokens, skipped.generation_tokens) == ("cancelled", 0, 0)


def test_api_key(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        r = httpx.get(f"{guarded.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key" and set(r.json()["error"]) == {
            "message", "type", "param", "code"}  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    models = guarded.client(api_key="sekrit").models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].input_modalities == ["text", "image"]
    big = httpx.post(
        f"{guarded.url}/v1/chat/completions", content=b"x" * (2 << 20), headers={"Authorization": "Bearer sekrit"}
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


# --- bad requests: status, OpenAI's error shape, and the server keeps serving ---------------------------------


def bad_requests(image_host: str, allowed: Path, outside: Path) -> list:
    msg = [{"role": "user", "content": "hi"}]

    def img(url: str) -> list:
        return [user(url, "hi")]

    param0 = "messages.[0].content.[0].image_url"
    unreachable = "not reachable from this server"  # one sentence for every failed fetch (test_fetch_policy.py)
    return [
        # (body, status, param, code, words in the message)
        (b"{not json", 400, None, None, "not valid JSON"),
        (b"[1, 2]", 400, None, None, "JSON object"),
        ({"model": "tiny"}, 400, "messages", None, "'messages' is required"),
        ({"messages": []}, 400, "messages", None, "messages"),
        ({"messages": msg, "temperature": "hot"}, 400, "temperature", None, "valid number"),
        ({"messages": msg, "max_tokens": 2.5}, 400, "max_tokens", None, "valid integer"),
        ({"messages": msg, "max_tokens": 0}, 400, "max_tokens", None, "at least 1"),
        ({"messages": msg, "max_completion_tokens": -3}, 400, "max_completion_tokens", None, "max_completion_tokens"),
        ({"messages": msg, "top_p": 0}, 400, "top_p", None, "greater than 0"),
        ({"messages": msg, "seed": -1}, 400, "seed", None, "seed"),
        ({"messages": msg, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None, "at most 4"),
        ({"messages": msg, "stop": [1]}, 400, "stop", None, "valid string"),
        ({"messages": msg, "max_edge": 8}, 400, "max_edge", None, "between"),
        ({"messages": msg, "max_edge": 1400}, 400, "max_edge", None, "this model's image size of 1024 pixels"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.[0].tool_call_id", None, "tool_call_id"),
        ({"messages": msg, "n": 9}, 400, "n", "unsupported_parameter", "1 to 8"),
        ({"messages": msg, "tools": [{"type": "function"}]}, 400, "tools", None, "name"),
        ({"messages": msg, "top_logprobs": 3}, 400, "top_logprobs", None, "logprobs"),
        ({"messages": msg, "modalities": ["text", "audio"]}, 400, "modalities", "unsupported_parameter", "text only"),
        ({"messages": msg, "frequency_penalty": 2.5}, 400, "frequency_penalty", None, "from -2 to 2"),
        (
            {"messages": msg, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format",
            None,
            "needs",
        ),  # fmt: skip
        (
            {"messages": msg, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            400,
            "response_format",
            None,
            "json_schema",
        ),  # fmt: skip
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            400,
            "messages.[0].content.[0].type",
            "unsupported_content",
            "'input_audio'",
        ),  # fmt: skip
        ({"messages": [user(data_url(IMG_A))], "model": "gpt-4o"}, 404, "model", "model_not_found", "'tiny'"),
        ({"messages": img("data:image/png;base64,!!!")}, 400, param0, "invalid_image", "data:"),
        ({"messages": img(data_url(b"not an image at all"))}, 400, param0, "invalid_image", "not an image"),
        ({"messages": img(data_url(huge_png_header()))}, 400, param0, "invalid_image", "100 MP limit"),
        ({"messages": img(f"{image_host}/missing.png")}, 400, param0, "invalid_image", unreachable),
        ({"messages": img("http://127.0.0.1:9/x.png")}, 400, param0, "invalid_image", unreachable),
        ({"messages": img(f"{image_host}/slow.png")}, 400, param0, "invalid_image", unreachable),
        ({"messages": img(f"{image_host}/to-file")}, 400, param0, "invalid_image", unreachable),
        ({"messages": img(str(outside / "secret.png"))}, 400, param0, "invalid_image_url", "outside"),
        ({"messages": img(f"file://{outside / 'secret.png'}")}, 400, param0, "invalid_image_url", "outside"),
        ({"messages": img(f"{allowed}/../outside/secret.png")}, 400, param0, "invalid_image_url", "outside"),
        ({"messages": img(str(allowed / "link.png"))}, 400, param0, "invalid_image_url", "outside"),
        ({"messages": img(str(allowed / "nope.png"))}, 400, param0, "invalid_image", "no such file"),
        (
            {"messages": [{"role": "user", "content": "hello " * 135000}], "max_tokens": 4},
            400,
            "messages",
            "context_length_exceeded",
            "context",
        ),  # fmt: skip
    ]


JSON = {"Content-Type": "application/json"}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live, pixtral, image_host, folders):
    allowed, outside = folders
    failures = []
    with httpx.Client(timeout=60) as http:
        for body, status, param, code, words in bad_requests(image_host, allowed, outside):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"{live.url}/v1/chat/completions", content=content, headers=JSON)
            error = r.json().get("error", {})
            got = (r.status_code, error.get("param"), error.get("code"), set(error))
            if got != (status, param, code, {"message", "type", "param", "code"}) or words not in error["message"]:
                failures.append((str(body)[:80], got, error.get("message")))
        assert not failures, failures
        for path, status in (("/nope", 404), ("/v1/completions", 404)):
            r = http.get(f"{live.url}{path}")
            assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get(f"{live.url}/v1/chat/completions")
        assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    messages = [user(data_url(IMG_B), "Still there?")]
    assert ask(live.client(), messages)[:2] == expected(pixtral, messages)[:2]  # served as if nothing happened
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=9)
    assert e.value.status_code == 400 and e.value.param == "n"


def test_max_edge_extension_shrinks_images(live, pixtral):
    big = png(300, 200, 5)
    messages = [user(data_url(big), "Describe.")]
    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"messages": messages, "max_edge": 64, "return_token_ids": True, **GREEDY},
        timeout=60,
    ).json()
    assert r["prompt_token_ids"] == pixtral.encode(messages, max_edge=64).tokens
    assert r["usage"]["prompt_tokens"] < len(pixtral.encode(messages))
    assert r["choices"][0]["token_ids"] == pixtral.generate(messages, max_edge=64, **GREEDY).tokens


# --- the command ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_end_to_end(mlx_dir, pixtral):
    port = free_port()
    env = {**os.environ, "PIXTRAL_MLX_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixtral_mlx", "serve", "--model", str(mlx_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == [mlx_dir.name]
        messages = [user(data_url(IMG_A), "Hi")]
        r = client.chat.completions.create(model=mlx_dir.name, messages=messages, **GREEDY)
        assert r.choices[0].message.content == expected(pixtral, messages)[0]
        # the --model argument itself is accepted as the model name too
        r = client.chat.completions.create(model=str(mlx_dir), messages=messages, **GREEDY)
        assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"OpenAI-compatible API at http://127.0.0.1:{port}/v1" in out and "Traceback" not in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "error: --port must be from 0 to 65535, got 70000."),
        (["--queue", "0"], "error: --queue must be at least 1, got 0."),
        (["--max-edge", "5000"], "error: --max-edge must be between 16 and 1540 pixels (a whole number), got 5000."),
        (["--max-tokens", "0"], "error: --max-tokens must be a whole number of at least 1, got 0."),
        (["--allow-local-files", "/no/such/dir"], "error: --allow-local-files /no/such/dir: no such folder."),
        (["--host", "no.such.host.invalid"], "error: --host no.such.host.invalid: not an address of this machine"),
    ],
)
def test_bad_flags_are_one_sentence_before_loading(flags, message):
    run = subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", "serve", "--model", "/no/model", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.startswith(message) and len(run.stderr.strip().splitlines()) == 1


def test_max_edge_above_the_loaded_models_image_size_is_one_sentence(mlx_dir):
    # 1400 passes the flag check (the family's largest is 1540) but the tiny Pixtral's images are at most 1024
    run = subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", "serve", "--model", str(mlx_dir), "--port", "0", "--max-edge", "1400"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --max-edge 1400 is above this model's image size of 1024 pixels: use 1024 or less."
    )
    assert "Traceback" not in run.stderr


def test_port_in_use_is_one_sentence():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "pixtral_mlx", "serve", "--model", "/no/model", "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 2 and run.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port} (")
    assert "Traceback" not in run.stderr


def test_serve_help_imports_nothing_heavy():
    probe = (
        "import sys\nfrom pixtral_mlx.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('mlx.core', 'mlx_lm', 'uvicorn', 'starlette', 'torch') if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in run.stdout and "--allow-local-files" in run.stdout, run.stdout + run.stderr
