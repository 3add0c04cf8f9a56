"""Ollama's API on the same engine: `/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps` and
`/api/version`, for apps that only speak Ollama (Open WebUI, Raycast, editor plugins).

An Ollama request is checked here (its own field names in every error), then turned into the server's
OpenAI request (`schema.ChatRequest`: base64 images become `data:` URL parts, `options` and `format` become
`max_tokens`, `temperature`, `response_format` ...), so the rest is the OpenAI path's: `request_options`
builds the one `Options` value, `resolve_messages` reads every image on a worker thread under the server's
fetch policy and pixel budget, a `Job` goes to the engine, and its chunks come back as Ollama's
newline-delimited JSON (or one object with `"stream": false`). Errors are Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pixtral_mlx.errors import PixtralError
from pixtral_mlx.server.engine import Engine, Job
from pixtral_mlx.server.guard import authorize
from pixtral_mlx.server.replies import Reply, library_error, start_job
from pixtral_mlx.server.requests import read_body, resolve_messages
from pixtral_mlx.server.schema import APIError, ChatRequest, request_options
from pixtral_mlx.server.settings import Settings

log = logging.getLogger("pixtral_mlx.server")

# The Ollama API level these routes follow (clients compare it to decide which features to use; 0.5 added
# JSON-schema `format`).
OLLAMA_VERSION = "0.6.0"
NDJSON = "application/x-ndjson"


# Requests -------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class OllamaOptions(_Body):
    """The options this server maps; the others (`num_ctx`, `top_k`, ...) are ignored, as Ollama ignores the
    options a model does not use."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None


class _Common(_Body):
    model: str | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: Any = None  # accepted and ignored: the model stays loaded while the server runs
    think: bool | str | None = None


class ChatBody(_Common):
    messages: list[OllamaMessage] = []
    tools: list[Any] | None = None


class GenerateBody(_Common):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None


def _parse(cls: type[_Common], body: bytes) -> Any:
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, "the request body is not valid JSON.") from None
        where = ""
        for loc in err["loc"]:  # up to pydantic's union-member labels ('str', 'list[str]', ...)
            if isinstance(loc, int):
                where += f"[{loc}]"
            elif loc in _FIELDS:
                where += f".{loc}" if where else loc
            else:
                break
        if not where:
            raise APIError(400, "the request body must be a JSON object.") from None
        if err["type"] == "missing":
            raise APIError(400, f"'{where}' is required.") from None
        raise APIError(400, f"invalid value for '{where}': {err['msg'].lower()}.") from None


_FIELDS = {
    *OllamaOptions.model_fields, *OllamaMessage.model_fields, *ChatBody.model_fields, *GenerateBody.model_fields
}  # fmt: skip


def _check_common(body: _Common, settings: Settings, thinks: bool = False) -> None:
    """The model's name, and `think`: refused (unless false) for a model that does not think; for one that
    does (a tokenizer with [THINK]), true or a level shows the thinking as `thinking` and false hides it (it
    cannot be turned off: the model thinks or not as its prompt asks)."""
    if body.model:
        check_model(body.model, settings)
    if body.think not in (None, False) and not thinks:
        raise APIError(400, f"{settings.model_id!r} does not support thinking.")


def _thinks(engine: Engine) -> bool:
    from pixtral_mlx.reasoning import thinks

    encoder = getattr(engine.pixtral, "encoder", None)  # None until the model is loaded
    return encoder is not None and thinks(getattr(encoder, "text", None))


def check_model(name: str, settings: Settings) -> None:
    """Nothing, or a 404: the served model's id or an alias, with or without a `:latest` tag."""
    names = (settings.model_id, *settings.aliases)
    if name not in names and name.removesuffix(":latest") not in names:
        raise APIError(404, f"model {name!r} not found")


