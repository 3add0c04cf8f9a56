"""Load an MLX-format Pixtral checkpoint: strict weights, quantization read from config.json.

Also accepts the layout MLX peers publish (mlx-vlm's `mlx-community/pixtral-12b-*`): same names,
sometimes without the `vision_model` level, with the HF tokenizer instead of `tekken.json`.

The tokenizer is the folder's Mistral tokenizer file (`tekken.json`, or Pixtral-Large's SentencePiece
`*.model.v7m1`; `prompt.tokenizer_file`), its `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` ids the ones the runtime uses;
the folder's `SYSTEM_PROMPT.txt` (Mistral Small 3.1/3.2, Magistral, Ministral 3) is the default system prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import hub
from .config import bundled_tekken
from .errors import ModelError, PixtralError
from .models import family, part
from .prompt import SYSTEM_PROMPT_FILE, PromptEncoder, tokenizer_file

MLX_ALLOW_PATTERNS = [
    "config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tekken.json",
    "*.model.v*",
    SYSTEM_PROMPT_FILE,
]
MAX_SYSTEM_PROMPT_BYTES = 1 << 20


def cache_root() -> Path:
    base = os.environ.get("PIXTRAL_MLX_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pixtral-mlx"
    )
    return Path(base)


def is_mlx_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any(p.name != "consolidated.safetensors" for p in path.glob("*.safetensors"))


def resolve(model: str | os.PathLike, progress: Callable[[str], None] | None = None) -> Path:
    """A local MLX folder for `model`: a folder, an MLX repo id, an official repo id (converted to 4-bit
    once, into the cache folder), or a family short name (`ministral-3-8b`: its official repo id; a folder of
    that name wins)."""
    path = Path(model).expanduser()
    if not path.exists() and (repo := hub.short_name(str(model))):
        if progress:
            progress(f"{model} is {repo}.")
        return _resolve_repo(repo, progress)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{model} is a file; --model takes a folder with config.json and *.safetensors.")
        if is_mlx_dir(path):
            return path
        if (path / "consolidated.safetensors").exists() or (path / "config.json").exists():
            raise ModelError(f"{model} is not in MLX format; convert it first: pixtral-mlx convert {model} -q")
        raise ModelError(f"{model} holds no model (no config.json and *.safetensors).")
    if not hub.is_repo_id(str(model)):
        raise ModelError(
            f"{model}: no such folder, and it is not a Hugging Face repo id (owner/name) or a short name "
            "(`pixtral-mlx models` lists them)."
        )
    return _resolve_repo(str(model), progress)


def model_name(model: str | os.PathLike, folder: Path) -> str:
    """The model's name, as a SYSTEM_PROMPT.txt's `{name}` takes it (the model cards: the repo id's name
    part): the folder's name for a folder, else the repo's (a short name's official repo)."""
    if Path(model).expanduser().exists():
        return folder.resolve().name
    return (hub.short_name(str(model)) or str(model)).rstrip("/").split("/")[-1]


def converted_path(repo: str) -> Path:
    """Where `resolve` converts an official repo to 4-bit MLX, once."""
    return cache_root() / "models" / (repo.replace("/", "--") + "-4bit")


def _resolve_repo(repo: str, progress: Callable[[str], None] | None) -> Path:
    converted = converted_path(repo)
    if is_mlx_dir(converted):
        return converted
    local = hub.download_layout(repo, MLX_ALLOW_PATTERNS, local_first=True, progress=progress)  # one layout
    if is_mlx_dir(local):
        return local
    if (local / "consolidated.safetensors").exists():
        from .conversion.stream import convert

        if progress:
            progress(f"Converting {repo} to 4-bit MLX into {converted} (once)…")
        try:
            convert(local, converted, quantize=True, bits=4, group_size=64, progress=progress is not None)
        except (PixtralError, FileExistsError) as e:  # e.g. another process is converting it right now
            raise ModelError(f"could not convert {repo} into {converted}: {e}") from e
        return converted
    raise ModelError(f"{repo} has neither MLX weights nor an official consolidated.safetensors.")


def _read_weights(path: Path, weight_map: Any) -> dict[str, Any]:
    """Every tensor of the folder's safetensors files, under our names (the family's `weights.canonical_key`)."""
    import mlx.core as mx

    files = sorted(p for p in path.glob("*.safetensors") if p.name != "consolidated.safetensors")
    if not files:
        raise ModelError(f"{path} has no *.safetensors weights.")
    weights: dict[str, Any] = {}
    for f in files:
        try:
            tensors, metadata = mx.load(str(f), return_metadata=True)
        except Exception as e:
            raise ModelError(f"{f} is not a readable safetensors file ({e}).") from e
        for k, v in tensors.items():
            key = weight_map.canonical_key(k)
            if key is None:
                continue
            if weight_map.torch_layout(metadata) and key.endswith("patch_conv.weight") and v.ndim == 4:
                v = v.transpose(0, 2, 3, 1)  # PyTorch [O, I, kH, kW] -> MLX [O, kH, kW, I]
            weights[key] = v
    return weights


def _read_config(path: Path) -> tuple[dict[str, Any], Any]:
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file} cannot be read ({getattr(e, 'strerror', None) or e}).") from e
    try:
        return config, family(config).Args.from_hf_config(config)
    except PixtralError as e:
        raise ModelError(f"{file} does not describe a usable Pixtral model: {e}.") from e


