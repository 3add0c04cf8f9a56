"""Tool calls (function calling): OpenAI's `tools` and `tool_choice` checked, the model's calls parsed, and the
grammar that forces a call.

The prompt side is mistral_common's (`prompt.py` maps OpenAI's tools, assistant `tool_calls` and `tool` messages
onto its `Tool`, `ToolCall`, `ToolMessage`). The model answers a call in its tokenizer's format:

- up to v7 (Pixtral-12B's tekken v3, Mistral Small 3.1's v7, Pixtral-Large's SentencePiece v7): `[TOOL_CALLS]` then
  a JSON list `[{"name": ..., "arguments": {...}}, ...]`;
- v11: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`, once per call (mistral_common's `InstructTokenizerV11`);
- from v13: `[TOOL_CALLS]name[ARGS]{...}`, once per call: no call ids (`InstructTokenizerV13`).

`parse_tool_calls` reads either from the reply's token ids (the special tokens are not in its text) into OpenAI's
`tool_calls`. `tool_choice` `"required"` or a named function is enforced with a grammar on the same logits
processor as JSON output (`structured.JsonConstraint`): from v11 mistral_common's own tool-call grammar; for
earlier tekken tokenizers (whose factory upstream does not serve) `[TOOL_CALLS]` followed by a JSON list whose items
are `{"name": <a tool's name>, "arguments": <that tool's parameters>}`. Either way the arguments validate against
the tool's parameters. mistral_common's guidance has no SentencePiece vocabulary, so Pixtral-Large cannot be forced
(one sentence). `"none"` bans `[TOOL_CALLS]`; `"auto"` leaves the model free.

Tool call ids: tekken v3 takes ids of exactly 9 letters and digits. An OpenAI id of that form is used as is; any
other (`call_...`) is mapped to one deterministically (`mistral_id`: a hash of the id), so the same conversation
always encodes to the same tokens. The ids of the calls we return are made that way already (from the reply's
tokens), so they round-trip unchanged. No MLX at import.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .errors import PromptError

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VALID_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
CHOICES = ("auto", "none", "required")


def mistral_id(openai_id: Any) -> str:
    """A tool call id as tekken takes it (9 letters and digits): the id itself if it is one, else a hash of it."""
    text = str(openai_id)
    if _VALID_ID.match(text):
        return text
    number = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")
    out = []
    for _ in range(9):
        number, digit = divmod(number, len(ALPHABET))
        out.append(ALPHABET[digit])
    return "".join(out)


def check_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI function tools, checked and copied: each `{"type": "function", "function": {"name", "description"?,
    "parameters"?}}`, the parameters a JSON Schema structured output can enforce."""
    from .schemas import check_schema

    if not isinstance(tools, (list, tuple)):
        raise PromptError(f"tools must be a list of function tools, not {type(tools).__name__}.", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise PromptError(f'{where} must be {{"type": "function", "function": {{...}}}}.', param="tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise PromptError(f"{where}.function must have a name.", param="tools")
        if not re.match(r"^[a-zA-Z0-9_-]{1,64}$", fn["name"]):
            raise PromptError(f"{where}.function.name must be 1-64 letters, digits, _ or -.", param="tools")
        if fn["name"] in names:
            raise PromptError(f"{where}.function.name {fn['name']!r} is given twice.", param="tools")
        names.add(fn["name"])
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise PromptError(f"{where}.function.description must be a string.", param="tools")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        try:
            params = check_schema(params, f"{where}.function.parameters")
        except PromptError as e:
            raise PromptError(str(e), param="tools") from None
        out.append(
            {"type": "function", "function": {"name": fn["name"], "description": description, "parameters": params}}
        )
    return tuple(out)


def check_tool_choice(choice: Any, tools: tuple[dict[str, Any], ...] | None) -> Any:
    """`auto`, `none`, `required` or `{"type": "function", "function": {"name": ...}}` naming one of `tools`."""
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise PromptError(
                f"tool_choice must be auto, none, required or a named function, got {choice!r}.", param="tool_choice"
            )
        if choice == "required" and not tools:
            raise PromptError("tool_choice required needs tools.", param="tool_choice")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise PromptError(
            'a named tool_choice must be {"type": "function", "function": {"name": ...}}.', param="tool_choice"
        )
    if name not in {t["function"]["name"] for t in tools or ()}:
        raise PromptError(
            f"tool_choice names the function {name!r}, which is not among the tools.", param="tool_choice"
        )
    return {"type": "function", "function": {"name": name}}


def forced(options: Any) -> bool:
    """Whether these options force a tool call (`required` or a named function)."""
    return bool(options.tools) and (options.tool_choice == "required" or isinstance(options.tool_choice, dict))


def calls_active(options: Any) -> bool:
    """Whether a reply under these options may hold tool calls (tools given, `tool_choice` not `none`)."""
    return bool(options.tools) and options.tool_choice != "none"


# Encoding ----------------------------------------------------------------------------------------------------
def mistral_tools(tools: Any) -> list[Any] | None:
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    if not tools:
        return None
    return [Tool(function=Function(**t["function"])) for t in tools]


def mistral_tool_choice(choice: Any) -> Any:
    from mistral_common.protocol.instruct.tool_calls import NamedToolChoice, ToolChoiceEnum

    if choice is None:
        return ToolChoiceEnum.auto
    if isinstance(choice, dict):
        return NamedToolChoice.model_validate(choice)
    return ToolChoiceEnum(choice)


def mistral_tool_calls(calls: Any, where: str = "tool_calls") -> list[Any]:
    """OpenAI `tool_calls` of an assistant message -> mistral_common `ToolCall`s (ids via `mistral_id`)."""
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    if not isinstance(calls, list):
        raise PromptError(f"{where} must be a list of tool calls.")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise PromptError(
                f'{where}[{i}] must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}.'
            )
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        try:
            json.loads(arguments)
        except ValueError:
            raise PromptError(f"{where}[{i}].function.arguments must be a JSON string.") from None
        call_id = mistral_id(call.get("id") or f"{fn['name']}{i}")
        out.append(ToolCall(id=call_id, function=FunctionCall(name=fn["name"], arguments=arguments)))
    return out


# Parsing -----------------------------------------------------------------------------------------------------
def special_id(tekken: Any, piece: str) -> int | None:
    """The id of a special token of this tekken, or None where it has none."""
    for i in range(tekken.num_special_tokens):
        if tekken.id_to_piece(i) == piece:
            return i
    return None


def _text(tekken: Any, tokens: list[int]) -> str:
    n = tekken.num_special_tokens
    return b"".join(tekken.id_to_byte_piece(t) for t in tokens if t >= n).decode("utf-8", errors="replace")


def _content(tokenizer: Any, tokens: list[int]) -> str:
    """The text of the tokens before the calls, as the tokenizer decodes it (SentencePiece drops the first
    piece's space)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return _text(tokenizer, tokens)
    return decode([t for t in tokens if t >= tokenizer.num_special_tokens])


def call_id(tokens: list[int], index: int) -> str:
    """The id of the `index`th call of a reply: from its tokens, so the same reply gets the same ids."""
    return mistral_id(f"{tokens}:{index}")


def parse_tool_calls(tekken: Any, tokens: list[int]) -> tuple[str, list[dict[str, Any]]] | None:
    """(content before the calls, OpenAI `tool_calls`) of a reply's token ids, or None when it holds no complete
    tool call. Every format: `[TOOL_CALLS][{"name", "arguments"}, ...]` (up to v7),
    `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` (v11; the model's id becomes the call's when it is one tekken takes)
    and `[TOOL_CALLS]name[ARGS]{...}` (from v13). `arguments` is a JSON string, as OpenAI sends it."""
    marker = special_id(tekken, "[TOOL_CALLS]")
    eos = getattr(tekken, "eos_id", None)
    tokens = [t for t in tokens if t != eos]
    if marker is None or marker not in tokens:
        return None
    first = tokens.index(marker)
    content = _content(tekken, tokens[:first])
    args = special_id(tekken, "[ARGS]")
    call_id_token = special_id(tekken, "[CALL_ID]")
    pairs: list[tuple[str, Any]] = []
    ids: list[str | None] = []
    if args is not None and args in tokens[first:]:  # from v11: [TOOL_CALLS]name[ARGS]{...}, repeated
        segments, current = [], []
        for t in tokens[first + 1 :]:
            if t == marker:
                segments.append(current)
                current = []
            else:
                current.append(t)
        segments.append(current)
        for seg in segments:
            if args not in seg:
                return None
            cut = seg.index(args)
            head, given = seg[:cut], None
            if call_id_token is not None and call_id_token in head:  # v11: name[CALL_ID]id
                at = head.index(call_id_token)
                head, given = head[:at], _text(tekken, head[at + 1 :]).strip()
            try:
                pairs.append((_text(tekken, head).strip(), json.loads(_text(tekken, seg[cut + 1 :]))))
            except ValueError:
                return None
            ids.append(given if given and _VALID_ID.match(given) else None)
    else:  # up to v7: one JSON list (a lone object is taken too)
        try:
            value = json.loads(_text(tekken, [t for t in tokens[first + 1 :] if t != marker]))
        except ValueError:
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return None
            pairs.append((item["name"], item.get("arguments", {})))
    if not pairs:
        return None
    calls = []
    for i, (name, arguments) in enumerate(pairs):
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        given = ids[i] if i < len(ids) else None
        calls.append(
            {"id": given or call_id(tokens, i), "type": "function", "function": {"name": name, "arguments": text}}
        )
    return content, calls


# Grammar ------------------------------------------------------------------------------------------------------
def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool["function"]["name"]}, "arguments": tool["function"]["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _selected(options: Any) -> list[dict[str, Any]]:
    if isinstance(options.tool_choice, dict):
        return [t for t in options.tools if t["function"]["name"] == options.tool_choice["function"]["name"]]
    return list(options.tools)


def tool_grammar(factory: Any, tekken: Any, options: Any) -> str:
    """The Lark grammar of a reply that is tool calls only, for this tokenizer's format."""
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    from .schemas import grammar_schema

    tools = _selected(options)
    marker = special_id(tekken, "[TOOL_CALLS]")
    if marker is None:
        raise PromptError("this model's tokenizer has no [TOOL_CALLS] token: it cannot call tools.", param="tools")
    if tekken.version >= TokenizerVersion.v11:
        from mistral_common.protocol.instruct.messages import UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.protocol.instruct.tool_calls import Function, Tool

        # our JSON layout (`grammar_schema`: no free whitespace), as for the earlier format and JSON output
        strict = [
            Tool(
                function=Function(
                    **{**t["function"], "parameters": grammar_schema(t["function"]["parameters"])}, strict=True
                )
            )
            for t in options.tools
        ]
        request = ChatCompletionRequest(
            messages=[UserMessage(content="")],
            tools=strict,
            tool_choice=mistral_tool_choice(options.tool_choice),
            parallel_tool_calls=options.parallel_tool_calls,
        )
        # mistral_common's template for a tokenizer with [THINK] lets free text precede the calls, which a forced
        # call must not: its base template, after an optional free thinking section (as JSON output has)
        from mistral_common.guidance.grammar_factory import _cached_get_jinja_template

        from .reasoning import optional_think, think_ids

        base = _cached_get_jinja_template(tokenizer_version=tekken.version, has_think_tokens=False)
        return optional_think(factory.get_grammar_for_chat_request(request, base), think_ids(tekken))
    items = [_call_schema(t) for t in tools]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": items[0] if len(items) == 1 else {"anyOf": items},
    }
    if not options.parallel_tool_calls:
        schema["maxItems"] = 1
    return f"start: <[{marker}]> %json {json.dumps(grammar_schema(schema), ensure_ascii=False)}"


class BanTokens:
    """An mlx-lm logits processor that never lets these tokens be sampled (`tool_choice: "none"`)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        banned = np.zeros(logits.shape[-1], dtype=np.bool_)
        banned[[t for t in self.tokens if t < banned.size]] = True
        return mx.where(mx.array(banned), mx.array(-mx.inf, dtype=logits.dtype), logits)


def logits_processors(options: Any, encoder: Any) -> list[Any]:
    """What a turn with tools needs: the call grammar when a call is forced, a ban on `[TOOL_CALLS]` for
    `tool_choice: "none"`, nothing otherwise. Built now, so a grammar error is raised before any model work."""
    if not options.tools:
        return []
    tekken = encoder.text
    if options.tool_choice == "none":
        marker = special_id(tekken, "[TOOL_CALLS]")
        return [] if marker is None else [BanTokens([marker])]
    if not forced(options):
        return []
    if getattr(encoder, "sentencepiece", False):
        raise PromptError(
            "tool_choice required or a named function needs a tekken tokenizer: mistral_common's grammars do not "
            "support this model's SentencePiece tokenizer (Pixtral-Large); use tool_choice auto.",
            param="tool_choice",
        )
    from .structured import JsonConstraint, grammar_factory

    factory = grammar_factory(encoder.tokenizer)
    return [JsonConstraint(factory, tool_grammar(factory, tekken, options))]