def _image_parts(images: list[str] | None, where: str) -> list[dict[str, Any]]:
    parts = []
    for i, image in enumerate(images or []):
        if not image.strip():
            raise APIError(400, f"'{where}[{i}]' must be a base64-encoded image, not an empty string.")
        url = image if image.startswith("data:") else "data:image;base64," + image.strip()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _user(text: str, images: list[str] | None, where: str) -> dict[str, Any]:
    """A message in OpenAI's format: the images first, then the text (as Ollama lays out a turn)."""
    if not images:
        return {"role": "user", "content": text}
    parts = _image_parts(images, where)
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    if body.tools:
        raise APIError(400, "tools (function calling) are not supported by this server.")
    out = []
    for i, m in enumerate(body.messages):
        if m.role == "tool" or m.tool_calls:
            raise APIError(400, f"messages[{i}]: tool calls and tool messages are not supported by this server.")
        if m.role == "user":
            out.append(_user(m.content, m.images, f"messages[{i}].images"))
        elif m.images:
            raise APIError(400, f"messages[{i}]: only user messages can carry images, not {m.role} messages.")
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def generate_messages(body: GenerateBody) -> list[dict[str, Any]]:
    if body.raw:
        raise APIError(400, "raw prompts are not supported: send 'prompt' (and 'system') without 'raw'.")
    if body.template:
        raise APIError(400, "'template' is not supported: this server uses the model's own prompt format.")
    if body.suffix:
        raise APIError(400, "'suffix' (fill-in-the-middle) is not supported by this model.")
    if body.context:
        raise APIError(
            400,
            "'context' is not supported: this server returns no context; send the conversation as messages to "
            "/api/chat instead.",
        )
    system = [{"role": "system", "content": body.system}] if body.system else []
    return [*system, _user(body.prompt, body.images, "images")]


def openai_request(body: _Common, messages: list[dict[str, Any]], settings: Settings) -> ChatRequest:
    """The OpenAI request these Ollama fields mean (`options` and `format` mapped to OpenAI's names)."""
    o = body.options or OllamaOptions()
    max_tokens = o.num_predict
    if max_tokens is not None and max_tokens < 0:  # -1: no limit, -2: fill the context (capped by the context)
        max_tokens = settings.context_length or None
    fields: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": o.temperature,
        "top_p": o.top_p,
        "seed": o.seed if o.seed is None or o.seed >= 0 else None,  # negative: a random seed, as in Ollama
        "stop": o.stop or None,
    }
    fmt = body.format
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise APIError(400, f'format must be "json" or a JSON schema, got {fmt!r}.')
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as e:  # values pydantic's lax parse let through that the OpenAI request refuses
        raise APIError(400, f"invalid request: {e.errors()[0]['msg'].lower()}.") from None


_OPTION_NAMES = {
    "max_tokens": "options.num_predict",
    "temperature": "options.temperature",
    "top_p": "options.top_p",
    "seed": "options.seed",
    "stop": "options.stop",
}


def ollama_options(req: ChatRequest, settings: Settings) -> Any:
    """`request_options` (on a worker thread: a schema compiles), its errors in Ollama's field names."""
    try:
        return request_options(req, settings.defaults, settings.max_edge)
    except APIError as e:
        if e.param in _OPTION_NAMES:
            e.message = e.message.replace(e.param, _OPTION_NAMES[e.param], 1)
        elif e.param == "response_format":
            e.message = "format: " + e.message
        raise


