"""The ASGI app (Starlette): OpenAI's `/v1/chat/completions`, `/v1/models` and `/v1/models/{id}`, and `/health`.

The request handlers only check, read images, queue and stream back; the `Engine` thread does the
model work. Images are read here, off the engine thread (a slow download never holds up other
requests), and handed to the library as decoded images, so the prompt is exactly what
`model.encode(messages)` gives for the client's messages.

The parts: `guard` refuses what a web page could send and checks the API key; `requests` reads the body and
turns the request into the library's messages; `replies` builds the answer (whole or streamed) and the
error bodies; `http.Server` runs the app under uvicorn with its bounds and its way of stopping.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import Engine, Job
from .guard import Guard, authorize
from .ollama import ollama_routes
from .replies import EventStream, Reply, json_error, library_error, model_card, start_job
from .requests import read_body, resolve_messages
from .responses import responses_routes
from .schema import APIError, parse_request, request_options
from .settings import Settings

log = logging.getLogger("pixtral_mlx.server")


def create_app(settings: Settings, engine: Engine) -> Starlette:
    """The app; `engine` must be started (and loaded) by the caller."""
    created = int(time.time())

    async def health(request: Request) -> Response:
        status = "ok" if engine.pixtral is not None else "loading"
        busy = engine.running is not None
        return JSONResponse({"status": status, "model": settings.model_id, "busy": busy, "queued": engine.waiting()})

    async def models(request: Request) -> Response:
        authorize(request, settings)
        return JSONResponse({"object": "list", "data": [model_card(settings, created)]})

    async def model(request: Request) -> Response:
        authorize(request, settings)
        name = request.path_params["model"]
        if name not in (settings.model_id, *settings.aliases):
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {settings.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(model_card(settings, created))

    async def chat_completions(request: Request) -> Response:
        authorize(request, settings)
        body = await read_body(request, settings.max_body, settings.body_timeout)
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
        job = Job(messages, options, asyncio.get_running_loop(), n=req.n or 1)
        start, stop = await start_job(engine, job, request.receive)
        try:
            if start is None:  # cancelled before it started: the client is gone
                return Response(status_code=499)
            reply = Reply(req, settings.model_id, start)
            if req.stream:
                stream, stop = EventStream(reply, job, stop), None  # the stream stops them when it ends
                return stream
            return JSONResponse(await reply.collect(job))
        finally:
            if stop is not None:
                stop()

    middleware = [Middleware(Guard, settings=settings)]  # first: before CORS answers a preflight
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
            Route("/v1/models/{model:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            *(Route(path, run, methods=methods) for path, (run, methods) in ollama_routes(settings, engine).items()),
            *(Route(path, run, methods=methods) for path, run, methods in responses_routes(settings, engine)),
        ],
        middleware=middleware,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, APIError)
    return json_error(e)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    if e.status_code == 404:
        message = f"there is no {request.url.path} here; the API is under /v1 (/v1/chat/completions, /v1/models)."
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(e.detail)
    return json_error(APIError(e.status_code, message, headers=dict(e.headers or {})))


async def _internal_error(request: Request, e: Exception) -> Response:
    log.exception("request to %s failed", request.url.path, exc_info=e)
    return json_error(library_error(e))
