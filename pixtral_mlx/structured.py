"""Structured output: replies that always parse as JSON (any object, or one that matches a JSON Schema).

Mistral's own guidance tools do the work (`mistral_common.guidance`, on top of llguidance): its grammar
factory renders the Lark grammar of a JSON-only answer and its tekken adapter gives llguidance the
vocabulary; llguidance's matcher says which tokens may come next. `JsonConstraint` is an mlx-lm logits
processor on the one turn path: it masks the logits to those tokens and advances with each sampled token;
once the JSON is complete only EOS is allowed, so the reply ends there.

Schemas are checked (`check_schema`) without a tokenizer or a model, in milliseconds, so every surface can
refuse a bad one before any work. No MLX or llguidance at import.
"""

from __future__ import annotations

import copy
import json
import time
import weakref
from typing import Any

from .errors import PromptError

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # what `json_object=True` asks for
# The JSON's layout, as `json.dumps` writes it: ", " and ": " between items and no other whitespace. Fixed
# separators keep greedy decoding to one spelling per value and stop a model from padding the answer with
# whitespace until max_tokens (a known failure of flexible-whitespace grammars). A schema's own
# "x-guidance" options win over these.
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llguidance compiles it: with our layout unless the schema sets its own."""
    return {**schema, "x-guidance": {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}}


def check_schema(schema: Any, name: str = "json_schema") -> dict[str, Any]:
    """A copy of `schema` if it is a JSON Schema that constrained decoding supports; else a one-sentence
    `PromptError(param="json_schema")` that starts with `name` (the CLI passes its flag and file)."""
    if not isinstance(schema, dict):
        raise PromptError(
            f"{name} must be a JSON Schema object (a dict), got {type(schema).__name__}.", param="json_schema"
        )
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PromptError(f"{name} must hold only JSON values ({e}).", param="json_schema") from None
    import jsonschema

    try:
        jsonschema.Draft7Validator.check_schema(schema)  # the check mistral_common's own `JsonSchema` makes
    except jsonschema.SchemaError as e:
        where = f" at {e.json_path}" if e.path else ""
        reason = e.message.rstrip(".")
        raise PromptError(f"{name} is not a valid JSON Schema{where}: {reason}.", param="json_schema") from None
    import llguidance

    grammar = llguidance.grammar_from("json_schema", json.dumps(_grammar_schema(schema)))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        reason = error.strip().splitlines()[0].rstrip(".")
        raise PromptError(
            f"{name} uses something structured output does not support: {reason}.", param="json_schema"
        ) from None
    return json.loads(text)  # a deep copy: later edits of the caller's dict change nothing here


def response_format_options(response_format: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's `response_format` as keyword arguments of `stream`/`generate`/`Chat`.

    `{"type": "text"}` (or None) -> `{}`; `{"type": "json_object"}` -> `{"json_object": True}`;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}` ->
    `{"json_schema": {...}}`. The schema is enforced whatever `strict` says (as vLLM and llama.cpp do).
    The schema itself is checked when the options are built.
    """
    if response_format is None:
        return {}
    if not isinstance(response_format, dict):
        raise PromptError("response_format must be an object with a `type`.", param="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise PromptError(
                'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}.',
                param="response_format",
            )
        return {"json_schema": copy.deepcopy(spec["schema"])}
    raise PromptError(
        f"response_format type must be text, json_object or json_schema, got {kind!r}.", param="response_format"
    )


# Grammar factories, one per tokenizer: building llguidance's view of the 131072-token vocabulary takes ~2 s.
_factories: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def grammar_factory(tokenizer: Any) -> Any:
    """mistral_common's `GrammarFactory` for a `MistralTokenizer` (tekken), built once per tokenizer.

    Upstream accepts tekken v11 and later because its tool-call grammars name tokens that v11 added;
    the JSON-only grammar used here names no special token, so Pixtral's tekken v3 is served as well.
    """
    factory = _factories.get(tokenizer)
    if factory is None:
        from mistral_common.guidance.grammar_factory import GrammarFactory
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        class TekkenGrammarFactory(GrammarFactory):
            @staticmethod
            def is_supported(tokenizer: Any) -> bool:
                return is_tekkenizer(tokenizer.instruct_tokenizer.tokenizer)

        factory = _factories[tokenizer] = TekkenGrammarFactory(tokenizer)
    return factory


def json_grammar(factory: Any, schema: dict[str, Any]) -> str:
    """The Lark grammar of an answer that is JSON matching `schema` (mistral_common's JSON-only grammar)."""
    return factory.get_lark_for_json_schema(factory.select_jinja_template(), _grammar_schema(schema))


class JsonConstraint:
    """An mlx-lm logits processor: only tokens that keep the reply on the grammar keep their logits.

    mlx-lm calls it once per step with the tokens fed so far (the prompt of this call, then each sampled
    token) and the next-token logits. The first call is the step after the prompt; each later call first
    advances the matcher by the token sampled last, so the matcher sees exactly this reply's tokens.
    """

    def __init__(self, factory: Any, grammar: str):
        import llguidance
        import numpy as np

        self.matcher = llguidance.LLMatcher(factory.llg_tokenizer, grammar)
        if self.matcher.is_error():  # check_schema caught what a user can get wrong; this is a safety net
            reason = self.matcher.get_error().strip().splitlines()[0]
            raise PromptError(f"the JSON grammar does not compile: {reason}.", param="json_schema")
        self.vocab_size = factory.llg_tokenizer.vocab_size
        self.bitmask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)
        self.started = False
        self.steps = 0  # masks computed
        self.seconds = 0.0  # time spent advancing the matcher and computing masks (the grammar's cost)

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        token = tokens[-1].item() if self.started else None  # waits for the sampled token
        tic = time.perf_counter()
        if token is not None and not self.matcher.consume_token(token):  # only allowed tokens can be sampled
            raise RuntimeError(f"token {token} broke the JSON grammar: {self.matcher.get_error()}")
        self.started = True
        self.steps += 1
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").view(np.bool_)
        vocab = logits.shape[-1]
        if allowed.size < vocab:  # a model vocabulary padded beyond the tokenizer's
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.size, dtype=np.bool_)])
        mask = mx.array(allowed[:vocab])
        self.seconds += time.perf_counter() - tic
        return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))


def logits_processors(options: Any, encoder: Any) -> list[Any]:
    """The processors a turn with these `Options` needs (none without a JSON constraint), for the
    `PromptEncoder`'s tokenizer. Builds the grammar and its matcher now, so a grammar error is raised
    before any model work."""
    if options.json_schema is None and not options.json_object:
        return []
    schema = JSON_OBJECT_SCHEMA if options.json_schema is None else options.json_schema
    factory = grammar_factory(encoder.tokenizer)
    return [JsonConstraint(factory, json_grammar(factory, schema))]