# Replies --------------------------------------------------------------------------------------------------
def now() -> str:
    """Ollama's `created_at`: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OllamaReply:
    """Ollama's objects for one reply (`kind` "chat": `message`; "generate": `response`) from the engine's chunks."""

    def __init__(
        self, kind: str, model: str, reply: Reply, job: Job, received: float, started: float, think: bool = True
    ):
        self.kind, self.model, self.reply, self.job = kind, model, reply, job
        self.received, self.started = received, started  # perf_counter() at the request and at the engine's start
        self.first: float | None = None  # perf_counter() at the first chunk
        self.think = think  # show a reasoning model's thinking (`message.thinking`, or `thinking` for generate)

    def line(self, text: str, done: bool = False, thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            body["message"] = {"role": "assistant", "content": text}
            if thinking:
                body["message"]["thinking"] = thinking
        else:
            body["response"] = text
            if thinking:
                body["thinking"] = thinking
        body["done"] = done
        return body

    def final(self, last: Any, text: str = "", thinking: str = "") -> dict[str, Any]:
        """The `done` object: why it ended and the counts; durations in nanoseconds, timed here (the prompt's:
        the engine's start to the first token; the reply's: the first token to the last)."""
        body = self.line(text, done=True, thinking=thinking)
        end = time.perf_counter()
        first = self.first if self.first is not None else end
        body.update(
            done_reason=last.finish_reason if last is not None else "stop",
            total_duration=_ns(end - self.received),
            load_duration=_ns(self.started - self.received),  # reading images and waiting for the engine
            prompt_eval_count=self.reply.prompt_tokens,
            prompt_eval_duration=_ns(first - self.started),
            eval_count=last.generation_tokens if last is not None else 0,
            eval_duration=_ns(end - first),
        )
        return body

    async def chunks(self) -> Any:
        async for chunk in self.reply.chunks(self.job):
            if self.first is None:
                self.first = time.perf_counter()
            yield chunk

    async def collect(self) -> dict[str, Any]:
        text, thought, last = [], [], None
        async for chunk in self.chunks():
            text.append(chunk.text)
            thought.append(chunk.reasoning if self.think else "")
            last = chunk
        return self.final(last, "".join(text), "".join(thought))

    async def lines(self) -> Any:
        last = None
        async for chunk in self.chunks():
            if chunk.reasoning and self.think:
                yield self.line("", thinking=chunk.reasoning)
            if chunk.text:
                yield self.line(chunk.text)
            last = chunk
        if last is not None and last.finish_reason is not None:
            yield self.final(last)


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class LineStream:
    """Newline-delimited JSON of one reply; `stop` (from `watch_disconnect`) runs when it ends, however it ends."""

    def __init__(self, reply: OllamaReply, stop: Callable[[], None]):
        self.reply, self.stop = reply, stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", NDJSON.encode()), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            try:
                async for line in self.reply.lines():
                    await send({"type": "http.response.body", "body": _encode(line), "more_body": True})
            except APIError as e:  # the status is sent: report it as a line, as Ollama does
                await send({"type": "http.response.body", "body": _encode({"error": e.message}), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client disconnected while we wrote
            pass
        finally:
            self.stop()


def _encode(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode()


def error_response(e: APIError) -> Response:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers or None)


# The model's description (/api/tags, /api/show) -----------------------------------------------------------
class ModelInfo:
    """What /api/tags and /api/show say about the served model, worked out once from the loaded model."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings, self.engine = settings, engine
        self._cached: dict[str, Any] | None = None

    def name(self) -> str:
        model_id = self.settings.model_id
        return model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"

    def facts(self) -> dict[str, Any]:
        if self._cached is None:
            self._cached = self._facts()
        return self._cached

    def _facts(self) -> dict[str, Any]:
        pixtral = self.engine.pixtral
        path = getattr(pixtral, "path", None)
        config: dict[str, Any] = {}
        size, modified, digest = 0, time.time(), hashlib.sha256(self.settings.model_id.encode())
        if path is not None:
            try:
                config_file = path / "config.json"
                config = json.loads(config_file.read_text())
                digest.update(config_file.read_bytes())
                modified = config_file.stat().st_mtime
                for f in sorted(path.glob("*.safetensors")):
                    stat = f.stat()
                    size += stat.st_size
                    digest.update(f"{f.name}:{stat.st_size}".encode())
            except (OSError, ValueError):
                pass
        quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
        params, dtype = _parameters(pixtral, quant)
        level = f"Q{quant['bits']}" if quant and "bits" in quant else dtype.upper()
        return {
            "size": size,
            "digest": digest.hexdigest(),
            "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z"),
            "parameter_count": params,
            "details": {
                "parent_model": "",
                "format": "mlx",
                "family": "pixtral",
                "families": ["pixtral"],
                "parameter_size": _billions(params),
                "quantization_level": level,
            },
        }

    def entry(self) -> dict[str, Any]:
        facts = self.facts()
        name = self.name()
        keys = ("modified_at", "size", "digest", "details")
        return {"name": name, "model": name, **{k: facts[k] for k in keys}}

    def show(self) -> dict[str, Any]:
        facts = self.facts()
        pixtral = self.engine.pixtral
        text = getattr(getattr(pixtral, "args", None), "text", None)
        info: dict[str, Any] = {
            "general.architecture": "pixtral",
            "general.basename": self.settings.model_id,
            "general.parameter_count": facts["parameter_count"],
            "pixtral.context_length": self.settings.context_length or getattr(pixtral, "context_length", 0),
        }
        for ours, theirs in (
            ("hidden_size", "embedding_length"),
            ("num_hidden_layers", "block_count"),
            ("num_attention_heads", "attention.head_count"),
            ("num_key_value_heads", "attention.head_count_kv"),
            ("vocab_size", "vocab_size"),
        ):
            if text is not None and hasattr(text, ours):
                info[f"pixtral.{theirs}"] = getattr(text, ours)
        defaults = self.settings.defaults
        return {
            "license": "",
            "modelfile": f"# served by pixtral-mlx\nFROM {self.settings.model_id}\n",
            "parameters": f"temperature {defaults.temperature:g}\ntop_p {defaults.top_p:g}\n"
            f"num_predict {defaults.max_tokens}",
            "template": "{{ .Prompt }}",  # informative only: the model's own (tekken v3) layout is always used
            "details": facts["details"],
            "model_info": info,
            "capabilities": ["completion", "vision"] + (["thinking"] if _thinks(self.engine) else []),
            "modified_at": facts["modified_at"],
        }


