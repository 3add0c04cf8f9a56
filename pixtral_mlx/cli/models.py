"""`pixtral-mlx models`: the supported family, what each member costs on this machine, and what is cached.

Offline by design: sizes come from the shapes in `pixtral_mlx.catalog`, the cache check reads the Hugging Face
cache folder and our converted-models folder; nothing asks the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from pixtral_mlx.catalog import DEFAULT, DEFAULT_CONTEXT, FAMILY, Model
from pixtral_mlx.cli import DEFAULT_MODEL, error

PRECISIONS: tuple[tuple[str, int | None], ...] = (("bf16", None), ("8bit", 8), ("4bit", 4))
WIDTH = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx models",
        description="List the supported models: parameters, download size, the memory each needs at bf16, 8-bit "
        "and 4-bit on this machine, and which are already in the local cache. Offline; nothing is downloaded.",
        epilog="Pass a short name to --model of any command, e.g. `pixtral-mlx chat --model ministral-3-8b`.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        metavar="TOKENS",
        help=f"tokens of bf16 KV cache to count on top of the weights (default {DEFAULT_CONTEXT:,})",
    )
    return p


# The local cache ------------------------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else huggingface_hub's default under HF_HOME)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def complete_weights(folder: Path) -> bool:
    """A folder with a whole checkpoint: official (params.json + consolidated.safetensors) or Hugging Face /
    MLX (config.json + every shard its index names, or a single model*.safetensors). Dangling links of an
    interrupted download do not count."""
    try:
        if (folder / "params.json").is_file() and (folder / "consolidated.safetensors").is_file():
            return True
        if not (folder / "config.json").is_file():
            return False
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            return bool(shards) and all((folder / s).is_file() for s in shards)
        return any(p.is_file() for p in folder.glob("model*.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def hf_snapshot(repo: str, cache: Path | None = None) -> Path | None:
    """A complete snapshot of `repo` in the Hugging Face cache (`models--owner--name/snapshots/<rev>/`)."""
    snapshots = (cache or hf_cache_dir()) / ("models--" + repo.replace("/", "--")) / "snapshots"
    try:
        revisions = sorted(snapshots.iterdir()) if snapshots.is_dir() else []
    except OSError:
        return None
    return next((s for s in revisions if complete_weights(s)), None)


def cached(model: Model) -> list[dict[str, str]]:
    """Where `model` is already on disk: `hf` (the official repo, or another full-precision repo of it) and
    `mlx` (its MLX 4-bit repo) in the Hugging Face cache, `conv` (converted by us into our cache folder)."""
    from pixtral_mlx.loading import converted_path, is_mlx_dir

    found = []
    cache = hf_cache_dir()
    kinds = [("hf", model.official)] + ([("mlx", model.mlx_4bit)] if model.mlx_4bit else [])
    for kind, repo in kinds + [("hf", r) for r in model.also]:
        if snapshot := hf_snapshot(repo, cache):
            found.append({"kind": kind, "repo": repo, "path": str(snapshot)})
    converted = converted_path(model.official)
    if is_mlx_dir(converted):
        found.append({"kind": "conv", "repo": model.official, "path": str(converted)})
    return found


# The listing ----------------------------------------------------------------------------------------------
def describe(model: Model, context: int, limit: int | None) -> dict[str, Any]:
    """One member as JSON: names, shapes, parameters, bytes per precision with the verdict, cache."""
    memory = {}
    for label, bits in PRECISIONS:
        need = model.memory_bytes(bits, context)
        memory[label] = {
            "bytes": need,
            "weights": model.weight_bytes(bits),
            "kv_cache": model.kv_bytes(context),
            "fits": None if limit is None else need <= limit,
        }
    vision = model.vision
    return {
        "name": model.name,
        "default": model.name == DEFAULT,
        "official": model.official,
        "mlx_4bit": model.mlx_4bit,
        "also": list(model.also),
        "params": model.params(),
        "params_parts": model.parts(),
        "approximate": model.approximate,
        "notes": model.notes,
        "context_length": model.context,
        "text": vars(model.text),
        "vision": None if vision is None else vars(vision),
        "checkpoint": "fp8" if model.fp8 else "bf16",
        "download_bytes": model.download_bytes(),
        "memory": memory,
        "cached": cached(model),
    }


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def table(rows: list[dict[str, Any]], context: int, limit: int | None, source: str) -> list[str]:
    """The listing for people, at most WIDTH columns."""
    limit_text = f"{_gb(limit)} GB ({source})" if limit is not None else f"none ({source})"
    out = [f"Memory = weights + a bf16 KV cache of {context:,} tokens, in GB. This machine's limit: {limit_text}."]
    out = [*textwrap.wrap(out[0], WIDTH), ""]
    name_w = max(len(r["name"]) + (2 if r["default"] else 0) for r in rows)
    head = f"{'MODEL':<{name_w}} {'PARAMS':>7} {'DOWNLOAD':>8}  {'BF16':<13} {'8-BIT':<13} {'4-BIT':<13}  CACHED"
    out.append(head)
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        params = ("~" if r["approximate"] else "") + f"{r['params'] / 1e9:.1f}B"
        cells = []
        for label, _ in PRECISIONS:
            m = r["memory"][label]
            verdict = "" if m["fits"] is None else ("fits" if m["fits"] else "too big")
            cells.append(f"{_gb(m['bytes']) + ' ' + verdict:<13}")
        where = ",".join(dict.fromkeys(c["kind"] for c in r["cached"])) or "-"
        download = "≈" + _gb(r["download_bytes"])
        out.append(f"{name:<{name_w}} {params:>7} {download:>8}  {' '.join(cells)}  {where}".rstrip())
    out += [
        "",
        f"* the default (--model default: {DEFAULT_MODEL}). ~ approximate (see notes).",
        "DOWNLOAD ≈ the official repo's weights (bf16; FP8 decoder for the Ministral 3 Instruct repos).",
        "8-/4-BIT: the decoder quantized (group-64 scales and biases, as `convert -q` writes); vision bf16.",
        "CACHED: in the Hugging Face cache, hf = the official (or a community full-precision) repo, mlx = the",
        "        MLX 4-bit repo; conv = converted by pixtral-mlx into its own cache folder.",
        "",
        "Short names (or the repo names) work with --model of every command:",
    ]
    for r in rows:
        repos = r["official"] + (f", {r['mlx_4bit']}" if r["mlx_4bit"] else "")
        out.append(f"  {r['name']:<{name_w}}  {repos}")
    notes = [f"{r['name']}: {r['notes']}" for r in rows if r["notes"]]
    if notes:
        out += ["", "Notes:"]
        for note in notes:
            out += textwrap.wrap(note, WIDTH, initial_indent="  ", subsequent_indent="    ")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.context < 1:
        error("--context must be a positive number of tokens.")
        return 2
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.memory import machine_limit

    try:
        limit, source = machine_limit()
    except PixtralError as e:
        error(str(e))
        return 1
    rows = [describe(m, args.context, limit) for m in FAMILY]
    if args.json:
        report = {
            "context_tokens": args.context,
            "limit_bytes": limit,
            "limit_source": source,
            "default": DEFAULT,
            "default_model": DEFAULT_MODEL,
            "hf_cache": str(hf_cache_dir()),
            "models": rows,
        }
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write("\n".join(table(rows, args.context, limit, source)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
