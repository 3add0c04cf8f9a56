"""OpenAI's Responses API on the same engine: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`, for
agent frameworks that speak it (the `openai` client's `client.responses`, the Agents SDK, ...).

A Responses request is checked here, then turned into the server's chat-completions request (`input` items become
`messages`, `instructions` a system message first, `max_output_tokens` `max_tokens`, `text.format`
`response_format`, function `tools` chat `tools`, a `previous_response_id` the stored conversation before the new
input), so the rest is the chat path's: `parse_request` (and its refusals), `request_options`, `resolve_messages`, a
`Job` for the engine and a `Reply`, whose chat objects (whole, or its streamed chunks) become the Response object or
the Responses stream's events (`response.created` ... `response.completed`). Errors are OpenAI's shape, their
`param` in the Responses request's names.

Responses are kept (unless `"store": false`) in an in-memory store per server process, for `previous_response_id`
and `GET /v1/responses/{id}`: the last `STORE_RESPONSES` responses within `STORE_BYTES` of conversations, the least
recently used dropped first; a restart forgets them all.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pixtral_mlx.server.engine import Engine, Job
from pixtral_mlx.server.guard import authorize
from pixtral_mlx.server.replies import EventStream, Reply, start_job
from pixtral_mlx.server.requests import read_body, resolve_messages
from pixtral_mlx.server.schema import APIError, ChatRequest, parse_request, request_options
from pixtral_mlx.server.settings import Settings

STORE_RESPONSES = 256  # responses kept for previous_response_id, per server process
STORE_BYTES = 256 * 1024 * 1024  # ... and at most this much of their conversations (JSON, images as sent)


# The store ------------------------------------------------------------------------------------------------
class Stored:
    """One kept response: its object and the whole conversation up to and including its output (chat messages,
    images as the client sent them), which a request naming it as `previous_response_id` continues."""

    def __init__(self, response: dict[str, Any], conversation: list[dict[str, Any]]):
        self.response, self.conversation = response, conversation
        self.size = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))


class ResponseStore:
    """The last `limit` responses within `max_bytes`, least recently used dropped first (one per server process;
    used on the event loop only)."""

    def __init__(self, limit: int = STORE_RESPONSES, max_bytes: int = STORE_BYTES):
        self.limit, self.max_bytes = limit, max_bytes
        self.items: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0

    def put(self, stored: Stored) -> None:
        if stored.size > self.max_bytes:  # larger than the whole store: not kept
            return
        self.remove(stored.response["id"])
        self.items[stored.response["id"]] = stored
        self.bytes += stored.size
        while len(self.items) > self.limit or self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.size

    def get(self, response_id: str) -> Stored | None:
        stored = self.items.get(response_id)
        if stored is not None:
            self.items.move_to_end(response_id)
        return stored

    def remove(self, response_id: str) -> bool:
        old = self.items.pop(response_id, None)
        if old is not None:
            self.bytes -= old.size
        return old is not None


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(
        404,
        f"Response with id {response_id!r} not found: this server keeps its last {STORE_RESPONSES} stored responses, "
        "in memory, until it restarts.",
        param=param,
        code="previous_response_not_found" if param else "response_not_found",
    )


# Requests -------------------------------------------------------------------------------------------------
_IGNORED_TYPES = ("reasoning",)  # input items a client passes back that carry nothing for this model


def _content(content: Any, where: str, role: str) -> str | list[dict[str, Any]]:
    """A message's content in the chat format: a string, or parts (`input_text`/`output_text` become `text`,
    `input_image` becomes `image_url`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{where}' must be a string or a list of content parts.", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise APIError(400, f"'{at}.text' must be a string.", param=f"{at}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if part.get("file_id") and not url:
                raise APIError(
                    400, "file_id images are not supported: send 'image_url' (a data: or http(s) URL).",
                    param=f"{at}.file_id", code="unsupported_content",
                )  # fmt: skip
            if not isinstance(url, str) or not url.strip():
                raise APIError(400, f"'{at}.image_url' must be a non-empty string.", param=f"{at}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise APIError(
                400,
                f"content part type {kind!r} is not supported: this server takes 'input_text' and 'input_image'.",
                param=f"{at}.type",
                code="unsupported_content",
            )
    return parts


