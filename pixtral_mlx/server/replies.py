"""The reply to a chat request: OpenAI's objects built from the engine's chunks, sent whole (`Reply.collect`)
or as server-sent events (`EventStream`), the job cancelled once its client is gone; errors in OpenAI's shape
(`library_error`, `json_error`); the model card of /v1/models.

With `tools`, a choice whose tokens reach the `[TOOL_CALLS]` token is a tool call: its text from there on is held
back and, at its end, parsed (`tools.parse_tool_calls`) into `message.tool_calls` (`content` null unless text came
before) with `finish_reason` "tool_calls". Streamed, each call is sent as one `delta.tool_calls` entry with its
index, id, type and name, then one with its whole `arguments` (not token by token: they are only known to parse
once the call is complete). A call that does not parse (cut by max_tokens) is sent as the text it was.

A reasoning model's thinking (`[THINK]…[/THINK]`, the chunks' `reasoning`) is `message.reasoning_content` next to
`content`, and streamed as `delta.reasoning_content` (vLLM's convention); a reply without thinking has no such
field. Tool calls are parsed from the answer's tokens only."""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pixtral_mlx.errors import ContextError, ImageError, PixtralError

from .engine import Job
from .schema import APIError, ChatRequest
from .settings import Settings


class Reply:
    """Builds the OpenAI objects of one reply (its `n` choices) from the engine's chunks."""

    def __init__(self, request: ChatRequest, model_id: str, start: dict[str, Any]):
        self.request = request
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = start["prompt_tokens"]
        self.prompt_token_ids = start["prompt_token_ids"]
        self.tokenizer = start.get("tokenizer")  # tekken: the texts and bytes of logprobs' tokens
        self.n = request.n or 1
        self.choice_ids: list[list[int]] = [[] for _ in range(self.n)]  # each choice's token ids
        self.lasts: list[Any] = [None] * self.n  # each choice's last chunk
        options = request.stream_options
        self.include_usage = options is not None and options.include_usage
        self.tool_calls_id: int | None = None  # [TOOL_CALLS]: where a choice's tool calls start
        if request.tools and request.tool_choice != "none" and self.tokenizer is not None:
            from pixtral_mlx.tools import special_id

            self.tool_calls_id = special_id(self.tokenizer, "[TOOL_CALLS]")

    def calls(self, index: int) -> tuple[str, list[dict[str, Any]]] | None:
        """(content, tool calls) of choice `index` once it ended, if it is a tool call."""
        last = self.lasts[index]
        if self.tool_calls_id is None or last is None or last.finish_reason != "stop":
            return None
        from pixtral_mlx.reasoning import answer_tokens
        from pixtral_mlx.tools import parse_tool_calls

        return parse_tool_calls(self.tokenizer, answer_tokens(self.tokenizer, self.choice_ids[index]))

    @property
    def token_ids(self) -> list[int]:
        return self.choice_ids[0]

    def usage(self, last: Any = None) -> dict[str, Any]:
        """The usage of every choice: the prompt once, the completion tokens of all of them (`last`: the first
        choice's last chunk when the choices' own are not known)."""
        lasts = [c for c in self.lasts if c is not None] or ([last] if last is not None else [])
        first = self.lasts[0] if self.lasts[0] is not None else last
        cached = self.prompt_tokens - first.prompt_tokens if first is not None else 0
        completion = sum(c.generation_tokens for c in lasts)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        from pixtral_mlx.reasoning import split_tokens, think_ids

        ids = think_ids(self.tokenizer)
        if ids is not None:  # a reasoning model: the thinking's tokens, [THINK] and [/THINK] included
            answers = sum(len(split_tokens(tokens, ids)[1]) for tokens in self.choice_ids)
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(map(len, self.choice_ids)) - answers}
        return usage

    async def indexed(self, job: Job) -> AsyncIterator[tuple[int, Any]]:
        """(choice index, chunk) until the job's end, the token ids and each choice's last chunk kept; an engine
        error mid-reply is raised."""
        index = 0
        while True:
            kind, value = await job.events.get()
            if kind == "end":
                return
            if kind == "error":
                raise library_error(value)
            if kind == "choice":
                index = value
                continue
            if value.token is not None:
                self.choice_ids[index].append(value.token)
            self.lasts[index] = value
            yield index, value

    async def chunks(self, job: Job) -> AsyncIterator[Any]:
        """The job's chunks (of every choice, in order) until its end; an engine error mid-reply is raised."""
        async for _, chunk in self.indexed(job):
            yield chunk

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text, data = token_text(self.tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(data)}

    def logprobs(self, chunk: Any) -> list[dict[str, Any]]:
        """OpenAI's `logprobs.content` entries of a chunk: one for its token, if it has one and logprobs."""
        if not self.request.logprobs or chunk.token is None or chunk.logprob is None:
            return []
        entry = self._token(chunk.token, chunk.logprob)
        entry["top_logprobs"] = [self._token(t, lp) for t, lp in chunk.top_logprobs]
        return [entry]

    async def collect(self, job: Job) -> dict[str, Any]:
        """The whole reply, as one `chat.completion` object."""
        texts: list[list[str]] = [[] for _ in range(self.n)]
        thoughts: list[list[str]] = [[] for _ in range(self.n)]
        entries: list[list[dict[str, Any]]] = [[] for _ in range(self.n)]
        async for i, chunk in self.indexed(job):
            texts[i].append(chunk.text)
            thoughts[i].append(chunk.reasoning)
            entries[i] += self.logprobs(chunk)
        choices = []
        for i in range(self.n):
            last = self.lasts[i]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(texts[i])}
            finish = last.finish_reason if last is not None else None
            parsed = self.calls(i)
            if parsed is not None:
                message, finish = (
                    {"role": "assistant", "content": parsed[0] or None, "tool_calls": parsed[1]},
                    "tool_calls",
                )
            if "".join(thoughts[i]):
                message["reasoning_content"] = "".join(thoughts[i])
            choice = {
                "index": i,
                "message": message,
                "logprobs": {"content": entries[i], "refusal": None} if self.request.logprobs else None,
                "finish_reason": finish,
            }
            if self.request.return_token_ids:
                choice["token_ids"] = list(self.choice_ids[i])
            choices.append(choice)
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": None,
        }
        if self.request.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    def event(
        self,
        delta: dict[str, Any] | None,
        finish: str | None = None,
        usage: Any = None,
        index: int = 0,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> str:
        """One server-sent event: a `chat.completion.chunk` of choice `index` (`delta` None: the usage-only
        last one)."""
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
            "finish_reason": finish,
        }
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": None,
            "choices": [] if delta is None else [choice],
        }
        if self.include_usage:
            data["usage"] = usage
        if finish is not None and self.request.return_token_ids:
            data["choices"][0]["token_ids"] = list(self.choice_ids[index])
            data["prompt_token_ids"] = self.prompt_token_ids
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, job: Job) -> AsyncIterator[str]:
        """The reply as server-sent events, up to `data: [DONE]`: each choice opens with its role, streams its
        content (with its tokens' logprobs when asked) and ends with its finish reason; the usage comes last."""
        started = {0}
        held: dict[int, list[str]] = {}  # a choice's text from its [TOOL_CALLS] on, until it parses or not
        yield self.event({"role": "assistant", "content": ""})
        ended = True
        async for i, chunk in self.indexed(job):
            if i not in started:
                started.add(i)
                yield self.event({"role": "assistant", "content": ""}, index=i)
            entries = self.logprobs(chunk)
            if self.tool_calls_id is not None and chunk.token == self.tool_calls_id:
                held.setdefault(i, [])
            if chunk.reasoning:
                yield self.event({"reasoning_content": chunk.reasoning}, index=i)
            if i in held:
                held[i].append(chunk.text)
            elif chunk.text or entries:
                yield self.event({"content": chunk.text}, index=i, logprobs=entries)
            ended = chunk.finish_reason is not None
            if ended:
                parsed = self.calls(i) if i in held else None
                if parsed is not None:
                    for k, call in enumerate(parsed[1]):
                        fn = call["function"]
                        head = {"index": k, "id": call["id"], "type": "function"}
                        yield self.event(
                            {"tool_calls": [{**head, "function": {"name": fn["name"], "arguments": ""}}]}, index=i
                        )
                        yield self.event(
                            {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}, index=i
                        )
                    yield self.event({}, finish="tool_calls", index=i)
                    continue
                if held.get(i):
                    yield self.event({"content": "".join(held.pop(i))}, index=i)
                yield self.event({}, finish=chunk.finish_reason, index=i)
        if ended and self.lasts[0] is not None and self.include_usage:
            yield self.event(None, usage=self.usage())
        yield "data: [DONE]\n\n"


