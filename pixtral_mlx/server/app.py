"""The ASGI app (Starlette): OpenAI's `/v1/chat/completions` and `/v1/models`, and `/health`.

The request handlers only check, read images, queue and stream back; the `Engine` thread does the
model work. Images are read here, off the engine thread (a slow download never holds up other
requests), and handed to the library as decoded images, so the prompt is exactly what
`model.encode(messages)` gives for the client's messages.

Safe to leave running: `_Guard` refuses what a web page in the user's browser could send (a foreign `Host`
or `Origin`); the POST body must be JSON and arrive in time; `_HTTP` bounds open connections and the time
for a request's headers; `Server` stops on SIGTERM/SIGINT after a grace period and returns normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from pixtral_mlx.errors import ContextError, ImageError, PixtralError
from pixtral_mlx.images import MAX_REQUEST_PIXELS, FetchPolicy, PixelBudget
from pixtral_mlx.turn import Options

from .engine import Engine, Job
from .schema import APIError, ChatRequest, parse_request, request_options

log = logging.getLogger("pixtral_mlx.server")

MAX_BODY_BYTES = 100 * 1024 * 1024  # a 50 MB image as a data: URL is ~67 MB of base64
IMAGE_TIMEOUT = 10.0  # seconds for a whole image download
BODY_TIMEOUT = 60.0  # seconds for a whole request body, once its headers are in
HEADER_TIMEOUT = 10.0  # seconds for a request's headers
MAX_CONNECTIONS = 64  # open connections; more are answered 503 and closed
SHUTDOWN_GRACE = 5.0  # seconds running requests get to finish on SIGTERM (docker stop kills after 10)


@dataclass
class Settings:
    model_id: str
    aliases: tuple[str, ...] = ()  # other names a request may use for the model (the --model argument)
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    local_dirs: list[Path] = field(default_factory=list)  # resolved folders local images may come from
    max_edge: int | None = None  # default and upper bound of a request's max_edge
    defaults: Options = field(default_factory=Options)
    image_timeout: float = IMAGE_TIMEOUT
    max_body: int = MAX_BODY_BYTES
    context_length: int = 0
    body_timeout: float = BODY_TIMEOUT
    allowed_hosts: list[str] = field(default_factory=list)  # more names for this server in `Host` ('*': any)
    listen_host: str | None = None  # --host; None: judged by the address each connection came to
    fetch_policy: FetchPolicy = FetchPolicy.server()  # public addresses only (--allow-private-urls, ...)
    max_request_pixels: int | None = MAX_REQUEST_PIXELS  # decoded pixels of all a request's images (None: no limit)


def create_app(settings: Settings, engine: Engine) -> Starlette:
    """The app; `engine` must be started (and loaded) by the caller."""
    created = int(time.time())

    async def health(request: Request) -> Response:
        status = "ok" if engine.pixtral is not None else "loading"
        busy = engine.running is not None
        return JSONResponse({"status": status, "model": settings.model_id, "busy": busy, "queued": engine.waiting()})

    async def models(request: Request) -> Response:
        _authorize(request, settings)
        return JSONResponse({"object": "list", "data": [_model_card(settings, created)]})

    async def chat_completions(request: Request) -> Response:
        _authorize(request, settings)
        body = await _read_body(request, settings.max_body, settings.body_timeout)
        req = parse_request(body)
        if req.model is not None and req.model not in (settings.model_id, *settings.aliases):
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server serves {settings.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        # to a thread: a JSON schema compiles into a grammar here, which may take a while
        options = await asyncio.to_thread(request_options, req, settings.defaults, settings.max_edge)
        messages = await asyncio.to_thread(resolve_messages, req, settings)
        job = Job(messages, options, asyncio.get_running_loop())
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
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job))
        try:
            kind, value = await job.events.get()
            if kind == "error":
                raise _library_error(value)
            if kind == "end":  # cancelled before it started: the client is gone
                return Response(status_code=499)
            reply = _Reply(req, settings.model_id, value)
            if req.stream:
                stream, watcher = _EventStream(job, watcher, reply), None
                return stream
            return JSONResponse(await reply.collect(job))
        finally:
            if watcher is not None:
                watcher.cancel()
                job.cancel()  # a no-op once the job ended

    middleware = [Middleware(_Guard, settings=settings)]  # first: before CORS answers a preflight
    if settings.allowed_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.allowed_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )


# Requests --------------------------------------------------------------------------------------------
def _authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
        message = "a wrong API key was given" if key else "no API key was given (Authorization: Bearer KEY)"
        raise APIError(
            401, f"{message}; this server needs the key it was started with.", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The body: at most `limit` bytes, JSON (a browser's cross-site "simple" request cannot send that
    without CORS allowing it), all within `seconds`."""
    too_large = APIError(413, f"the request body is over the {limit >> 20} MB limit.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    kind = request.headers.get("content-type", "")
    if kind.partition(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            "send the body as JSON, with 'Content-Type: application/json'" + (f", not {kind!r}." if kind else "."),
            code="unsupported_media_type",
        )
    body = bytearray()

    async def read() -> None:
        async for piece in request.stream():
            body.extend(piece)
            if len(body) > limit:
                raise too_large

    try:
        await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {seconds:g} seconds.", code="request_timeout",
            headers={"Connection": "close"},
        ) from None  # fmt: skip
    return bytes(body)