def input_messages(items: Any) -> list[dict[str, Any]]:
    """`input` (a string, or a list of items) as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise APIError(400, "'input' must be a string or a list of input items.", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"'{where}' must be an object.", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"invalid value for '{where}.role': {role!r}.", param=f"{where}.role")
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content", role)})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # the calls of one turn: one assistant message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output, ensure_ascii=False)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        elif kind in _IGNORED_TYPES:
            continue
        else:
            raise APIError(
                400,
                f"input item type {kind!r} is not supported: this server takes 'message', 'function_call' and "
                "'function_call_output' items.",
                param=f"{where}.type",
                code="unsupported_content",
            )
    return out


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses' function tools (`{"type": "function", "name", "parameters", ...}`) as chat tools."""
    if not tools:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(
                400, f"tool type {kind!r} is not supported: this server takes function tools only.",
                param=f"tools[{i}].type", code="unsupported_parameter",
            )  # fmt: skip
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(
            400, "'text.format.type' must be 'text', 'json_object' or 'json_schema'.", param="text.format.type"
        )
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


_UNSUPPORTED = {
    "background": "background responses are not supported by this server",
    "conversation": "conversations are not supported: continue with previous_response_id",
    "prompt": "prompt templates are not supported by this server",
}

# chat request field -> the Responses field a client set
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "json_schema": "text.format",
    "messages": "input",
}


def _renamed(e: APIError) -> APIError:
    """An error of the chat request, naming the Responses request's fields."""
    if e.param:
        head = e.param.split(".", 1)[0].split("[", 1)[0]
        if head in _PARAMS:  # a message's index is not its input item's (instructions, history): just `input`
            e.message = e.message.replace(e.param, _PARAMS[head])
            e.param = _PARAMS[head]
    return e


def chat_fields(body: dict[str, Any], history: list[dict[str, Any]], inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat-completions request a Responses request means."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "'instructions' must be a string.", param="instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    fields: dict[str, Any] = {
        "messages": [*system, *history, *inputs],
        "model": body.get("model"),
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "response_format": _response_format(body.get("text")),
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "stream": bool(body.get("stream")),
    }
    if body.get("stream"):
        fields["stream_options"] = {"include_usage": True}
    if body.get("parallel_tool_calls") is not None:
        fields["parallel_tool_calls"] = body["parallel_tool_calls"]
    for name in ("seed", "max_edge", "stop"):  # extensions some clients send through `extra_body`
        if body.get(name) is not None:
            fields[name] = body[name]
    return {k: v for k, v in fields.items() if v is not None}


def chat_request(fields: dict[str, Any]) -> ChatRequest:
    """The chat request, checked as `/v1/chat/completions` checks it (its refusals included)."""
    try:
        return parse_request(json.dumps(fields, ensure_ascii=False).encode())
    except APIError as e:
        raise _renamed(e) from None


# Replies --------------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if chat_usage is None:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    thought = chat_usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0)},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": thought.get("reasoning_tokens", 0)},
        "total_tokens": chat_usage["total_tokens"],
    }


def _function_call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "type": "function_call",
        "id": _id("fc"),
        "call_id": call.get("id") or _id("call"),
        "name": function.get("name", ""),
        "arguments": function.get("arguments") or "",
        "status": status,
    }


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _reasoning(item_id: str, text: str, status: str) -> dict[str, Any]:
    """A reasoning model's thinking as a `reasoning` item: its whole text (not a summary)."""
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "encrypted_content": None,
        "status": status,
    }


class ResponseBuilder:
    """One Response object: what the request asked, then its output, status and usage."""

    def __init__(self, body: dict[str, Any], req: ChatRequest, model_id: str):
        self.id = _id("resp")
        self.created_at = int(time.time())
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        self.base: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {},
            "model": model_id,
            "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True) is not False,
            "temperature": req.temperature,
            "text": {"format": text.get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [],
            "top_p": req.top_p,
            "truncation": body.get("truncation") or "disabled",
            "usage": None,
            "user": body.get("user"),
        }

    def response(
        self, output: list[dict[str, Any]] | None = None, finish: str | None = None, chat_usage: Any = None
    ) -> dict[str, Any]:
        body = {**self.base, "output": output or []}
        if finish is not None:
            incomplete = finish == "length"
            body["status"] = "incomplete" if incomplete else "completed"
            body["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
            body["usage"] = usage(chat_usage)
        return body


def output_of(message: dict[str, Any], status: str) -> list[dict[str, Any]]:
    """A chat reply's message as Response output items: its thinking (a reasoning model's), its text (if any, or if
    nothing else), then its calls."""
    calls = [_function_call(c) for c in message.get("tool_calls") or []]
    text = message.get("content") or ""
    thought = message.get("reasoning_content")
    items = [_reasoning(_id("rs"), thought, status)] if thought else []
    items += [_message(_id("msg"), text, status)] if text or not calls else []
    return items + calls


def assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The output items as the chat message that continues a conversation (the answer: a `reasoning` item is left
    out, as reasoning items given back as input are)."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"] if "text" in part
    )
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


