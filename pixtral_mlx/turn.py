"""What a turn takes and yields: validated generation `Options`; `Chunk`s while it streams and a `Reply`
when collected, both with mlx-lm's statistic names.

No MLX at import, so the CLI, the chat app and the server can use these before loading the framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .config import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .errors import PromptError

MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
KV_BITS = (4, 8)  # mlx-lm's QuantizedKVCache; below 4 bits quality drops sharply
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty: -2..2, as OpenAI allows
MAX_BIAS = 100.0  # logit_bias values: -100..100, as OpenAI allows
MAX_BIASED = 300  # logit_bias entries per request
MAX_TOP_LOGPROBS = 20  # alternatives per generated token, as OpenAI allows


@dataclass
class Stats:
    """mlx-lm's `GenerationResponse` statistic names: the one list of them."""

    prompt_tokens: int = 0  # tokens prefilled by this call (a reused cache prefix is not counted)
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0  # GB
    finish_reason: str | None = None  # "stop", "length" or "interrupted"

    def stats(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(Stats)}


@dataclass
class Chunk(Stats):
    """One streamed piece of a reply; the last one carries `finish_reason`.

    With `Options.logprobs`, a chunk with a `token` carries its `logprob` and the `top_logprobs` (token id,
    log-probability) pairs, most likely first: log-softmax of the logits the sampler saw (after the logits
    processors: penalties, `logit_bias`, a JSON grammar's mask), before temperature and top-p.

    `text` is the answer; a reasoning model's thinking (`[THINK]…[/THINK]`, see reasoning.py) is `reasoning`."""

    text: str = ""
    reasoning: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Reply(Stats):
    """A whole reply: its text (the answer), its `reasoning` (a reasoning model's thinking, else ""), its tokens
    (both's, with `[THINK]`/`[/THINK]`), and the statistics of its last chunk."""

    text: str = ""
    reasoning: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # one per token, with `Options.logprobs`
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # one list per token, likewise
    # OpenAI's `tool_calls` when the reply is tool calls (with `Options.tools`; filled in by `Chat`):
    # [{"id", "type": "function", "function": {"name", "arguments": a JSON string}}]; `finish_reason` "tool_calls"
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.reasoning += chunk.reasoning
        if chunk.token is not None:
            self.tokens.append(chunk.token)
            if chunk.logprob is not None:
                self.logprobs.append(chunk.logprob)
                self.top_logprobs.append(list(chunk.top_logprobs))
        for f in fields(Stats):
            setattr(self, f.name, getattr(chunk, f.name))


