"""JSON Schema checks: whether a schema is one structured output can enforce, decided before any work.

`check_schema` needs no tokenizer and no model, so every surface (flags, `Options`, a server request) refuses a
bad schema at once: bounded in size and depth first, walked without recursion (a request must not exhaust
memory, stacks or time), then checked as a Draft 7 schema, then compiled by llguidance (on a thread with a large
stack, within `COMPILE_SECONDS`, cached by the schema's text), then searched for a finite value (a `$ref` cycle
can leave none, and llguidance would then lead the reply into a dead end). The grammar itself, at generation
time, is `structured.py`'s; both compile `grammar_schema(schema)`, so what is checked is what is enforced.
No MLX or llguidance at import.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from concurrent.futures import Future
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from .errors import PromptError

# The JSON's layout, as `json.dumps` writes it: ", " and ": " between items and no other whitespace. Fixed
# separators keep greedy decoding to one spelling per value and stop a model from padding the answer with
# whitespace until max_tokens (a known failure of flexible-whitespace grammars). A schema's own
# "x-guidance" options win over these.
JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Limits on what a request may ask for. Real schemas take a few KiB; 64 KiB of compact JSON (some 2,000
# properties) still compiles in under half a second, the slowest shape found being thousands of optional
# properties. 64 levels of objects and arrays is far past real schemas (two levels per nested object) and half
# the depth at which llguidance's JSON parser gives up. The compile limit is ten times the slowest compile
# found at the size limit; llguidance's own limits (schema steps, lexer fuel, parser items) keep it finite.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_FILE_BYTES = 4 * MAX_SCHEMA_BYTES  # a schema file: room for indentation
MAX_SCHEMA_DEPTH = 64
COMPILE_SECONDS = 5.0
# llguidance compiles a schema recursively on the calling thread's stack, 3-10 KiB per level of nesting or
# `$ref`: a chain of ~1,000 `$ref`s (55 KiB of JSON) overflows an 8 MiB stack and kills the process. Compiles
# therefore run on a thread of their own whose stack holds four times the deepest compile found within the
# size limit (16 MiB, a chain of 1,600 `{"items": {"$ref": ...}}`); only the pages used are allocated.
COMPILE_STACK_BYTES = 64 * 1024 * 1024
_stack_lock = threading.Lock()  # `threading.stack_size` is process-wide: set, start, restore


def grammar_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as llguidance compiles it: with our layout unless the schema sets its own."""
    return {**schema, "x-guidance": {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}}