class ResponseEvents:
    """The Responses stream of one reply, from the chat reply's streamed chunks: `response.created`,
    `response.in_progress`, then per output item `response.output_item.added`, (a message:)
    `response.content_part.added`, `response.output_text.delta`..., `response.output_text.done`,
    `response.content_part.done`, (a reasoning model's thinking, first: a `reasoning` item with a `reasoning_text`
    part, `response.reasoning_text.delta`..., `.done`), (a function call: `response.function_call_arguments.delta`...,
    `.done`), `response.output_item.done`; last `response.completed` (or `response.incomplete`, or `error`
    and `response.failed`). `events(job)` is what `EventStream` sends."""

    def __init__(self, reply: Reply, builder: ResponseBuilder, done: Callable[[dict[str, Any]], None]):
        self.reply, self.builder, self.done = reply, builder, done
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, job: Job) -> AsyncIterator[str]:
        builder = self.builder
        yield self.event("response.created", response=builder.response())
        yield self.event("response.in_progress", response=builder.response())
        output: list[dict[str, Any]] = []  # the items done
        text: list[str] | None = None  # the open message's text
        message_id = ""
        calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its open function_call item
        thought: list[str] | None = None  # the open reasoning item's text
        reasoning_id = ""
        finish, chat_usage = None, None

        def open_reasoning() -> list[str]:
            nonlocal thought, reasoning_id
            thought, reasoning_id = [], _id("rs")
            index = len(output)
            item = {**_reasoning(reasoning_id, "", "in_progress"), "content": []}
            ids = {"item_id": reasoning_id, "output_index": index, "content_index": 0}
            return [
                self.event("response.output_item.added", output_index=index, item=item),
                self.event("response.content_part.added", **ids, part={"type": "reasoning_text", "text": ""}),
            ]

        def close_reasoning(status: str) -> list[str]:
            nonlocal thought
            if thought is None:
                return []
            whole, index = "".join(thought), len(output)
            item = _reasoning(reasoning_id, whole, status)
            thought = None
            output.append(item)
            ids = {"item_id": reasoning_id, "output_index": index, "content_index": 0}
            return [
                self.event("response.reasoning_text.done", **ids, text=whole),
                self.event("response.content_part.done", **ids, part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item),
            ]

        def open_message() -> list[str]:
            nonlocal text, message_id
            text, message_id = [], _id("msg")
            index = len(output)
            item = {**_message(message_id, "", "in_progress"), "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                self.event("response.output_item.added", output_index=index, item=item),
                self.event(
                    "response.content_part.added", item_id=message_id, output_index=index, content_index=0, part=part
                ),
            ]

        def close_message(status: str) -> list[str]:
            nonlocal text
            assert text is not None
            whole, index = "".join(text), len(output)
            item = _message(message_id, whole, status)
            text = None
            output.append(item)
            ids = {"item_id": message_id, "output_index": index, "content_index": 0}
            return [
                self.event("response.output_text.done", **ids, text=whole, logprobs=[]),
                self.event("response.content_part.done", **ids, part=item["content"][0]),
                self.event("response.output_item.done", output_index=index, item=item),
            ]

        def close_calls(status: str) -> list[str]:
            lines = []
            for _, item in sorted(calls.items()):
                index = len(output)
                item["status"] = status
                output.append(item)
                lines.append(
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=index,
                        arguments=item["arguments"],
                    )  # fmt: skip
                )
                lines.append(self.event("response.output_item.done", output_index=index, item=item))
            calls.clear()
            return lines

        try:
            async for data in self.reply.events(job):
                payload = data.removeprefix("data: ").strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    chat_usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        if text is not None:  # thinking after some answer (rare): the message so far is done
                            for line in close_message("completed"):
                                yield line
                        if thought is None:
                            for line in open_reasoning():
                                yield line
                        assert thought is not None
                        thought.append(delta["reasoning_content"])
                        yield self.event(
                            "response.reasoning_text.delta", item_id=reasoning_id, output_index=len(output),
                            content_index=0, delta=delta["reasoning_content"],
                        )  # fmt: skip
                    if delta.get("content") or delta.get("tool_calls"):
                        for line in close_reasoning("completed"):
                            yield line
                    if delta.get("content"):
                        if text is None:
                            for line in open_message():
                                yield line
                        assert text is not None
                        text.append(delta["content"])
                        yield self.event(
                            "response.output_text.delta", item_id=message_id, output_index=len(output),
                            content_index=0, delta=delta["content"], logprobs=[],
                        )  # fmt: skip
                    for call in delta.get("tool_calls") or []:
                        if text is not None:
                            for line in close_message("completed"):
                                yield line
                        index = call.get("index", 0)
                        function = call.get("function") or {}
                        if index not in calls:
                            item = _function_call(call, status="in_progress")
                            item["arguments"] = ""
                            calls[index] = item
                            position = len(output) + len(calls) - 1
                            yield self.event("response.output_item.added", output_index=position, item=dict(item))
                        item = calls[index]
                        if function.get("arguments"):
                            item["arguments"] += function["arguments"]
                            position = len(output) + sorted(calls).index(index)
                            yield self.event(
                                "response.function_call_arguments.delta", item_id=item["id"],
                                output_index=position, delta=function["arguments"],
                            )  # fmt: skip
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        except APIError as e:
            failed = builder.response(output)
            failed["status"] = "failed"
            failed["error"] = {"code": e.code or e.type, "message": e.message}
            yield self.event("error", code=e.code, message=e.message, param=e.param)
            yield self.event("response.failed", response=failed)
            return
        if finish is None:  # the client left (the job was cancelled): nothing more to say
            return
        status = "incomplete" if finish == "length" else "completed"
        for line in close_reasoning(status):
            yield line
        if text is None and not calls and not any(item["type"] != "reasoning" for item in output):
            for line in open_message():
                yield line
        if text is not None:
            for line in close_message(status):
                yield line
        for line in close_calls(status):
            yield line
        response = builder.response(output, finish, chat_usage)
        self.done(response)
        yield self.event(f"response.{response['status']}", response=response)


