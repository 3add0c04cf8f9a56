"""A chat request turned into the library's messages: the body read (JSON, bounded in size and time), then
every message and content part checked and every image read and checked (`resolve_messages`, on a worker
thread, so a slow download never holds up other requests)."""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import Any

from starlette.requests import Request

from pixtral_mlx.errors import ImageError
from pixtral_mlx.images import PixelBudget, describe_source, read_source

from .schema import APIError, ChatRequest
from .settings import Settings


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
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


def resolve_messages(request: ChatRequest, settings: Settings) -> list[dict[str, Any]]:
    """The request's messages in the library's format, every image read and checked (on a worker thread)."""
    out: list[dict[str, Any]] = []
    budget = None if settings.max_request_pixels is None else PixelBudget(settings.max_request_pixels)
    for i, m in enumerate(request.messages):
        where = f"messages.[{i}]"
        if m.model_extra and m.model_extra.get("function_call"):
            raise APIError(
                400, "function_call messages are not supported: use tool_calls.", param=f"{where}.function_call"
            )
        role = "system" if m.role == "developer" else m.role
        extra: dict[str, Any] = {}
        if m.tool_calls:
            if role != "assistant":
                raise APIError(400, "only assistant messages can carry tool_calls.", param=f"{where}.tool_calls")
            extra["tool_calls"] = [_tool_call(call, f"{where}.tool_calls.[{j}]") for j, call in enumerate(m.tool_calls)]
        if role == "tool":
            if not m.tool_call_id:
                raise APIError(
                    400, f"'{where}.tool_call_id' is required for a tool message.", param=f"{where}.tool_call_id"
                )
            extra["tool_call_id"] = m.tool_call_id
        if m.content is None or isinstance(m.content, str):
            if m.content is None and role == "user":
                raise APIError(400, f"'{where}.content' is required for a user message.", param=f"{where}.content")
            content = None if m.content is None and "tool_calls" in extra else m.content or ""
            out.append({"role": role, "content": content, **extra})
            continue
        parts = [_part(part, f"{where}.content.[{j}]", role, settings, budget) for j, part in enumerate(m.content)]
        out.append({"role": role, "content": parts, **extra})
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An assistant's tool call in OpenAI's shape, checked: its `arguments` a string holding JSON."""
    import json

    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise APIError(
            400, f"'{where}' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}.",
            param=where,
        )  # fmt: skip
    try:
        json.loads(fn["arguments"])
    except ValueError:
        raise APIError(
            400, f"'{where}.function.arguments' must be a JSON string.", param=f"{where}.function.arguments"
        ) from None
    return {
        "id": str(call.get("id") or ""),
        "type": "function",
        "function": {"name": fn["name"], "arguments": fn["arguments"]},
    }


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