def load_model(path: Path, system_prompt: bool = True, name: str = "") -> tuple[Any, PromptEncoder]:
    """The model and its prompt encoder; `system_prompt`: whether the folder's SYSTEM_PROMPT.txt is the default
    system prompt (`name` fills its `{name}`)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from . import backend
    from .conversion import fp8  # FP8 checkpoints (Ministral 3 Instruct) are dequantized to bf16 as they load

    config, args = _read_config(path)
    model = part(config, "model").Model(args)
    weight_map = part(config, "weights")
    weights = _read_weights(path, weight_map)
    weights = fp8.dequantize_weights(weights, fp8.block_size(config))
    if sanitize := getattr(weight_map, "sanitize", None):
        weights = sanitize(weights, args)
    if quant := config.get("quantization"):

        def predicate(p: str, m: nn.Module) -> bool | dict:
            if p in quant:
                return quant[p]
            return hasattr(m, "to_quantized") and f"{p}.scales" in weights

        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            mode=quant.get("mode", "affine"),
            class_predicate=predicate,
        )
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        n = len(missing) + len(extra)
        raise ModelError(
            f"{path} does not match the Pixtral architecture in its config.json: {what}"
            + (f" (and {n - 1} more)" if n > 1 else "")
            + "."
        )
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}.")
        if mx.issubdtype(expected[k].dtype, mx.floating) and not mx.issubdtype(v.dtype, mx.floating):
            raise ModelError(f"{path}: {k} is stored as {v.dtype}, but it must hold floating-point values.")
    model.load_weights(list(weights.items()), strict=True)
    weights.clear()  # the model holds them now: `backend.prepare` may replace some (interleaved) and free these
    backend.prepare(model)
    mx.eval(model.parameters())
    backend.place_weights(model)
    encoder = _encoder(path, args, name)
    if system_prompt:
        encoder.system_prompt = read_system_prompt(path)
    return model, encoder


def _encoder(path: Path, args: Any, name: str = "") -> PromptEncoder:
    """The folder's tokenizer file (tekken.json or SentencePiece), or (peers ship the HF tokenizer instead) the
    tekken in mistral_common; the model's image token ids set from it."""
    tokenizer = tokenizer_file(path)
    image = {
        "image_size": args.vision.image_size,
        "patch_size": args.vision.patch_size,
        "spatial_merge_size": getattr(args, "spatial_merge_size", 1),
        "name": name,
    }
    if tokenizer is None:
        encoder = PromptEncoder(bundled_tekken(), **image)
    elif not os.access(tokenizer, os.R_OK):
        raise ModelError(f"{tokenizer} cannot be read (Permission denied).")
    else:
        try:
            encoder = PromptEncoder(tokenizer, **image)
        except PixtralError:
            raise
        except Exception as e:  # not JSON, missing keys, unreadable: mistral_common's own exceptions
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            kind = "tekken" if tokenizer.name == "tekken.json" else "SentencePiece"
            raise ModelError(f"{tokenizer} is not a usable {kind} tokenizer ({first[:200]}).") from e
    words, vocab = encoder.text.n_words, args.text.vocab_size
    if words > vocab:
        raise ModelError(
            f"{tokenizer or 'the bundled tekken.json'} has {words:,} tokens but the model's vocabulary only "
            f"{vocab:,}: the tokenizer does not belong to this model."
        )
    args.image_token_id, args.image_break_token_id, args.image_end_token_id = encoder.image_token_ids()
    return encoder


def read_system_prompt(path: Path) -> str | None:
    """The folder's SYSTEM_PROMPT.txt (placeholders unfilled), or None when it has none."""
    file = path / SYSTEM_PROMPT_FILE
    if not file.is_file():
        return None
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_SYSTEM_PROMPT_BYTES + 1)
        if len(data) > MAX_SYSTEM_PROMPT_BYTES:
            raise ModelError(f"{file} is larger than {MAX_SYSTEM_PROMPT_BYTES >> 20} MiB.")
        text = data.decode("utf-8")  # as the model cards read it: the whole file, unstripped
        return text if text.strip() else None
    except UnicodeDecodeError:
        raise ModelError(f"{file} is not UTF-8 text.") from None
    except OSError as e:
        raise ModelError(f"{file} cannot be read ({e.strerror or e}).") from e