# Routes ---------------------------------------------------------------------------------------------------
Handler = Callable[[Request], Awaitable[Response]]


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON ({e}).") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    return body


def responses_routes(settings: Settings, engine: Engine) -> list[tuple[str, Handler, list[str]]]:
    """(path, handler, methods) of the Responses API; the app mounts them under its guard like every route,
    and answers their `APIError`s in OpenAI's shape."""
    store = ResponseStore()

    async def create(request: Request) -> Response:
        authorize(request, settings)
        body = _body(await read_body(request, settings.max_body, settings.body_timeout))
        for name, why in _UNSUPPORTED.items():
            if body.get(name):
                raise APIError(400, f"{why}.", param=name, code="unsupported_parameter")
        model = body.get("model")
        if model is not None and model not in (settings.model_id, *settings.aliases):
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {settings.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        history: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = store.get(previous) if isinstance(previous, str) else None
            if stored is None:
                raise not_found(str(previous), param="previous_response_id")
            history = stored.conversation
        if "input" not in body:
            raise APIError(400, "'input' is required.", param="input")
        inputs = input_messages(body["input"])
        req = chat_request(chat_fields(body, history, inputs))
        builder = ResponseBuilder(body, req, settings.model_id)
        conversation = [*history, *inputs]

        def done(response: dict[str, Any]) -> None:
            if response["store"]:
                store.put(Stored(response, [*conversation, assistant_turn(response["output"])]))

        try:  # to a thread: a JSON schema compiles into a grammar here, which may take a while
            options = await asyncio.to_thread(request_options, req, settings.defaults, settings.max_edge)
            messages = await asyncio.to_thread(resolve_messages, req, settings)
        except APIError as e:
            raise _renamed(e) from None
        job = Job(messages, options, asyncio.get_running_loop())
        try:
            start, stop = await start_job(engine, job, request.receive)
        except APIError as e:
            raise _renamed(e) from None
        try:
            if start is None:  # cancelled before it started: the client is gone
                return Response(status_code=499)
            reply = Reply(req, settings.model_id, start)
            if req.stream:
                events = ResponseEvents(reply, builder, done)
                stream, stop = EventStream(events, job, stop), None  # type: ignore[arg-type]  # it stops them
                return stream  # type: ignore[return-value]
            try:
                chat = await reply.collect(job)
            except APIError as e:
                raise _renamed(e) from None
            choice = chat["choices"][0]
            finish = choice["finish_reason"] or "stop"
            status = "incomplete" if finish == "length" else "completed"
            response = builder.response(output_of(choice["message"], status), finish, chat["usage"])
            done(response)
            return JSONResponse(response)
        finally:
            if stop is not None:
                stop()

    async def retrieve(request: Request) -> Response:
        authorize(request, settings)
        response_id = request.path_params["response_id"]
        stored = store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return JSONResponse(stored.response)

    async def delete(request: Request) -> Response:
        authorize(request, settings)
        response_id = request.path_params["response_id"]
        if not store.remove(response_id):
            raise not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    return [
        ("/v1/responses", create, ["POST"]),
        ("/v1/responses/{response_id}", retrieve, ["GET"]),
        ("/v1/responses/{response_id}", delete, ["DELETE"]),
    ]
