"""`pixtral-mlx describe IMAGE...`: stream an answer about one or more images."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import add_model_args, add_structured_args, check_model_args, check_structured_args, flag_message
from . import error as _err
from . import info as _info

DEFAULT_PROMPT = "Describe this image."
DEFAULT_PROMPT_MANY = "Describe these images."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx describe",
        description="Describe images with Pixtral-12B or another model of Mistral's vision family "
        "(`pixtral-mlx models` lists them); the answer streams to stdout.",
        epilog="Examples:\n  pixtral-mlx describe photo.jpg\n"
        "  pixtral-mlx describe a.png b.png --prompt 'What changed?'\n"
        "  pixtral-mlx describe photos/*.jpg --each > captions.jsonl\n"
        "  pixtral-mlx describe receipt.jpg --json-schema receipt.schema.json -p 'Read this receipt.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image paths or http(s)/file:/data: URLs")
    p.add_argument("--prompt", "-p", help="the question ('-' reads it from stdin); default: describe the image")
    add_model_args(p)
    add_structured_args(p)
    p.add_argument(
        "--show-thinking",
        action="store_true",
        help="reasoning models (Magistral, Ministral 3 Reasoning): stream their thinking to stderr (dimmed on a "
        "terminal; stdout keeps the answer only) and add it to --json/--each output as `reasoning`; "
        "hidden by default",
    )
    p.add_argument("--json", action="store_true", help="print the answer and statistics as one JSON object")
    p.add_argument(
        "--each",
        action="store_true",
        help="describe each image on its own and print one JSON line per image",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan (tokens per image, total tokens, each memory term, the machine's limit) "
        "without generating; exit 1 if it would not fit",
    )
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="print image sizes and token costs, device, speed and peak memory to stderr",
    )
    return p


def _image_failed(src: str, e: Exception) -> None:
    """--each: a JSON line on stdout, and one `error:` line naming the image on stderr."""
    from pixtral_mlx.images import describe_source

    name = describe_source(src)
    print(json.dumps({"image": name, "error": str(e)}), flush=True)
    _err(str(e) if name in str(e) else f"{name}: {e}")


def _messages(args: argparse.Namespace, prompt: str, images: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """A user message with the already decoded images (so nothing is read or downloaded twice)."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": img, "name": name} for img, name in images]
    parts.append({"type": "text", "text": prompt})
    msgs: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": parts}]


def _print_stats(stats: dict[str, Any]) -> None:
    print(f"Prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.3f} tokens-per-sec", file=sys.stderr)
    print(
        f"Generation: {stats['generation_tokens']} tokens, {stats['generation_tps']:.3f} tokens-per-sec",
        file=sys.stderr,
    )
    print(f"Peak memory: {stats['peak_memory']:.3f} GB", file=sys.stderr)


class _Thinking:
    """A reasoning model's thinking while it streams, on stderr (stdout keeps the answer, for pipes): with
    --show-thinking its text, dimmed on a terminal, then a blank line; without, on a terminal only, a dim
    "Thinking…" that the answer erases (so a long silence is explained)."""

    DIM, RESET, ERASE = "\x1b[2m", "\x1b[0m", "\r\x1b[K"

    def __init__(self, show: bool):
        self.show, self.tty, self.open = show, sys.stderr.isatty(), False

    def write(self, text: str) -> None:
        if not text or not (self.show or self.tty):
            return
        if not self.open:
            self.open = True
            sys.stderr.write(self.DIM if self.tty else "")
            if not self.show:
                sys.stderr.write(f"Thinking…{self.RESET}")
        if self.show:
            sys.stderr.write(text)
        sys.stderr.flush()

    def end(self) -> None:
        if self.open:
            self.open = False
            if self.show:
                sys.stderr.write((self.RESET if self.tty else "") + "\n\n")
            else:
                sys.stderr.write(self.ERASE)
            sys.stderr.flush()


