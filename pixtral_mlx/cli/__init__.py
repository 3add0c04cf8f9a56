"""`pixtral-mlx {describe,chat,convert,serve,caption}`: a lazy dispatcher, so `--help` never imports MLX."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Any

from pixtral_mlx._version import __version__
from pixtral_mlx.config import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    FAMILY_MAX_EDGE,
    MAX_EDGE,
)

DEFAULT_MODEL = "mlx-community/pixtral-12b-4bit"

COMMANDS = {
    "describe": ("pixtral_mlx.cli.describe", "describe images: stream an answer about one or more images"),
    "chat": ("pixtral_mlx.tui.__main__", "open the terminal chat; drop images into a conversation"),
    "convert": ("pixtral_mlx.convert.__main__", "convert an official or Hugging Face checkpoint to MLX"),
    "serve": ("pixtral_mlx.server.cli", "serve an OpenAI-compatible API (/v1/chat/completions) with image input"),
    "caption": (
        "pixtral_mlx.caption.run",
        "caption every image of folders, resumably and in batches (JSONL or sidecars)",
    ),
    "models": ("pixtral_mlx.cli.models", "list the supported models: size, memory on this machine, what is cached"),
    "doctor": ("pixtral_mlx.cli.doctor", "say what runs here: CPU, MLX device, BLAS (and its speed), CPU kernels"),
}
# Library parameter -> the flag that sets it, so a library error names what the user typed.
FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temp", "top_p": "--top-p", "seed": "--seed",
         "max_edge": "--max-edge", "kv_bits": "--kv-bits", "kv_group_size": "--kv-group-size",
         "json_schema": "--json-schema", "json_object": "--json-object",
         "context_length": "--context-length"}  # fmt: skip


def error(message: str) -> None:
    """One `error:` line on stderr: how every command reports what stops it."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    """One `[INFO]` progress line on stderr (stdout stays the command's output)."""
    print(f"[INFO] {message}", file=sys.stderr, flush=True)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model and generation flags shared by `describe` and `chat` (mlx-lm / mlx-vlm naming)."""
    parser.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help="MLX folder, mlx-community repo id, or official repo id (converted to 4-bit "
        f"once). Default: {DEFAULT_MODEL}",
    )
    parser.add_argument("--system", help="system prompt")
    add_system_prompt_arg(parser)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"most tokens to generate (default {DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--temp",
        "--temperature",
        dest="temp",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"sampling temperature; 0 is greedy (default {DEFAULT_TEMPERATURE}, Mistral's recommendation)",
    )
    parser.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help=f"nucleus sampling, above 0 and ≤1 (default {DEFAULT_TOP_P})"
    )
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument(
        "--max-edge",
        type=int,
        help=f"cap the longest image edge in pixels (≤ the model's image size: {MAX_EDGE} for Pixtral-12B, "
        f"{FAMILY_MAX_EDGE} for Mistral3): fewer image tokens, faster",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        metavar="{4,8}",
        help="quantize the KV cache to 8 bits (about half the memory per token of bf16) or 4 (about a quarter); "
        "default: unquantized",
    )
    parser.add_argument(
        "--kv-group-size", type=int, default=64, help="elements per scale in the quantized KV cache (default 64)"
    )
    add_context_arg(parser)


def add_system_prompt_arg(parser: argparse.ArgumentParser) -> None:
    """`--no-default-system-prompt` (describe, chat, caption, serve)."""
    parser.add_argument(
        "--no-default-system-prompt",
        action="store_true",
        help="do not use the model's SYSTEM_PROMPT.txt (Mistral Small 3.x, Magistral, Ministral 3 ship one) "
        "when no system prompt is given",
    )


def add_context_arg(parser: argparse.ArgumentParser) -> None:
    """`--context-length N` (describe, chat, caption, serve)."""
    parser.add_argument(
        "--context-length",
        type=int,
        metavar="N",
        help="most tokens a prompt and its reply may hold (default: the window the model was trained on, "
        "131,072 for Pixtral-12B); lower it to refuse long prompts sooner, or raise it (with a warning)",
    )


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    """`--json-schema FILE` / `--json-object`: constrain the answer to JSON (describe, caption)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema",
        metavar="FILE",
        help="answer with JSON that matches the JSON Schema in FILE: the answer is that JSON, complete unless "
        "--max-tokens cuts it off (then the exit status is 1)",
    )
    group.add_argument("--json-object", action="store_true", help="answer with a JSON object (same rules)")