async def _watch_disconnect(receive: Receive, job: Job) -> None:
    """Cancel `job` as soon as its client disconnects (the body has been read: the next message is that)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def resolve_messages(request: ChatRequest, settings: Settings) -> list[dict[str, Any]]:
    """The request's messages in the library's format, every image read and checked (on a worker thread)."""
    out: list[dict[str, Any]] = []
    budget = None if settings.max_request_pixels is None else PixelBudget(settings.max_request_pixels)
    for i, m in enumerate(request.messages):
        where = f"messages.[{i}]"
        if m.model_extra and (m.model_extra.get("tool_calls") or m.model_extra.get("function_call")):
            raise APIError(400, "tool calls are not supported by this server.", param=f"{where}.tool_calls")
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            if m.content is None and role == "user":
                raise APIError(400, f"'{where}.content' is required for a user message.", param=f"{where}.content")
            out.append({"role": role, "content": m.content or ""})
            continue
        parts = [_part(part, f"{where}.content.[{j}]", role, settings, budget) for j, part in enumerate(m.content)]
        out.append({"role": role, "content": parts})
    return out


def _part(
    part: dict[str, Any], where: str, role: str, settings: Settings, budget: PixelBudget | None = None
) -> dict[str, Any]:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"'{where}.text' must be a string.", param=f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind != "image_url":
        raise APIError(
            400,
            f"content part type {kind!r} is not supported: this server takes 'text' and 'image_url' parts.",
            param=f"{where}.type",
            code="unsupported_content",
        )
    if role != "user":
        raise APIError(400, f"only user messages can carry images, not {role} messages.", param=where)
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url.strip():
        raise APIError(400, f"'{where}.image_url.url' must be a non-empty string.", param=f"{where}.image_url.url")
    from pixtral_mlx.images import describe_source, read_source

    param = f"{where}.image_url"
    try:
        if url.startswith(("data:", "http://", "https://")):
            policy = settings.fetch_policy
            image, _ = read_source(url, download_timeout=settings.image_timeout, policy=policy, pixel_budget=budget)
        elif "\0" in urllib.parse.unquote(url):  # Path.resolve() would raise ValueError
            raise ImageError("the image path contains a NUL byte, which no file name can hold.")
        else:
            image, _ = read_source(_local_file(url, settings, param), pixel_budget=budget)
    except ImageError as e:
        raise APIError(400, str(e), param=param, code="invalid_image") from None
    return {"type": "image", "image": image, "name": describe_source(url)}


def _local_file(url: str, settings: Settings, param: str) -> Path:
    """The resolved path of a local image reference, if it lies inside an --allow-local-files folder."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("", "file"):
        raise APIError(
            400,
            f"unsupported image URL scheme {scheme + ':'!r}; use a data: or http(s) URL.",
            param=param,
            code="invalid_image_url",
        )
    if not settings.local_dirs:
        raise APIError(
            400,
            "local image paths and file:// URLs are refused: send the image as a data: or http(s) URL, or "
            "start the server with --allow-local-files FOLDER.",
            param=param,
            code="invalid_image_url",
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url
    path = Path(raw).resolve()  # symlinks and '..' resolved before the check
    if not any(path.is_relative_to(folder) for folder in settings.local_dirs):
        raise APIError(
            400,
            f"{raw} is outside the folders this server may read images from (--allow-local-files).",
            param=param,
            code="invalid_image_url",
        )
    return path


# Replies ---------------------------------------------------------------------------------------------
class _Reply:
    """Builds the OpenAI objects of one reply from the engine's chunks."""

    def __init__(self, request: ChatRequest, model_id: str, start: dict[str, Any]):
        self.request = request
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = start["prompt_tokens"]
        self.prompt_token_ids = start["prompt_token_ids"]
        self.token_ids: list[int] = []

    def usage(self, last: Any) -> dict[str, Any]:
        cached = self.prompt_tokens - last.prompt_tokens if last is not None else 0
        completion = last.generation_tokens if last is not None else 0
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _ids(self, choice: dict[str, Any]) -> dict[str, Any]:
        if self.request.return_token_ids:
            choice["token_ids"] = list(self.token_ids)
        return choice

    async def collect(self, job: Job) -> dict[str, Any]:
        text, last = [], None
        async for chunk in _chunks(job):
            text.append(chunk.text)
            if chunk.token is not None:
                self.token_ids.append(chunk.token)
            last = chunk
        finish = last.finish_reason if last is not None else None
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [
                self._ids(
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                )
            ],
            "usage": self.usage(last),
            "system_fingerprint": None,
        }
        if self.request.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    def event(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        data: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": None,
            "choices": [] if delta is None else [choice],
        }
        if self.request.stream_options is not None and self.request.stream_options.include_usage:
            data["usage"] = usage
        if finish is not None and self.request.return_token_ids:
            data["choices"][0]["token_ids"] = list(self.token_ids)
            data["prompt_token_ids"] = self.prompt_token_ids
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def events(self, job: Job) -> AsyncIterator[str]:
        yield self.event({"role": "assistant", "content": ""})
        last = None
        async for chunk in _chunks(job):
            if chunk.token is not None:
                self.token_ids.append(chunk.token)
            if chunk.text:
                yield self.event({"content": chunk.text})
            last = chunk
        if last is not None and last.finish_reason is not None:
            yield self.event({}, finish=last.finish_reason)
            if self.request.stream_options is not None and self.request.stream_options.include_usage:
                yield self.event(None, usage=self.usage(last))
        yield "data: [DONE]\n\n"


