"""`pixtral-mlx {describe,chat,convert}`: a lazy dispatcher, so `--help` never imports MLX."""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

DEFAULT_MODEL = "mlx-community/pixtral-12b-4bit"

COMMANDS = {
    "describe": ("pixtral_mlx.describe", "describe images: stream an answer about one or more images"),
    "chat": ("pixtral_mlx.tui.__main__", "open the terminal chat; drop images into a conversation"),
    "convert": ("pixtral_mlx.convert.__main__", "convert an official or Hugging Face checkpoint to MLX"),
}


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
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default 512)")
    parser.add_argument(
        "--temp",
        "--temperature",
        dest="temp",
        type=float,
        default=0.35,
        help="sampling temperature; 0 is greedy (default 0.35, Mistral's recommendation)",
    )
    parser.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling (default 0.8)")
    parser.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    parser.add_argument(
        "--max-edge", type=int, help="cap the longest image edge in pixels (≤1024): fewer image tokens, faster"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