def check_structured_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `json_schema`/`json_object` options of the parsed flags, before any model work: reads and checks
    the schema file; a missing file, invalid JSON or an unsupported schema is one `PromptError` sentence.

    Only a regular file is read, and at most `MAX_SCHEMA_FILE_BYTES` of it: a pipe or device (`/dev/zero`)
    would block or fill memory."""
    import json
    import os
    import stat
    from pathlib import Path

    from pixtral_mlx.errors import PromptError
    from pixtral_mlx.schemas import MAX_SCHEMA_FILE_BYTES, check_schema

    if args.json_schema is None:
        return {"json_object": bool(args.json_object)}
    path = Path(args.json_schema)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO does not wait for a writer
        with open(fd, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise PromptError(f"--json-schema: {path} is not a regular file.", param="json_schema")
            data = file.read(MAX_SCHEMA_FILE_BYTES + 1)
        if len(data) > MAX_SCHEMA_FILE_BYTES:
            raise PromptError(
                f"--json-schema: {path} is larger than {MAX_SCHEMA_FILE_BYTES // 1024} KiB.", param="json_schema"
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise PromptError(f"--json-schema: {path} does not exist.", param="json_schema") from None
    except IsADirectoryError:
        raise PromptError(f"--json-schema: {path} is a folder, not a JSON Schema file.", param="json_schema") from None
    except UnicodeDecodeError:
        raise PromptError(f"--json-schema: {path} is not UTF-8 text.", param="json_schema") from None
    except OSError as e:
        raise PromptError(f"--json-schema: cannot read {path} ({e.strerror}).", param="json_schema") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(
            f"--json-schema: {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).",
            param="json_schema",
        ) from None
    except RecursionError:  # nesting past Python's limit, which check_schema would refuse as too deep
        raise PromptError(f"--json-schema: {path} is nested too deeply to read.", param="json_schema") from None
    return {"json_schema": check_schema(schema, name=f"--json-schema {path}")}


def check_model_args(args: argparse.Namespace) -> Any:
    """The generation `Options` of the parsed flags, checked as the library checks them (one home for the
    ranges); raises `PromptError` whose message names the flag."""
    from pixtral_mlx.config import check_context_length
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.turn import Options

    try:
        check_context_length(args.context_length)
        return Options(
            max_edge=args.max_edge,
            max_tokens=args.max_tokens,
            temperature=args.temp,
            top_p=args.top_p,
            seed=args.seed,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
        )
    except PixtralError as e:
        raise type(e)(flag_message(e), param=e.param) from None


def flag_message(error: Exception) -> str:
    """A library error's sentence in the words of the command line: the library names its parameters (a
    leading `max_tokens`, a suggested `kv_bits=8`); here each becomes the flag that sets it (`--kv-bits 8`)."""
    import re

    message, param = str(error), getattr(error, "param", None)
    for name in (param, (param or "").replace("_", " ")):
        if param in FLAGS and message.startswith(name):
            message = FLAGS[param] + message[len(name) :]
            break
    return re.sub(r"\b(\w+)=([\w.]+)", lambda m: f"{FLAGS[m[1]]} {m[2]}" if m[1] in FLAGS else m[0], message)


def main(argv: list[str] | None = None) -> int:
    """Run a command; the usual CLI conventions for what happens around it (exit codes 130 and 141)."""
    _show_library_warnings()
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling (imports, loading)
        return 130
    except BrokenPipeError:  # `pixtral-mlx describe … | head`: the reader is gone, nothing to say
        _silence_stdout()
        return 141
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
            raise
        _silence_stdout()
        print(f"error: cannot write the output ({e.strerror}).", file=sys.stderr)
        return 1


def _show_library_warnings() -> None:
    """The library's warnings (a context length above the trained window) as one `warning:` line on stderr,
    instead of Python's file:line form."""
    import warnings

    from pixtral_mlx.errors import ContextLengthWarning

    default = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if issubclass(category, ContextLengthWarning):
            print(f"warning: {flag_message(message)}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _dispatch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pixtral-mlx",
        description="Run Mistral's Pixtral-12B vision-language model locally with MLX.",
        epilog="Run `pixtral-mlx COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"pixtral-mlx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an error naming the commands
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
