"""The OpenAI chat-completions request, checked: pydantic for the shape, then what this server refuses.

`parse_request` turns a request body into a `ChatRequest` or raises `APIError` (OpenAI's error shape, with
the status and the `param` that names the offending field). Fields that would change the meaning of a
reply if ignored (the legacy `functions`, audio, `n` over 8) are refused, not dropped; fields that do not (`user`,
`metadata`, `store`, ...) are accepted and ignored. `response_format` (`text`, `json_object`, `json_schema`)
becomes the library's structured output, and the penalties, `logit_bias`, `logprobs` and `top_logprobs` its
options of the same names (`request_options`), and so do `tools`, `tool_choice` and `parallel_tool_calls`; `n` is
the number of replies the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pixtral_mlx.errors import PixtralError, PromptError
from pixtral_mlx.turn import Options


@dataclass
class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "0.5" is not a number and 1.0 is not an integer, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="allow")


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, in OpenAI's shape
    tool_call_id: str | None = None  # a tool message: the call it answers


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict"} for type json_schema


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    max_edge: int | None = None  # extension: cap the longest image edge for this request
    return_token_ids: bool = False  # extension (as vLLM's): the prompt's and the reply's token ids
    n: int | None = None  # replies to generate (1 to MAX_N)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None  # token id (a string, as JSON keys are) -> bias
    tools: list[Any] | None = None  # OpenAI function tools
    tool_choice: Any = None  # "auto", "none", "required" or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool | None = None
    # Accepted only where they change nothing (see REFUSED).
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None


MAX_N = 8  # replies per request

# Field -> (is this value harmless?, what to say). Anything else is a 400 naming the field.
REFUSED: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v is None or 1 <= v <= MAX_N, f"n must be a whole number from 1 to {MAX_N} (replies per request)"),
    "functions": (lambda v: not v, "functions (the legacy function calling) are not supported: use tools"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function_call is not supported: use tool_choice"),
    "modalities": (lambda v: v is None or set(v) <= {"text"}, "this server replies with text only"),
    "audio": (lambda v: v is None, "audio output is not supported by this server"),
}
_FIELDS = set(ChatRequest.model_fields) | set(Message.model_fields) | set(StreamOptions.model_fields) | {"type"}


def parse_request(body: bytes) -> ChatRequest:
    """The request, or an `APIError` (400) naming the first field that is wrong."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name, (harmless, why) in REFUSED.items():
        if not harmless(getattr(request, name)):
            raise APIError(400, f"{why}.", param=name, code="unsupported_parameter")
    return request


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')}).")
    parts: list[str] = []
    for loc in err["loc"]:  # stop at pydantic's union-member labels ('str', 'list[str]', ...)
        if isinstance(loc, int):
            parts.append(f"[{loc}]")
        elif loc in _FIELDS:
            parts.append(loc)
        else:
            break
    if not parts:
        return APIError(400, f"the request body must be a JSON object ({err['msg'].lower()}).")
    param = ".".join(parts)
    if err["type"] == "missing":
        return APIError(400, f"'{param}' is required.", param=param)
    value = err.get("input")
    shown = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return APIError(400, f"invalid value for '{param}': {err['msg'].lower()}, got {shown}.", param=param)


def request_options(request: ChatRequest, defaults: Options, max_edge_limit: int | None) -> Options:
    """The one `Options` value of a request (the server's defaults with what the client set, the image edge
    capped by `max_edge_limit`); the library's checks, reported with the name of the field the client set."""
    from pixtral_mlx.config import FAMILY_MAX_EDGE, check_max_edge

    tokens_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    try:
        from pixtral_mlx.structured import response_format_options

        fmt = request.response_format
        structured = response_format_options(fmt.model_dump(exclude_none=True) if fmt else None)
        max_edge = check_max_edge(request.max_edge, max_edge_limit or FAMILY_MAX_EDGE)  # the model's: at encode
        return defaults.merge(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=request.stop,
            max_edge=max_edge if max_edge is not None else max_edge_limit,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=_token_ids(request.logit_bias),
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            tools=request.tools or None,
            tool_choice=request.tool_choice if request.tools or request.tool_choice != "none" else None,
            parallel_tool_calls=request.parallel_tool_calls,
            **structured,
        )
    except PixtralError as e:
        param, message = e.param, str(e)
        if param == "max_tokens":
            param, message = tokens_field, message.replace("max_tokens", tokens_field, 1)
        if param == "max_edge":
            message = message.replace("max edge", "max_edge", 1)
        if param in ("json_schema", "json_object"):
            param = "response_format"
        raise APIError(400, message, param=param) from None


def _token_ids(bias: dict[str, Any] | None) -> dict[int, Any] | None:
    """`logit_bias` with its keys (JSON strings) as token ids; `Options` checks the ids and the values."""
    if bias is None:
        return None
    out: dict[int, Any] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 9:
            raise PromptError(f"logit_bias keys must be token ids (whole numbers), got {key!r}.", param="logit_bias")
        out[int(key)] = value
    return out