def collect(chunks: Iterator[Chunk]) -> Reply:
    reply = Reply()
    for chunk in chunks:
        reply.add(chunk)
    return reply


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bias(bias: Any) -> dict[int, float]:
    """`logit_bias` as {token id: bias}, every id a whole number of at least 0 (the vocabulary's size is checked
    when a turn is planned) and every bias a number from -100 to 100."""
    if not isinstance(bias, dict):
        raise PromptError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}.", param="logit_bias")
    if len(bias) > MAX_BIASED:
        raise PromptError(f"logit_bias must have at most {MAX_BIASED} entries, got {len(bias)}.", param="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not _whole(key) or key < 0:
            raise PromptError(f"logit_bias keys must be token ids (whole numbers), got {key!r}.", param="logit_bias")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and -MAX_BIAS <= value <= MAX_BIAS
        if not ok:
            raise PromptError(
                f"logit_bias values must be numbers from -{MAX_BIAS:g} to {MAX_BIAS:g}, got {value!r} for token {key}.",
                param="logit_bias",
            )
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class Options:
    """Generation options, checked once: a bad value is a `PromptError` naming the allowed range."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    kv_bits: int | None = None  # quantize the KV cache to 4 or 8 bits (None: the compute dtype)
    kv_group_size: int = 64  # elements sharing one scale and bias in the quantized KV cache
    stop: tuple[str, ...] = ()  # strings that end the reply; never part of its text (a str is one of them)
    json_schema: dict[str, Any] | None = None  # the reply is JSON that matches this JSON Schema
    json_object: bool = False  # the reply is a JSON object
    max_edge: int | None = None  # cap on the longest image edge in pixels (None: the model's image size)
    # OpenAI's penalties: each generated token's logit minus frequency_penalty x (times it was generated so far)
    # and presence_penalty x (1 if it was generated so far); the prompt's tokens do not count.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100..100) at every step
    logprobs: bool = False  # each chunk carries its token's log-probability (see `Chunk`)
    top_logprobs: int = 0  # and this many most likely alternatives (0..20; needs logprobs)
    # OpenAI function tools ({"type": "function", "function": {"name", "description", "parameters"}}), encoded
    # through mistral_common; tool_choice: "auto" (None), "none", "required" or {"type": "function",
    # "function": {"name": ...}}; the last two are enforced by a grammar (see tools.py)
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        from .config import check_max_edge

        def bad(param: str, rule: str) -> PromptError:
            return PromptError(f"{param} must be {rule}, got {getattr(self, param)!r}.", param=param)

        check_max_edge(self.max_edge)

        if not _whole(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "a whole number of at least 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", "a number of at least 0 (0 is greedy)")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a number of at least 0 (0 is greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number greater than 0 and at most 1")
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"a whole number from 0 to {MAX_SEED}")
        if self.kv_bits is not None and (not _whole(self.kv_bits) or self.kv_bits not in KV_BITS):
            raise bad("kv_bits", "4 or 8 (or None for an unquantized KV cache)")
        if not _whole(self.kv_group_size) or self.kv_group_size not in KV_GROUP_SIZES:
            raise bad("kv_group_size", "32, 64 or 128")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"at most {MAX_STOP} strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.json_object, bool):
            raise bad("json_object", "True or False")
        if self.json_schema is not None:
            if self.json_object:
                raise PromptError(
                    "json_object and json_schema cannot be combined; a schema already asks for JSON.",
                    param="json_object",
                )
            from .schemas import check_schema  # llguidance, imported only when a schema is given

            object.__setattr__(self, "json_schema", check_schema(self.json_schema))
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not -MAX_PENALTY <= value <= MAX_PENALTY
            ):
                raise bad(name, f"a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}")
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _check_bias(self.logit_bias))
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "True or False")
        if not _whole(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"a whole number from 0 to {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise PromptError("top_logprobs needs logprobs to be set to true.", param="top_logprobs")
        if self.tools is not None or self.tool_choice is not None:
            from .tools import check_tool_choice, check_tools

            tools = check_tools(self.tools) if self.tools else None
            object.__setattr__(self, "tools", tools)
            object.__setattr__(self, "tool_choice", check_tool_choice(self.tool_choice, tools))
            forced = self.tool_choice == "required" or isinstance(self.tool_choice, dict)
            if forced and (self.json_schema is not None or self.json_object):
                raise PromptError(
                    "a forced tool call cannot be combined with a JSON response format.", param="tool_choice"
                )
        if not isinstance(self.parallel_tool_calls, bool):
            raise bad("parallel_tool_calls", "True or False")

    @classmethod
    def of(cls, options: Options | None = None, **overrides: Any) -> Options:
        """`options` (default: the defaults) with `overrides` by name: how every library entry point takes
        its options, so a caller builds one `Options` and passes it on, or names a few."""
        if options is not None and not isinstance(options, Options):
            raise PromptError(f"options must be an Options value, not {type(options).__name__}.", param="options")
        return (options or cls()).merge(**overrides)

    def merge(self, **overrides: Any) -> Options:
        """These options with every override that is not None (so callers can pass their defaults through)."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}: not a generation option")  # a caller's bug
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def sampler(self) -> Callable[[Any], Any]:
        """mlx-lm's sampler for these options (seeding MLX's generator first when a seed is set)."""
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        return make_sampler(temp=self.temperature, top_p=self.top_p if self.top_p < 1 else 0.0)