def _run(model: Any, messages: list[dict[str, Any]], args: argparse.Namespace, echo: bool) -> dict[str, Any]:
    """Generate one answer; on Ctrl-C return what was generated with finish_reason 'interrupted'."""
    from pixtral_mlx.turn import Reply

    prompt = model.encode(messages, max_edge=args.options.max_edge)
    if args.verbose:
        for img in prompt.images:
            _info(img.summary())
    opts = args.options
    reply = Reply()
    thinking = _Thinking(args.show_thinking)
    try:
        for chunk in model.stream(prompt, opts):
            reply.add(chunk)
            if echo:
                thinking.write(chunk.reasoning)
                if chunk.text:
                    thinking.end()
                    print(chunk.text, end="", flush=True)
    except KeyboardInterrupt:
        reply.finish_reason = "interrupted"
    finally:
        if echo:
            thinking.end()
            print(flush=True)
    shown = {"reasoning": reply.reasoning} if args.show_thinking else {}
    return {"text": reply.text, **shown, **reply.stats()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pixtral_mlx.errors import PixtralError

    try:
        args.options = check_model_args(args).merge(**check_structured_args(args))
    except PixtralError as e:
        _err(str(e))
        return 2
    if args.prompt == "-":
        args.prompt = sys.stdin.read().strip()
        if not args.prompt:
            _err("--prompt - read an empty prompt from stdin.")
            return 2
    prompt = args.prompt or (DEFAULT_PROMPT if len(args.images) == 1 or args.each else DEFAULT_PROMPT_MANY)

    from pixtral_mlx.images import describe_source, load_image

    loaded, failed = [], 0
    for src in args.images:  # read and check every image once, before the (slow) model load
        try:
            loaded.append((src, load_image(src)))
        except PixtralError as e:
            if not args.each:
                _err(str(e))
                return 1
            failed += 1
            _image_failed(src, e)
    if not loaded:
        return 1

    import pixtral_mlx
    from pixtral_mlx import backend

    try:
        tic = time.perf_counter()
        model = pixtral_mlx.load(
            args.model,
            progress=_info,
            context_length=args.context_length,
            default_system_prompt=not args.no_default_system_prompt,
        )
        if args.verbose:
            _info(f"Loaded {model.path} in {time.perf_counter() - tic:.1f} s on {backend.device_name(model.model)}")
        if args.dry_run:
            groups = [[img] for _, img in loaded] if args.each else [[img for _, img in loaded]]
            fits = [_dry_run(model, _messages(args, prompt, group), args) for group in groups]
            return 0 if all(fits) and not failed else 1
        if args.each:
            return _each(model, loaded, prompt, args) or (1 if failed else 0)
        result = _run(model, _messages(args, prompt, [img for _, img in loaded]), args, echo=not args.json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PixtralError as e:
        _err(flag_message(e))
        return 1
    if args.json:
        images = [describe_source(src) for src, _ in loaded]
        print(json.dumps({"images": images, "prompt": prompt, **result}, ensure_ascii=False))
    if args.verbose and result.get("prompt_tps"):
        _print_stats(result)
    if result.get("finish_reason") == "interrupted":
        print("interrupted", file=sys.stderr)
        return 130
    if result.get("finish_reason") == "length" and (args.options.json_schema or args.options.json_object):
        _err(f"the JSON answer reached --max-tokens {args.options.max_tokens} before it was complete.")
        return 1
    return 0


def _dry_run(model: Any, messages: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Print the memory plan of generating for `messages` (JSON with --json); return whether it fits."""
    opts = args.options
    plan = model.memory_plan(messages, opts)
    system = model.encoder.system_prompt_summary(messages)
    if args.json:
        print(json.dumps({**plan.as_dict(), "system_prompt": system}, ensure_ascii=False), flush=True)
    else:
        print("\n".join([*plan.lines(), f"system prompt: {system}", f"device: {plan.device}"]), flush=True)
    if not plan.fits:
        from pixtral_mlx.memory import suggestions

        error = plan.refusal(suggestions(plan, lambda bits: model.memory_plan(messages, opts, kv_bits=bits)))
        _err(str(error))
    return plan.fits


def _each(model: Any, loaded: list[tuple[str, Any]], prompt: str, args: argparse.Namespace) -> int:
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.images import describe_source

    failed = 0
    for src, image in loaded:
        try:
            result = _run(model, _messages(args, prompt, [image]), args, echo=False)
        except PixtralError as e:
            failed += 1
            _image_failed(src, e)
            continue
        print(json.dumps({"image": describe_source(src), **result}, ensure_ascii=False), flush=True)
        if args.verbose and result.get("prompt_tps"):
            _print_stats(result)
        if result.get("finish_reason") == "interrupted":
            print("interrupted", file=sys.stderr)
            return 130
    return 1 if failed else 0
