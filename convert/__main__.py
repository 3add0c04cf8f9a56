"""`pixtral-mlx convert` / `python -m pixtral_mlx.convert`: checkpoint -> MLX format."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx convert",
        description="Convert a Pixtral-12B or Mistral3 (Mistral Small 3.x, Ministral 3; FP8 included) checkpoint "
        "(official Mistral or Hugging Face layout, "
        "local folder or Hub repo id) to the MLX format, optionally quantized.",
    )
    p.add_argument("source", nargs="?", metavar="SOURCE", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--hf-path", "--model", dest="source_opt", metavar="SOURCE", help="same as SOURCE")
    p.add_argument(
        "-o",
        "--mlx-path",
        dest="output",
        metavar="OUT",
        help="output folder (default: <source name>-mlx[-4bit|-8bit] in the current folder)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the float weights (default: bfloat16)",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the language model")
    p.add_argument(
        "--bits",
        "--q-bits",
        type=int,
        choices=[4, 8],
        default=4,
        help="bits per weight (default: 4)",
    )
    p.add_argument(
        "--group-size",
        "--q-group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="quantization group size (default: 64)",
    )
    p.add_argument(
        "--quantize-vision",
        action="store_true",
        help="with -q, also quantize the vision tower and adapter (default: keep them dense)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it holds a previous conversion (nothing else)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def default_output(source: str, quantize: bool, bits: int) -> Path:
    name = Path(source.rstrip("/")).absolute().name if Path(source).exists() else source.rstrip("/").split("/")[-1]
    return Path(f"{name}-mlx" + (f"-{bits}bit" if quantize else ""))


def summary(folder: Path) -> tuple[float, float]:
    """Size in GB and bits per weight of a converted folder (from its index and config)."""
    from pixtral_mlx.models import family, part

    total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    config = json.loads((folder / "config.json").read_text())
    args = family(config).Args.from_hf_config(config)
    params = sum(math.prod(s) for s in part(config, "weights").expected_shapes(args).values())
    return total / 1e9, total * 8 / params


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # usage errors and --help exit through argparse; return its code instead
        a = parser.parse_args(argv)
        if a.source and a.source_opt and a.source != a.source_opt:
            parser.error("give the source once, either as SOURCE or with --hf-path")
        source = a.source or a.source_opt
        if not source:
            parser.error("the SOURCE checkpoint (folder or Hugging Face repo id) is required")
        if a.quantize_vision and not a.quantize:
            parser.error("--quantize-vision needs -q/--quantize")
    except SystemExit as e:
        return int(e.code or 0)
    output = Path(a.output) if a.output else default_output(source, a.quantize, a.bits)

    from pixtral_mlx.conversion.output import Terminated
    from pixtral_mlx.convert import ConversionError, convert

    try:
        out = convert(
            source,
            output,
            dtype=a.dtype,
            quantize=a.quantize,
            bits=a.bits,
            group_size=a.group_size,
            quantize_vision=a.quantize_vision,
            force=a.force,
            progress=not a.quiet,
        )
    except Terminated:  # SIGTERM: cleaned up as for Ctrl-C
        print("terminated: nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the temporary folder is already removed
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    if not a.quiet:
        size, bpw = summary(out)
        print(f"[INFO] Saved {out} ({size:.2f} GB, {bpw:.3f} bits per weight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
