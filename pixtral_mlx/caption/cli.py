"""The command line of `pixtral-mlx caption`: its flags (`build_parser`), their checks before any work
(`check_args`) and the prompt template (`Template`: `{name}`, `{stem}`, `{folder}`, `{existing}`).

Importing this module does not import MLX, so `pixtral-mlx caption --help` is instant."""

from __future__ import annotations

import argparse
import string
from pathlib import Path

from pixtral_mlx.caption.errors import UsageError
from pixtral_mlx.caption.sources import sidecar_path
from pixtral_mlx.cli import add_model_args, add_structured_args

DEFAULT_PROMPT = "Describe this image in one paragraph."
FIELDS = ("name", "stem", "folder", "existing")
DEFAULT_BATCH = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx caption",
        description="Caption every image of files and folders with Pixtral-12B, in batches. Records are written "
        "as each image finishes; run the same command again to finish an interrupted run.",
        epilog="Examples:\n"
        "  pixtral-mlx caption dataset/ --sidecar --prefix 'photo of sks, '    # name.txt next to each image\n"
        "  pixtral-mlx caption ~/Pictures -o library.jsonl                     # one JSON line per image\n"
        "  pixtral-mlx caption scans/ -o ocr.jsonl --max-edge 1024 \\\n"
        "      --prompt 'Transcribe all the text in this image.' --max-tokens 1024\n"
        "  mlx.launch -n 2 -- pixtral-mlx caption photos/ -o captions.jsonl       # two processes, one output\n\n"
        "Prompt templates may use {name} (file name), {stem} (name without extension), {folder} (the folder's\n"
        "name) and {existing} (the text of the image's existing .txt sidecar, e.g. tags; empty if none).\n"
        "Exit status: 0 when every image was captioned, 1 when any failed, 130/143 when interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--files-from", metavar="LIST", help="read more paths from LIST, one a line ('-' is stdin)")
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--output", "-o", metavar="FILE", help="append one JSON line per image to FILE (default: stdout, no resume)"
    )
    out.add_argument("--sidecar", action="store_true", help="write each caption to a text file next to its image")
    p.add_argument("--ext", default=".txt", help="the sidecar files' extension (default .txt)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", "-p", help=f"prompt template (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", metavar="F", help="read the prompt template from file F")
    p.add_argument("--prefix", default="", help="text put before every caption (e.g. a trigger word)")
    p.add_argument("--suffix", default="", help="text put after every caption")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"images decoded together (default {DEFAULT_BATCH}); greedy captions do not depend on it",
    )
    p.add_argument("--overwrite", action="store_true", help="caption again the images that already have a caption")
    add_model_args(p)
    add_structured_args(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """The caption flags' own checks, before any work (a `UsageError` names the flag); sets `args.template`."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number of at least 1, got {args.batch_size}.")
    if not args.ext.startswith(".") or len(args.ext) < 2 or "/" in args.ext:
        raise UsageError(f"--ext must be an extension such as .txt, got {args.ext!r}.")
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"--prompt-file {args.prompt_file} cannot be read ({getattr(e, 'strerror', None) or e})."
            ) from None
    else:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
    args.template = Template(text)
    if args.sidecar and args.ext == args.template.existing_ext and "existing" in args.template.fields:
        raise UsageError(
            f"{{existing}} reads the {args.ext} sidecars that --sidecar would replace; "
            "write the captions with another --ext (e.g. --ext .caption)."
        )


class Template:
    """A prompt with `{name}`, `{stem}`, `{folder}`, `{existing}` fields, checked when made."""

    def __init__(self, text: str, existing_ext: str = ".txt"):
        self.text, self.existing_ext = text, existing_ext
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise UsageError(
                f"the prompt template is malformed ({e}); write {{{{ and }}}} for literal braces."
            ) from None
        self.fields = set()
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in FIELDS or spec or conversion:
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise UsageError(
                    f"the prompt template uses {shown}; the fields are "
                    + ", ".join("{" + f + "}" for f in FIELDS)
                    + " (write {{ and }} for literal braces)."
                )
            self.fields.add(field)
        if not text.strip():
            raise UsageError("the prompt is empty.")

    def render(self, image: str) -> str:
        if not self.fields:
            return self.text
        p = Path(image)
        values = {"name": p.name, "stem": p.stem, "folder": p.resolve().parent.name, "existing": ""}
        if "existing" in self.fields:
            existing = sidecar_path(image, self.existing_ext)
            if existing.is_file():
                values["existing"] = existing.read_text(encoding="utf-8", errors="replace").strip()
        return self.text.format(**values)