def check_schema(schema: Any, name: str = "json_schema") -> dict[str, Any]:
    """A copy of `schema` if it is a JSON Schema that constrained decoding supports and can enforce; else a
    one-sentence `PromptError(param="json_schema")` that starts with `name` (the CLI passes its flag and file).

    Thread-safe; takes up to `COMPILE_SECONDS` (milliseconds for ordinary schemas), so servers call it off
    their event loop."""
    if not isinstance(schema, dict):
        raise PromptError(
            f"{name} must be a JSON Schema object (a dict), got {type(schema).__name__}.", param="json_schema"
        )
    _check_shape(schema, name)  # before anything that recurses or copies
    try:
        text = json.dumps(schema, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise PromptError(f"{name} must hold only JSON values ({e}).", param="json_schema") from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise _too_large(name)
    import jsonschema

    try:
        jsonschema.Draft7Validator.check_schema(schema)  # the check mistral_common's own `JsonSchema` makes
    except jsonschema.SchemaError as e:
        where = f" at {e.json_path}" if e.path else ""
        reason = e.message.rstrip(".")
        raise PromptError(f"{name} is not a valid JSON Schema{where}: {reason}.", param="json_schema") from None
    try:
        problem = with_compile_limits(_grammar_problem, text)
    except TimeoutError:
        raise PromptError(
            f"{name} takes longer than {COMPILE_SECONDS:g} s to compile into a grammar.", param="json_schema"
        ) from None
    if problem:
        raise PromptError(f"{name} {problem}.", param="json_schema")
    return json.loads(text)  # a deep copy: later edits of the caller's dict change nothing here


def _too_large(name: str) -> PromptError:
    return PromptError(f"{name} is larger than {MAX_SCHEMA_BYTES // 1024} KiB as compact JSON.", param="json_schema")


def _check_shape(schema: Any, name: str) -> None:
    """Refuse a schema nested deeper than `MAX_SCHEMA_DEPTH` or holding more values than `MAX_SCHEMA_BYTES`
    (each takes a byte at least), walking it without recursion and stopping as soon as a limit is passed."""
    count, todo = 1, [(schema, 1)]
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        if not children:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise PromptError(
                f"{name} is nested deeper than {MAX_SCHEMA_DEPTH} levels of objects and arrays.", param="json_schema"
            )
        count += len(children)
        if count > MAX_SCHEMA_BYTES:
            raise _too_large(name)
        todo.extend((child, depth + 1) for child in children)


def with_compile_limits(fn: Any, *args: Any) -> Any:
    """`fn(*args)` on a thread of its own with a `COMPILE_STACK_BYTES` stack; raises `TimeoutError` after
    `COMPILE_SECONDS`. A compile that runs late is left to finish in the background: llguidance releases the
    GIL while it compiles (measured: other threads run every ~2 ms) and stops at its own limits."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the caller
            future.set_exception(e)

    with _stack_lock:
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            threading.Thread(target=run, name="pixtral-mlx grammar", daemon=True).start()
        finally:
            threading.stack_size(previous)
    return future.result(timeout=COMPILE_SECONDS)


@lru_cache(maxsize=64)  # `Options.merge` and each request check the same schemas again
def _grammar_problem(text: str) -> str | None:
    """Why the schema (compact JSON) cannot be enforced, as the end of a sentence; None if it can."""
    import llguidance

    schema = json.loads(text)
    grammar = llguidance.grammar_from("json_schema", json.dumps(grammar_schema(schema)))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        return "uses something structured output does not support: " + error.strip().splitlines()[0].rstrip(".")
    if not _has_finite_value(schema):
        return 'matches no finite JSON value (it must contain itself through "$ref" without end)'
    return None


# Whether a schema has a finite value. llguidance compiles `$ref`s into grammar rules without checking that
# each can end: `{"$ref": "#"}` lets the reply be only whitespace, and an object that requires a property that
# is the object again leads the parser into unbounded work mid-reply. This is the grammar "productivity" check,
# on the schema: each schema is reduced to what a finite value of it needs (True, False, a `$ref`, or
# ("all" | "any", parts)), following llguidance's reading of the keywords and assuming a value where unsure;
# then the `$ref`s that have a finite value are found by a fixed point. Recursion only follows nesting, which
# `_check_shape` bounded.
def _has_finite_value(root: dict[str, Any]) -> bool:
    needs: dict[int, Any] = {}  # by id of a schema within root

    def need(schema: Any) -> Any:
        if isinstance(schema, bool):
            return schema
        if not isinstance(schema, dict) or "const" in schema or "enum" in schema:  # listed values: finite
            return True
        if schema is not root and isinstance(schema.get("$id"), str):  # another resource, whose "#" is its own
            return True
        if id(schema) not in needs:
            parts = [need(s) for s in _list(schema.get("allOf"))]
            parts += [_any([need(s) for s in _list(schema[k])]) for k in ("anyOf", "oneOf") if k in schema]
            if isinstance(schema.get("$ref"), str):
                parts.append(schema["$ref"])
            types = schema.get("type")
            if isinstance(types, (str, list)):  # no type: null is a value
                parts.append(_any([typed(schema, t) for t in ([types] if isinstance(types, str) else types)]))
            needs[id(schema)] = _all(parts)
        return needs[id(schema)]

    def typed(schema: dict[str, Any], kind: Any) -> Any:
        if kind == "object":  # each required property; a property matched by a pattern is assumed to have one
            props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
            other = True if "patternProperties" in schema else schema.get("additionalProperties", True)
            return _all([need(props[k] if k in props else other) for k in _list(schema.get("required"))])
        if kind == "array":  # the first minItems items
            least, items = schema.get("minItems", 0), schema.get("items", True)
            least = int(least) if isinstance(least, (int, float)) else 0
            if isinstance(schema.get("prefixItems"), list):
                first, rest = schema["prefixItems"], items
            elif isinstance(items, list):  # draft 7's tuples
                first, rest = items, schema.get("additionalItems", True)
            else:
                first, rest = [], items
            return _all([need(s) for s in first[:least]] + ([need(rest)] if least > len(first) else []))
        return True

    start, needs_of = need(root), {}
    todo = list(_refs(start))
    while todo:
        ref = todo.pop()
        if ref not in needs_of:
            target = _resolve(root, ref)
            needs_of[ref] = True if target is None else need(target)  # a target not found: llguidance's to judge
            todo.extend(_refs(needs_of[ref]))
    users: dict[str, set[str]] = {ref: set() for ref in needs_of}
    for ref, needed in needs_of.items():
        for used in _refs(needed):
            users[used].add(ref)
    finite, queue, queued = set(), deque(needs_of), set(needs_of)
    while queue:
        ref = queue.popleft()
        queued.discard(ref)
        if _holds(needs_of[ref], finite):
            finite.add(ref)
            for user in users[ref] - finite - queued:
                queue.append(user)
                queued.add(user)
    return _holds(start, finite)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _all(parts: list[Any]) -> Any:
    parts = list(dict.fromkeys(p for p in parts if p is not True))
    return False if False in parts else True if not parts else parts[0] if len(parts) == 1 else ("all", tuple(parts))


def _any(parts: list[Any]) -> Any:
    parts = list(dict.fromkeys(p for p in parts if p is not False))
    return True if True in parts else False if not parts else parts[0] if len(parts) == 1 else ("any", tuple(parts))


def _refs(needed: Any) -> Any:
    if isinstance(needed, str):
        yield needed
    elif isinstance(needed, tuple):
        for part in needed[1]:
            yield from _refs(part)


def _holds(needed: Any, finite: set[str]) -> bool:
    if isinstance(needed, bool):
        return needed
    if isinstance(needed, str):
        return needed in finite
    return (all if needed[0] == "all" else any)(_holds(part, finite) for part in needed[1])


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The schema a `$ref` names within root ("#", a JSON pointer, either after root's "$id"); None otherwise."""
    base = root.get("$id").split("#")[0] if isinstance(root.get("$id"), str) else ""
    if base and ref.startswith(base):
        ref = "#" + ref[len(base) :].lstrip("#")
    pointer = unquote(ref[1:]) if ref.startswith("#") else None
    if pointer is None or (pointer and not pointer.startswith("/")):  # another document, or an anchor
        return None
    node = root
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdecimal() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
