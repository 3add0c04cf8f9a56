"""The reply to a chat request: OpenAI's objects built from the engine's chunks, sent whole (`Reply.collect`)
or as server-sent events (`EventStream`), the job cancelled once its client is gone; errors in OpenAI's shape
(`library_error`, `json_error`); the model card of /v1/models."""

from __future__ import annotations

import asyncio
import json
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
    """Builds the OpenAI objects of one reply from the engine's chunks."""

    def __init__(self, request: ChatRequest, model_id: str, start: dict[str, Any]):
        self.request = request
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = start["prompt_tokens"]
        self.prompt_token_ids = start["prompt_token_ids"]
        self.token_ids: list[int] = []
        options = request.stream_options
        self.include_usage = options is not None and options.include_usage

    def usage(self, last: Any) -> dict[str, Any]:
        cached = self.prompt_tokens - last.prompt_tokens if last is not None else 0
        completion = last.generation_tokens if last is not None else 0
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def chunks(self, job: Job) -> AsyncIterator[Any]:
        """The job's chunks until its end, their token ids kept; an engine error mid-reply is raised."""
        while True:
            kind, value = await job.events.get()
            if kind == "end":
                return
            if kind == "error":
                raise library_error(value)
            if value.token is not None:
                self.token_ids.append(value.token)
            yield value

    async def collect(self, job: Job) -> dict[str, Any]:
        """The whole reply, as one `chat.completion` object."""
        text, last = [], None
        async for chunk in self.chunks(job):
            text.append(chunk.text)
            last = chunk
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(text)},
            "logprobs": None,
            "finish_reason": last.finish_reason if last is not None else None,
        }
        if self.request.return_token_ids:
            choice["token_ids"] = list(self.token_ids)
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
            "usage": self.usage(last),
            "system_fingerprint": None,
        }
        if self.request.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    def event(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> str:
        """One server-sent event: a `chat.completion.chunk` (`delta` None: the usage-only last one)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
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
            data["choices"][0]["token_ids"] = list(self.token_ids)
            data["prompt_token_ids"] = self.prompt_token_ids
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, job: Job) -> AsyncIterator[str]:
        """The reply as server-sent events, up to `data: [DONE]`."""
        yield self.event({"role": "assistant", "content": ""})
        last = None
        async for chunk in self.chunks(job):
            if chunk.text:
                yield self.event({"content": chunk.text})
            last = chunk
        if last is not None and last.finish_reason is not None:
            yield self.event({}, finish=last.finish_reason)
            if self.include_usage:
                yield self.event(None, usage=self.usage(last))
        yield "data: [DONE]\n\n"


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
