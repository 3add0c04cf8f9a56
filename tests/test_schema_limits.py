"""Schemas that would exhaust the process are refused with one sentence, quickly: too large, too deep, read from
a pipe or a device, too slow to compile; schemas the grammar cannot enforce (no finite value: `{"$ref": "#"}`,
an object that requires itself) are refused too; long `$ref` chains, which overflowed llguidance's stack and
killed the process, compile; recursive schemas that can end are still enforced and their replies validate."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import jsonschema
import pytest
from PIL import Image

from pixtral_mlx import schemas
from pixtral_mlx.cli import check_structured_args
from pixtral_mlx.errors import PromptError
from pixtral_mlx.schemas import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_SCHEMA_FILE_BYTES, check_schema
from pixtral_mlx.structured import response_format_options
from pixtral_mlx.turn import Options

TOO_LARGE = "json_schema is larger than 64 KiB as compact JSON."
TOO_DEEP = "json_schema is nested deeper than 64 levels of objects and arrays."
NO_VALUE = 'json_schema matches no finite JSON value (it must contain itself through "$ref" without end).'

# Recursive schemas with a finite value: an optional self, a list that may be empty, a null way out.
TREE = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "kids": {"type": "array", "items": {"$ref": "#"}}},
    "required": ["name", "kids"],
    "additionalProperties": False,
}
LINKED = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}, "next": {"$ref": "#/$defs/next"}},
            "required": ["v", "next"],
            "additionalProperties": False,
        },
        "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]},
    },
    "$ref": "#/$defs/node",
}
FINITE = [
    TREE,
    LINKED,
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # `a` is optional
    {"type": ["array", "null"], "items": {"$ref": "#"}, "minItems": 1},  # null ends it
    {"type": "array", "prefixItems": [{"type": "null"}, {"$ref": "#"}], "minItems": 1},  # only the null is needed
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}, {}]}}},
]
# No finite value: every value must contain another one.
ENDLESS = [
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"type": "array", "items": [{"$ref": "#"}], "minItems": 1},  # draft 7 tuple
    {"type": "array", "prefixItems": [{"type": "null"}, {"$ref": "#"}], "minItems": 2},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/%61"}}, "required": ["a"]},  # percent-encoded
    {"allOf": [{"$ref": "#/$defs/n"}], "$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}},
                                                      "required": ["n"]}}},
    {"$id": "https://example.com/s.json", "anyOf": [{"$ref": "https://example.com/s.json"}]},
]  # fmt: skip


def nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def refused(schema) -> str:
    with pytest.raises(PromptError) as e:
        Options(json_schema=schema)
    assert e.value.param == "json_schema" and "\n" not in str(e.value)
    return str(e.value)


def test_a_large_schema_is_refused_quickly():
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(150_000)}}
    assert len(json.dumps(schema)) > 5_000_000
    tic = time.perf_counter()
    assert refused(schema) == TOO_LARGE
    assert time.perf_counter() - tic < 1.0  # stops counting at the limit: ~20 ms
    one_string = {"type": "string", "description": "x" * MAX_SCHEMA_BYTES}  # few values, many bytes
    assert refused(one_string) == TOO_LARGE
    just_fits = {"type": "string", "description": "x" * (MAX_SCHEMA_BYTES - 50)}
    assert len(json.dumps(just_fits, separators=(",", ":"))) <= MAX_SCHEMA_BYTES
    assert check_schema(just_fits) == just_fits


def test_a_deep_schema_is_refused_without_recursion():
    assert refused(nested(10_000)) == TOO_DEEP  # json.dumps alone would raise RecursionError
    spec = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(10_000)}}
    assert refused(response_format_options(spec)["json_schema"]) == TOO_DEEP  # the server's path: no deep copy
    assert refused(nested(MAX_SCHEMA_DEPTH + 1)) == TOO_DEEP
    assert check_schema(nested(MAX_SCHEMA_DEPTH)) == nested(MAX_SCHEMA_DEPTH)
    looped: dict = {"type": "object"}
    looped["properties"] = {"a": looped}  # a dict that holds itself (a library caller's mistake)
    assert refused(looped) == TOO_DEEP


@pytest.mark.parametrize("schema", ENDLESS)
def test_schemas_without_a_finite_value_are_refused(schema):
    assert refused(schema) == NO_VALUE


@pytest.mark.parametrize("schema", FINITE)
def test_recursive_schemas_that_can_end_are_accepted(schema):
    assert check_schema(schema) == schema


def test_a_schema_is_compiled_once():
    schemas._grammar_problem.cache_clear()
    Options(json_schema=TREE).merge(seed=1)  # merging checks the options again
    Options(json_schema=json.loads(json.dumps(TREE)))
    info = schemas._grammar_problem.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_compiles_have_a_time_limit(monkeypatch):
    def slow(text):
        time.sleep(2)

    monkeypatch.setattr(schemas, "_grammar_problem", slow)
    monkeypatch.setattr(schemas, "COMPILE_SECONDS", 0.1)
    tic = time.perf_counter()
    assert refused({"type": "object"}) == "json_schema takes longer than 0.1 s to compile into a grammar."
    assert time.perf_counter() - tic < 1.0


def test_check_schema_is_thread_safe():
    stack = threading.stack_size()
    schemas = [*FINITE, *ENDLESS] * 3
    results: dict[int, object] = {}

    def check(i):
        try:
            results[i] = check_schema(schemas[i])
        except PromptError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(len(schemas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(schemas))] == [s if s in FINITE else NO_VALUE for s in schemas]
    assert threading.stack_size() == stack  # the compile threads' large stack was not left as the default


# Run in a child process: a regression is a segfault, which must fail the test rather than end pytest.
LONG_CHAINS = """
import json, mlx.core as mx
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from pixtral_mlx.config import bundled_tekken
from pixtral_mlx.errors import PromptError
from pixtral_mlx.schemas import check_schema
from pixtral_mlx.structured import JsonConstraint, grammar_factory, json_grammar