def token_text(tokenizer: Any, token: int) -> tuple[str, bytes]:
    """A token's text and UTF-8 bytes as OpenAI's logprobs show them (a special token: its name, e.g. `</s>`;
    a token that is part of a character: its bytes, the text with U+FFFD in their place)."""
    if tokenizer is None:
        return "", b""
    if token < tokenizer.num_special_tokens:
        text = tokenizer.id_to_piece(token)
        return text, text.encode()
    data = tokenizer.id_to_byte_piece(token)
    return data.decode("utf-8", errors="replace"), data


def watch_disconnect(receive: Receive, job: Job) -> Callable[[], None]:
    """Cancel `job` as soon as its client disconnects (its body has been read: the next message is that). The
    function returned ends the reply's work, once it is sent or abandoned: the watching and the job (a no-op
    on a job that ended)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.ensure_future(watch())

    def stop() -> None:
        watcher.cancel()
        job.cancel()

    return stop


async def start_job(engine: Any, job: Job, receive: Receive) -> tuple[dict[str, Any] | None, Callable[[], None]]:
    """Queue `job` (429 with Retry-After when the queue is full), watch its client, and wait for its first event.

    Returns the job's start (its prompt tokens) with the `stop` that ends its work (see `watch_disconnect`), or
    None for the start when the job was cancelled before it started (the client left). An engine error before
    the start is raised as the request's error, its work stopped. Every API's route starts its job here."""
    try:
        engine.submit(job)
    except queue.Full:
        seconds = engine.retry_after()
        raise APIError(
            429,
            f"the server is busy: {engine.waiting()} requests are waiting; retry in {seconds} s.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(seconds)},
        ) from None
    stop = watch_disconnect(receive, job)
    try:
        kind, value = await job.events.get()
        if kind == "error":
            raise library_error(value)
    except BaseException:
        stop()
        raise
    return (None if kind == "end" else value), stop


class EventStream:
    """Server-sent events of one reply; `stop` (from `watch_disconnect`) runs when they end, however they end."""

    def __init__(self, reply: Reply, job: Job, stop: Callable[[], None]):
        self.reply, self.job, self.stop = reply, job, stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                async for data in self.reply.events(self.job):
                    await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
            except APIError as e:  # the headers are gone: report it as an event, as OpenAI does
                await send({"type": "http.response.body", "body": _sse_error(e), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client disconnected while we wrote
            pass
        finally:
            self.stop()


def _sse_error(e: APIError) -> bytes:
    return f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\ndata: [DONE]\n\n".encode()


def library_error(e: BaseException) -> APIError:
    """The answer to an exception from the library or the engine: the client's fault (400) or the server's."""
    if isinstance(e, APIError):  # the server's own (a request stopped at shutdown)
        return e
    if isinstance(e, ContextError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ImageError):
        return APIError(400, str(e), param="messages", code="invalid_image")
    if isinstance(e, PixtralError):
        return APIError(400, str(e), param=e.param or "messages")
    return APIError(500, f"the server failed on this request ({type(e).__name__}); see its log.", type="server_error")


def json_error(e: APIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


def model_card(settings: Settings, created: int) -> dict[str, Any]:
    return {
        "id": settings.model_id,
        "object": "model",
        "created": created,
        "owned_by": "pixtral-mlx",
        "input_modalities": ["text", "image"],
        "output_modalities": ["text"],
        "max_model_len": settings.context_length,
    }
