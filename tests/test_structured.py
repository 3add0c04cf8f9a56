"""Structured output on the tiny random checkpoint, whose unconstrained output is gibberish: under a JSON
Schema every reply parses and validates; greedy decoding equals a step-by-step reference that masks full
forward passes with a fresh llguidance matcher; chat turns; bad schemas refused before any work; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import PromptError
from pixtral_mlx.schemas import check_schema
from pixtral_mlx.structured import JSON_OBJECT_SCHEMA, response_format_options
from pixtral_mlx.turn import Options

# Nested objects, an array of objects with an array of enums, enums, numbers and integers with bounds, a
# boolean, required and optional fields. Strings are short and no object takes other properties, so a
# complete reply always fits in MAX_TOKENS even when the model is random.
ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["food", "drink", "fuel"]}, "maxItems": 2},
    },
    "required": ["name", "qty"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 6},
        "total": {"type": "number", "minimum": 0, "maximum": 10000},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "paid": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 2},
    },
    "required": ["store", "total", "currency", "items"],
    "additionalProperties": False,
}
MAX_TOKENS = 300
ASK = [{"role": "user", "content": "Read this receipt into JSON."}]


def test_every_sampled_reply_parses_and_validates(pixtral):
    plain = pixtral.generate(ASK, temperature=1.0, top_p=1.0, seed=0, max_tokens=12)
    with pytest.raises(ValueError):  # what the random model writes on its own
        json.loads(plain.text)
    for seed in range(20):
        reply = pixtral.generate(ASK, json_schema=SCHEMA, temperature=1.0, top_p=1.0, seed=seed, max_tokens=MAX_TOKENS)
        assert reply.finish_reason == "stop", (seed, reply.text)
        assert len(reply.text) - len(reply.text.lstrip()) <= 8  # mistral_common's grammar: ≤8 blanks first
        jsonschema.validate(json.loads(reply.text), SCHEMA)
        assert pixtral.encoder.decode(reply.tokens) == reply.text


def test_json_object_replies_parse(pixtral):
    """Any object: keys and strings are unbounded, so a random model often runs to max_tokens; a reply that
    ends is an object, one that is cut off is the start of one."""
    ended = 0
    for seed in range(10):
        reply = pixtral.generate(ASK, json_object=True, temperature=1.0, top_p=1.0, seed=seed, max_tokens=24)
        assert reply.text.lstrip().startswith("{"), reply.text
        if reply.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(reply.text), dict)
        else:
            assert reply.finish_reason == "length" and reply.generation_tokens == 24
            with pytest.raises(ValueError):
                json.loads(reply.text)
    assert ended >= 1


def reference_greedy(pixtral, messages, schema, max_tokens):
    """Greedy decoding without mlx-lm's loop or our processor: the model fed one token at a time, its logits
    masked by a fresh llguidance matcher."""
    import llguidance

    from pixtral_mlx.structured import grammar_factory, json_grammar

    factory = grammar_factory(pixtral.encoder.tokenizer)
    matcher = llguidance.LLMatcher(factory.llg_tokenizer, json_grammar(factory, schema))
    cache, tokens, out = pixtral.model.make_cache(), list(pixtral.encode(messages).tokens), []
    for _ in range(max_tokens):
        logits = np.array(pixtral.model(mx.array(tokens)[None], cache=cache)[0, -1].astype(mx.float32))
        allowed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(allowed, bitorder="little")[: logits.size].astype(bool)
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        assert matcher.consume_token(token)
        out.append(token)
        if token == pixtral.encoder.eos_id:
            break
        tokens = [token]
    return out


def test_greedy_is_deterministic_and_equals_reference(pixtral):
    first = pixtral.generate(ASK, json_schema=SCHEMA, temperature=0.0, max_tokens=MAX_TOKENS)
    again = pixtral.generate(ASK, json_schema=SCHEMA, temperature=0.0, max_tokens=MAX_TOKENS)
    assert first.finish_reason == "stop" and again.tokens == first.tokens and again.text == first.text
    jsonschema.validate(json.loads(first.text), SCHEMA)
    assert reference_greedy(pixtral, ASK, SCHEMA, MAX_TOKENS) == first.tokens + [pixtral.encoder.eos_id]


def test_chat_turns_follow_the_schema(pixtral):
    chat = pixtral.chat(json_schema=SCHEMA, temperature=0.0, max_tokens=MAX_TOKENS)
    replies = [chat.send("Read this receipt."), chat.send("Now the other receipt.")]
    for reply in replies:
        assert reply.finish_reason == "stop"
        jsonschema.validate(json.loads(reply.text), SCHEMA)
    # The second turn reused the cache (the matcher saw only its own reply) and equals a fresh run.
    assert replies[1].prompt_tokens < len(pixtral.encode(chat.messages[:-1]))
    fresh = pixtral.generate(chat.messages[:-1], json_schema=SCHEMA, temperature=0.0, max_tokens=MAX_TOKENS)
    assert fresh.tokens == replies[1].tokens
    # A turn's own constraint replaces the chat's; a sampled regeneration still validates.
    obj = chat.send("Anything.", json_object=True, max_tokens=8)
    assert obj.text.lstrip().startswith("{") and chat.options.json_schema == SCHEMA
    again = list(chat.regenerate(temperature=1.0, top_p=1.0, seed=3))
    text = "".join(c.text for c in again)
    assert again[-1].finish_reason == "stop" and chat.messages[-1]["content"] == text
    jsonschema.validate(json.loads(text), SCHEMA)


BAD = [
    (["not", "a", "dict"], "json_schema must be a JSON Schema object (a dict), got list."),
    ({"type": "object", "default": {1, 2}}, "json_schema must hold only JSON values"),
    ({"type": "number", "maximum": float("nan")}, "json_schema must hold only JSON values"),
    ({"type": "strin"}, "json_schema is not a valid JSON Schema at $.type: 'strin' is not valid under any"),
    ({"type": "object", "required": "name"}, "json_schema is not a valid JSON Schema at $.required: 'name' is not"),
    ({"not": {"type": "string"}}, "json_schema uses something structured output does not support: Unimplemented keys"),
    ({"$ref": "#/$defs/missing"}, "json_schema uses something structured output does not support: Pointer"),
    (
        {"type": "string", "pattern": "(?=a)b"},
        "json_schema uses something structured output does not support: regex parse error:",
    ),
]  # fmt: skip


@pytest.mark.parametrize("schema, message", BAD)
def test_bad_schemas_are_one_sentence(schema, message):
    with pytest.raises(PromptError) as e:
        Options(json_schema=schema)
    assert str(e.value).startswith(message) and e.value.param == "json_schema"
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_option_rules():
    with pytest.raises(PromptError) as e:
        Options(json_schema={"type": "object"}, json_object=True)
    assert e.value.param == "json_object" and "cannot be combined" in str(e.value)
    with pytest.raises(PromptError) as e:
        Options(json_object="yes")
    assert str(e.value) == "json_object must be True or False, got 'yes'."
    mine = {"type": "object", "properties": {"a": {"type": "integer"}}}
    options = Options(json_schema=mine)
    mine["properties"]["a"]["type"] = "string"  # the caller's later edits do not reach the options
    assert options.json_schema == {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert options.merge(json_schema=None, seed=1).json_schema == options.json_schema
    assert check_schema(JSON_OBJECT_SCHEMA) == {"type": "object"}


def test_bad_schema_is_refused_before_any_work(pixtral, tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}]}]
    cache = pixtral.new_cache()
    pixtral.generate(ASK, cache=cache, max_tokens=2, temperature=0.0)
    held, runs = list(cache.tokens), pixtral.vision_runs
    with pytest.raises(PromptError, match="not support"):
        pixtral.stream(messages, json_schema={"not": {}}, cache=cache)  # raises at the call, not when iterated
    assert cache.tokens == held and pixtral.vision_runs == runs
    chat = pixtral.chat()
    with pytest.raises(PromptError, match="not a valid JSON Schema"):
        chat.send(messages[0]["content"], json_schema={"type": 3})
    assert chat.messages == [] and pixtral.vision_runs == runs


def test_response_format_options():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert response_format_options(None) == {} and response_format_options({"type": "text"}) == {}
    assert response_format_options({"type": "json_object"}) == {"json_object": True}
    spec = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert response_format_options(spec) == {"json_schema": schema}
    spec["json_schema"]["strict"] = False  # enforced all the same
    assert response_format_options(spec) == {"json_schema": schema}
    for bad, message in [
        ({"type": "json_schema"}, 'response_format of type json_schema needs "json_schema"'),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format of type json_schema needs"),
        ({"type": "xml"}, "response_format type must be text, json_object or json_schema, got 'xml'."),
        ("json", "response_format must be an object with a `type`."),
    ]:
        with pytest.raises(PromptError) as e:
            response_format_options(bad)
        assert str(e.value).startswith(message) and e.value.param == "response_format"


# CLI ---------------------------------------------------------------------------------------------------------
def describe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", "describe", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_cli_schema_errors_before_loading(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(image)
    (tmp_path / "bad.json").write_text('{"type": "object",\n "properties": }')
    (tmp_path / "unsupported.json").write_text('{"not": {"type": "string"}}')
    cases = [
        (tmp_path / "missing.json", f"--json-schema: {tmp_path / 'missing.json'} does not exist."),
        (tmp_path, f"--json-schema: {tmp_path} is a folder, not a JSON Schema file."),
        (tmp_path / "bad.json", f"--json-schema: {tmp_path / 'bad.json'} is not valid JSON (Expecting value at "
                                "line 2, column 16)."),
        (
            tmp_path / "unsupported.json",
            f"--json-schema {tmp_path / 'unsupported.json'} uses something structured output does not support: "
            'Unimplemented keys: ["not"].',
        ),
    ]  # fmt: skip
    for path, message in cases:
        run = describe(str(image), "--model", str(tmp_path / "no-model"), "--json-schema", str(path))
        assert (run.returncode, run.stdout, run.stderr) == (2, "", f"error: {message}\n")
    run = describe(str(image), "--json-object", "--json-schema", str(tmp_path / "bad.json"))
    assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_cli_answers_with_the_json(mlx_dir, tmp_path):
    image = tmp_path / "receipt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(image)
    (tmp_path / "receipt.json").write_text(json.dumps(SCHEMA))
    flags = ["--model", str(mlx_dir), "--json-schema", str(tmp_path / "receipt.json"), "--temp", "1", "--seed", "0"]
    run = describe(str(image), *flags, "--json", "--max-tokens", str(MAX_TOKENS))
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    cut = describe(str(image), *flags, "--max-tokens", "6")  # streamed as it comes, then one sentence
    assert cut.returncode == 1 and cut.stdout.endswith("\n") and out["text"].startswith(cut.stdout[:-1])
    assert cut.stderr == "error: the JSON answer reached --max-tokens 6 before it was complete.\n"