def _parameters(pixtral: Any, quant: dict[str, Any] | None) -> tuple[int, str]:
    """(parameter count, the dtype of the unquantized weights); packed quantized weights counted unpacked."""
    try:
        from mlx.utils import tree_flatten

        bits = quant.get("bits") if quant else None
        total, dtype = 0, "f16"
        for name, v in tree_flatten(pixtral.model.parameters()):
            if name.endswith((".scales", ".biases")) and bits:
                continue
            if "uint32" in str(v.dtype) and bits:
                total += v.size * (32 // bits)
            else:
                total += v.size
                dtype = str(v.dtype).rsplit(".", 1)[-1].replace("bfloat16", "bf16").replace("float", "f")
        return total, dtype
    except Exception:  # a description must not fail a request
        return 0, "unknown"


def _billions(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n else "unknown"


# Routes ---------------------------------------------------------------------------------------------------
Handler = Callable[[Request], Awaitable[Response]]


def _errors(handler: Handler) -> Handler:
    """The handler, its errors answered as Ollama's `{"error": "..."}`."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except PixtralError as e:
            return error_response(library_error(e))
        except Exception as e:
            log.exception("request to %s failed", request.url.path, exc_info=e)
            return error_response(library_error(e))

    return run


def ollama_routes(settings: Settings, engine: Engine) -> dict[str, tuple[Handler, list[str]]]:
    """path -> (handler, methods) of Ollama's API; the app mounts them under its guard like every route."""
    info = ModelInfo(settings, engine)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": OLLAMA_VERSION})

    async def tags(request: Request) -> Response:
        authorize(request, settings)
        facts = await asyncio.to_thread(info.entry)
        return JSONResponse({"models": [facts]})

    async def ps(request: Request) -> Response:
        authorize(request, settings)
        entry = await asyncio.to_thread(info.entry)
        return JSONResponse({"models": [{**entry, "expires_at": "2999-01-01T00:00:00Z", "size_vram": entry["size"]}]})

    async def show(request: Request) -> Response:
        authorize(request, settings)
        body = await read_body(request, settings.max_body, settings.body_timeout)
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON.") from None
        name = (fields.get("model") or fields.get("name")) if isinstance(fields, dict) else None
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required.")
        check_model(name, settings)
        return JSONResponse(await asyncio.to_thread(info.show))

    async def chat(request: Request) -> Response:
        return await _generate(request, "chat")

    async def generate(request: Request) -> Response:
        return await _generate(request, "generate")

    async def _generate(request: Request, kind: str) -> Response:
        received = time.perf_counter()
        authorize(request, settings)
        raw = await read_body(request, settings.max_body, settings.body_timeout)
        body = _parse(ChatBody if kind == "chat" else GenerateBody, raw)
        _check_common(body, settings, _thinks(engine))
        model = body.model or info.name()
        messages = chat_messages(body) if kind == "chat" else generate_messages(body)
        if kind == "chat" and not messages or kind == "generate" and not body.prompt and not body.images:
            # Ollama's way to load a model: nothing to generate; this one is always loaded
            reply = {"model": model, "created_at": now(), "done_reason": "load", "done": True}
            reply.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
            return JSONResponse(reply)
        req = openai_request(body, messages, settings)
        options = await asyncio.to_thread(ollama_options, req, settings)
        resolved = await asyncio.to_thread(resolve_messages, req, settings)
        job = Job(resolved, options, asyncio.get_running_loop())
        start, stop = await start_job(engine, job, request.receive)
        try:
            if start is None:  # cancelled before it started: the client is gone
                return Response(status_code=499)
            chat_reply = Reply(req, settings.model_id, start)
            think = body.think is not False  # false hides the thinking
            reply = OllamaReply(kind, model, chat_reply, job, received, time.perf_counter(), think)
            if body.stream:
                stream, stop = LineStream(reply, stop), None  # the stream stops them when it ends
                return stream  # type: ignore[return-value]
            return JSONResponse(await reply.collect())
        finally:
            if stop is not None:
                stop()

    return {
        "/api/version": (_errors(version), ["GET"]),
        "/api/tags": (_errors(tags), ["GET"]),
        "/api/ps": (_errors(ps), ["GET"]),
        "/api/show": (_errors(show), ["POST"]),
        "/api/chat": (_errors(chat), ["POST"]),
        "/api/generate": (_errors(generate), ["POST"]),
    }
