"""Structured output: replies that always parse as JSON (any object, or one that matches a JSON Schema).

Mistral's own guidance tools do the work (`mistral_common.guidance`, on top of llguidance): its grammar
factory renders the Lark grammar of a JSON-only answer and its tekken adapter gives llguidance the
vocabulary; llguidance's matcher says which tokens may come next. `JsonConstraint` is an mlx-lm logits
processor on the one turn path: it masks the logits to those tokens and advances with each sampled token;
once the JSON is complete only EOS is allowed, so the reply ends there. `response_format_options` maps
OpenAI's `response_format` onto the options that ask for it.

Schemas are checked before any of this, when the `Options` are built (`schemas.check_schema`), with the same
layout and compile limits. No MLX or llguidance at import.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from . import schemas
from .errors import PromptError

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # what `json_object=True` asks for


def response_format_options(response_format: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI's `response_format` as keyword arguments of `stream`/`generate`/`Chat`.

    `{"type": "text"}` (or None) -> `{}`; `{"type": "json_object"}` -> `{"json_object": True}`;
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}` ->
    `{"json_schema": {...}}`. The schema is enforced whatever `strict` says (as vLLM and llama.cpp do).
    The schema itself is checked, bounded and copied when the options are built (not here: a deep copy of an
    unchecked schema is what a request nested 10,000 levels deep would break).
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
        return {"json_schema": spec["schema"]}
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

        if not is_tekkenizer(tokenizer.instruct_tokenizer.tokenizer):  # guidance has no SentencePiece vocabulary
            raise PromptError(
                "structured output needs a tekken tokenizer: mistral_common's grammars do not support this "
                "model's SentencePiece tokenizer (Pixtral-Large).",
                param="json_schema",
            )

        class TekkenGrammarFactory(GrammarFactory):
            @staticmethod
            def is_supported(tokenizer: Any) -> bool:
                return is_tekkenizer(tokenizer.instruct_tokenizer.tokenizer)

        factory = _factories[tokenizer] = TekkenGrammarFactory(tokenizer)
    return factory


LEADING_WHITESPACE = "SAFE_WS? %json"  # mistral_common's JSON-only grammar lets an answer open with 1-8 of them


def json_grammar(factory: Any, schema: dict[str, Any]) -> str:
    """The Lark grammar of an answer that is JSON matching `schema` (mistral_common's JSON-only grammar), with
    no whitespace before the value: the first token starts the JSON (`{`, `[`, a quote, a digit ...), so a
    reply is exactly its JSON, as `json.dumps` would lay it out. (Tokenizers with `[THINK]` get mistral_common's
    think template, whose JSON rule is `json_grammar:` rather than `start:`; the thinking is `logits_processors`'
    concern, see `reasoning.optional_think`.)"""
    grammar = factory.get_lark_for_json_schema(factory.select_jinja_template(), schemas.grammar_schema(schema))
    lines = grammar.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("start: ", "json_grammar: ")) and LEADING_WHITESPACE in line:
            lines[i] = line.replace(LEADING_WHITESPACE, "%json", 1)
            return "\n".join(lines)
    raise RuntimeError(f"mistral_common's JSON grammar has no {LEADING_WHITESPACE!r} rule")  # an upgrade changed it


class JsonConstraint:
    """An mlx-lm logits processor: only tokens that keep the reply on the grammar keep their logits.

    mlx-lm calls it once per step with the tokens fed so far (the prompt of this call, then each sampled
    token) and the next-token logits. The first call is the step after the prompt; each later call first
    advances the matcher by the token sampled last, so the matcher sees exactly this reply's tokens.
    """

    def __init__(self, factory: Any, grammar: str):
        import llguidance
        import numpy as np

        tokenizer = factory.llg_tokenizer
        try:  # as schemas.check_schema compiles: on a large stack, for at most COMPILE_SECONDS
            self.matcher = schemas.with_compile_limits(lambda: llguidance.LLMatcher(tokenizer, grammar, log_level=0))
        except TimeoutError:
            raise PromptError(
                f"the JSON grammar takes longer than {schemas.COMPILE_SECONDS:g} s to compile.", param="json_schema"
            ) from None
        if self.matcher.is_error():  # check_schema caught what a user can get wrong; this is a safety net
            reason = self.matcher.get_error().strip().splitlines()[0]
            raise PromptError(f"the JSON grammar does not compile: {reason}.", param="json_schema")
        self.vocab_size = tokenizer.vocab_size
        self.bitmask = np.zeros((1, (self.vocab_size + 31) // 32), dtype=np.int32)
        self._compute_mask()  # a grammar past the parser's limits can fail here already: before any model work
        self.started = False
        self.steps = 0  # masks computed
        self.seconds = 0.0  # time spent advancing the matcher and computing masks (the grammar's cost)

    def _compute_mask(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        if self.matcher.is_error():  # the mask would allow only EOS: the reply would end as invalid JSON
            self._too_complex()

    def _too_complex(self) -> None:
        """The parser's limits (items per row and per step, lexer fuel) stop a grammar such as a long chain
        of `$ref`s or `anyOf`s, at the first mask or mid-reply: one sentence rather than a broken reply."""
        reason = self.matcher.get_error().strip().splitlines()[0].rstrip(".")
        raise PromptError(f"json_schema is too complex to enforce: {reason}.", param="json_schema")

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        import numpy as np

        tic = time.perf_counter()
        if self.started:  # advance by the token sampled last; the first mask was computed at construction
            token = tokens[-1].item()
            if not self.matcher.consume_token(token):
                words = self.bitmask.view(np.uint32)[0]
                if token >= self.vocab_size or not words[token // 32] >> (token % 32) & 1:  # sampled off the mask
                    raise RuntimeError(f"token {token} broke the JSON grammar: {self.matcher.get_error()}")
                self._too_complex()  # an allowed token that the parser's limits stopped
            self._compute_mask()
        self.started = True
        self.steps += 1
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
    before any model work. With a tokenizer that has `[THINK]` the reply may open with a free thinking section."""
    if options.json_schema is None and not options.json_object:
        return []
    from .reasoning import optional_think, think_ids

    schema = JSON_OBJECT_SCHEMA if options.json_schema is None else options.json_schema
    factory = grammar_factory(encoder.tokenizer)
    # a reasoning model thinks freely first: the grammar constrains the answer after [/THINK]
    grammar = optional_think(json_grammar(factory, schema), think_ids(encoder.text))
    return [JsonConstraint(factory, grammar)]