async def _chunks(job: Job) -> AsyncIterator[Any]:
    """The job's chunks until its end; an engine error mid-reply is raised."""
    while True:
        kind, value = await job.events.get()
        if kind == "end":
            return
        if kind == "error":
            raise _library_error(value)
        yield value


class _EventStream:
    """Server-sent events of one reply; a client that goes away cancels the job (the watcher sees it)."""

    def __init__(self, job: Job, watcher: asyncio.Future, reply: _Reply):
        self.job, self.watcher, self.reply = job, watcher, reply

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
            self.job.cancel()
            self.watcher.cancel()


def _sse_error(e: APIError) -> bytes:
    return f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\ndata: [DONE]\n\n".encode()


def _model_card(settings: Settings, created: int) -> dict[str, Any]:
    return {
        "id": settings.model_id,
        "object": "model",
        "created": created,
        "owned_by": "pixtral-mlx",
        "input_modalities": ["text", "image"],
        "output_modalities": ["text"],
        "max_model_len": settings.context_length,
    }


# Errors ----------------------------------------------------------------------------------------------
def _library_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):  # the server's own (a request stopped at shutdown)
        return e
    if isinstance(e, ContextError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, ImageError):
        return APIError(400, str(e), param="messages", code="invalid_image")
    if isinstance(e, PixtralError):
        return APIError(400, str(e), param=e.param or "messages")
    return APIError(500, f"the server failed on this request ({type(e).__name__}); see its log.", type="server_error")


def _json_error(e: APIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, APIError)
    return _json_error(e)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    if e.status_code == 404:
        message = f"there is no {request.url.path} here; the API is under /v1 (/v1/chat/completions, /v1/models)."
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(e.detail)
    return _json_error(APIError(e.status_code, message, headers=dict(e.headers or {})))


async def _internal_error(request: Request, e: Exception) -> Response:
    log.exception("request to %s failed", request.url.path, exc_info=e)
    return _json_error(_library_error(e))