def chain(n, link):
    defs = {"0": {"type": "integer"}, **{str(i): link({"$ref": f"#/$defs/{i - 1}"}) for i in range(1, n + 1)}}
    return {"$defs": defs, "$ref": f"#/$defs/{n}"}

arrays = chain(1150, lambda r: {"type": "array", "items": r})
options = chain(1120, lambda r: {"anyOf": [r, {"type": "null"}]})
out = {"sizes": [len(json.dumps(s, separators=(",", ":"))) for s in (arrays, options)]}
out["accepted"] = [check_schema(s) == s for s in (arrays, options)]  # each overflowed an 8 MiB stack
factory = grammar_factory(MistralTokenizer.from_file(str(bundled_tekken())))
logits = mx.zeros((1, factory.llg_tokenizer.vocab_size))
constraint, tokens = JsonConstraint(factory, json_grammar(factory, arrays)), []
for _ in range(30):
    tokens.append(int(mx.argmax(constraint(mx.array(tokens or [0]), logits))))
out["arrays"] = factory.llg_tokenizer.decode_str(tokens).strip()
constraint, tokens = JsonConstraint(factory, json_grammar(factory, options)), []
try:  # past llguidance's items per row after the first token: a sentence, not a broken reply
    for _ in range(12):
        tokens.append(int(mx.argmax(constraint(mx.array(tokens or [0]), logits))))
except PromptError as e:
    out["options"] = [len(tokens), str(e)]
print(json.dumps(out))
"""


def test_long_ref_chains_compile_and_a_grammar_too_complex_is_a_sentence():
    run = subprocess.run([sys.executable, "-c", LONG_CHAINS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert all(size <= MAX_SCHEMA_BYTES for size in out["sizes"]) and out["accepted"] == [True, True]
    assert out["arrays"].startswith("[[[[[[[[[[")
    assert out["options"][0] >= 1 and out["options"][1].startswith(
        "json_schema is too complex to enforce: Parser Error: Current row has"
    )


# CLI ---------------------------------------------------------------------------------------------------------
def flags(path) -> argparse.Namespace:
    return argparse.Namespace(json_schema=str(path), json_object=False)


def cli_refused(path) -> str:
    with pytest.raises(PromptError) as e:
        check_structured_args(flags(path))
    assert e.value.param == "json_schema" and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_cli_refuses_a_device_without_reading_it():
    tic = time.perf_counter()
    assert cli_refused("/dev/zero") == "--json-schema: /dev/zero is not a regular file."
    assert time.perf_counter() - tic < 1.0


def test_cli_refuses_a_pipe_without_waiting(tmp_path):
    fifo = tmp_path / "schema.fifo"
    os.mkfifo(fifo)  # no writer: opening it for reading would block, reading it would wait forever
    tic = time.perf_counter()
    assert cli_refused(fifo) == f"--json-schema: {fifo} is not a regular file."
    assert time.perf_counter() - tic < 1.0


def test_cli_file_limits(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"type": "string", "description": "x" * MAX_SCHEMA_FILE_BYTES}))
    assert cli_refused(big) == f"--json-schema: {big} is larger than {MAX_SCHEMA_FILE_BYTES // 1024} KiB."
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert cli_refused(deep) == f"--json-schema: {deep} is nested too deeply to read."
    pretty = tmp_path / "pretty.json"  # indentation does not count against the schema's size
    schema = {"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(1500)}}
    pretty.write_text(json.dumps(schema, indent=8))
    assert MAX_SCHEMA_BYTES < pretty.stat().st_size <= MAX_SCHEMA_FILE_BYTES
    assert check_structured_args(flags(pretty)) == {"json_schema": schema}
    endless = tmp_path / "endless.json"
    endless.write_text('{"$ref": "#"}')
    assert cli_refused(endless) == NO_VALUE.replace("json_schema", f"--json-schema {endless}")


def test_describe_refuses_an_endless_schema_in_one_line(tmp_path, capsys):
    from pixtral_mlx.cli import describe

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    (tmp_path / "endless.json").write_text('{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}')
    args = [str(tmp_path / "a.png"), "--model", str(tmp_path / "no-model"), "--json-schema"]
    assert describe.main([*args, str(tmp_path / "endless.json")]) == 2  # a usage error, before any loading
    message = NO_VALUE.replace("json_schema", f"--json-schema {tmp_path / 'endless.json'}")
    assert capsys.readouterr() == ("", f"error: {message}\n")


# The tiny random model -----------------------------------------------------------------------------------------
ASK = [{"role": "user", "content": "Read this receipt into JSON."}]


@pytest.mark.parametrize("schema", [TREE, LINKED], ids=["tree", "linked"])
def test_recursive_replies_validate(pixtral, schema):
    ended = 0
    for seed in range(6):
        reply = pixtral.generate(ASK, json_schema=schema, temperature=1.0, top_p=1.0, seed=seed, max_tokens=120)
        assert reply.text.lstrip().startswith("{"), reply.text
        if reply.finish_reason == "stop":
            ended += 1
            jsonschema.validate(json.loads(reply.text), schema)
        else:
            assert reply.finish_reason == "length" and reply.generation_tokens == 120
    assert ended >= 1