# Safety: what browsers may send, slow clients, shutdown -----------------------------------------------------
class _Guard:
    """Refuses, before anything else runs and API key or not, what a web page in the user's browser could send
    to this server: a `Host` that does not name it (DNS rebinding: a page on a name its owner points at this
    machine) and an `Origin` that is neither this server's own nor an --allowed-origins one (a page posting
    across sites). Requests without these headers come from programs, not pages, and pass.

    The names a server answers to: the address it listens on and, listening on loopback, `localhost` (with
    its port); listening on all addresses (0.0.0.0 or ::), any IP address, `localhost`, this machine's name
    and `host.docker.internal`, on any port (Docker maps ports); always the --allowed-hosts names."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.names = {name.lower() for name in settings.allowed_hosts}
        ip = _ip(settings.listen_host or "127.0.0.1")
        self.everywhere = settings.listen_host == "" or (ip is not None and ip.is_unspecified)  # 0.0.0.0, ::
        machine = socket.gethostname().lower()
        self.machine = {"localhost", machine, machine.split(".")[0], machine.split(".")[0] + ".local"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                log.warning("refused %s %s: %s", scope["method"], scope["path"], error.message)
                await _json_error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        if host is not None and not self.host_allowed(host, scope.get("server")):
            return APIError(
                403,
                f"this server does not answer to the name {host!r} (Host); start it with --allowed-hosts "
                "NAME to accept a name.",
                code="host_not_allowed",
            )
        allowed = self.settings.allowed_origins
        if origin is not None and origin not in allowed and "*" not in allowed and not _same(origin, host):
            return APIError(
                403,
                f"requests from web pages at {origin} are refused; start the server with --allowed-origins "
                f"{origin} to allow them.",
                code="origin_not_allowed",
            )
        return None

    def host_allowed(self, host: str, server: tuple[str, int] | None) -> bool:
        try:
            url = urllib.parse.urlsplit(f"//{host}")
            name, port = (url.hostname or ""), url.port
        except ValueError:  # a port that is not a number
            return False
        if name in self.names or "*" in self.names:
            return True
        ip = _ip(name)
        if self.everywhere:
            return ip is not None or name in self.machine or name == "host.docker.internal"
        if server is None or (port or 80) != server[1]:
            return False
        here, loopback = _ip(server[0]), _is_loopback(server[0])
        if ip is not None:
            return ip == here or (loopback and ip.is_loopback)
        return name == (self.settings.listen_host or "").lower() or name in (
            {"localhost"} if loopback else self.machine
        )


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _is_loopback(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def _same(origin: str, host: str | None) -> bool:
    """Whether a page at `origin` is this server's own (the same scheme-less address as the request's Host)."""
    url = urllib.parse.urlsplit(origin)
    return url.scheme in ("http", "https") and host is not None and url.netloc.lower() == host.lower()


class _HTTP(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks, so slow clients cannot take the server's file
    descriptors: at most `max_connections` open connections (one more is answered 503 and closed at once), and
    `header_timeout` seconds for a request's headers, counted from the connection or from the first byte of a
    request that follows another (a client sending them a byte at a time is dropped). The body's time is
    `Settings.body_timeout`; an idle kept-alive connection closes after uvicorn's `timeout_keep_alive`."""

    max_connections = MAX_CONNECTIONS
    header_timeout = HEADER_TIMEOUT
    _header_timer: asyncio.TimerHandle | None = None
    _warned = 0.0  # when a refused connection was last logged (once in 10 s at most)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) <= self.max_connections:
            self._wait_for_headers()
            return
        if time.monotonic() - _HTTP._warned > 10:
            _HTTP._warned = time.monotonic()
            log.warning("refusing connections: %d are open (--max-connections)", self.max_connections)
        transport.write(_BUSY)
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # bytes of a request's headers
            self._wait_for_headers()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._header_timer is not None:  # a request's headers are all in
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _wait_for_headers(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._header_timer = None
        self.transport.close()


def _busy_response() -> bytes:
    error = APIError(
        503, "the server has too many open connections; retry later.", type="server_error", code="too_many_connections"
    )
    body = json.dumps(error.body()).encode()
    head = f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return (head + "connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


_BUSY = _busy_response()


class Server(uvicorn.Server):
    """uvicorn's server on `_HTTP`, stopped as `docker stop` and systemd expect: on SIGTERM or SIGINT it stops
    accepting, lets running requests finish for `grace` seconds, ends the rest (a stream gets an error event
    and [DONE], a waiting request a 503) and returns; `signal` is the signal that stopped it. (uvicorn's own
    raises the signal again once stopped, which kills the process before its caller can close the engine.)
    A second signal stops it at once."""

    def __init__(
        self,
        app: ASGIApp,
        engine: Engine,
        *,
        grace: float = SHUTDOWN_GRACE,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout: float = HEADER_TIMEOUT,
        **config: Any,
    ):
        http = type("HTTP", (_HTTP,), {"max_connections": max_connections, "header_timeout": header_timeout})
        # uvicorn cancels what is left 2 s after the engine ended the requests
        super().__init__(uvicorn.Config(app, http=http, ws="none", timeout_graceful_shutdown=grace + 2, **config))
        self.engine, self.grace = engine, grace
        self.signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.signal is not None:
            self.force_exit = True
        self.signal = self.signal or sig
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        error = APIError(503, "the server is shutting down; this request was stopped.", type="server_error",
                         code="server_shutting_down")  # fmt: skip
        ending = asyncio.get_running_loop().call_later(self.grace, self.engine.cancel_all, error)
        try:
            await super().shutdown(sockets=sockets)
        finally:
            ending.cancel()
