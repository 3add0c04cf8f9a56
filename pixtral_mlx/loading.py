"""Load an MLX-format Pixtral checkpoint: strict weights, quantization read from config.json.

Also accepts the layout MLX peers publish (mlx-vlm's `mlx-community/pixtral-12b-*`): same names,
sometimes without the `vision_model` level, with the HF tokenizer instead of `tekken.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import PixtralArgs
from .prompt import PromptEncoder, bundled_tekken

MLX_ALLOW_PATTERNS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tekken.json"]
SOURCE_ALLOW_PATTERNS = ["consolidated.safetensors", "params.json", "tekken.json"]


class ModelError(ValueError):
    """A model that cannot be found or loaded, with a message meant for the user."""


def cache_root() -> Path:
    base = os.environ.get("PIXTRAL_MLX_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pixtral-mlx"
    )
    return Path(base)


def is_mlx_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any(p.name != "consolidated.safetensors" for p in path.glob("*.safetensors"))


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~", "/"))


def resolve(model: str | os.PathLike, progress: Callable[[str], None] | None = None) -> Path:
    """A local MLX folder for `model`: a folder, an MLX repo id, or an official repo id (converted to
    4-bit once, into the cache folder)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{model} is a file; --model takes a folder with config.json and *.safetensors.")
        if is_mlx_dir(path):
            return path
        if (path / "consolidated.safetensors").exists() or (path / "config.json").exists():
            raise ModelError(f"{model} is not in MLX format; convert it first: pixtral-mlx convert {model} -q")
        raise ModelError(f"{model} holds no model (no config.json and *.safetensors).")
    if not _looks_like_repo_id(str(model)):
        raise ModelError(f"{model}: no such folder, and it is not a Hugging Face repo id (owner/name).")
    return _resolve_repo(str(model), progress)


def _resolve_repo(repo: str, progress: Callable[[str], None] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    converted = cache_root() / "models" / (repo.replace("/", "--") + "-4bit")
    if is_mlx_dir(converted):
        return converted
    try:
        try:  # already downloaded, in either layout?
            local = Path(
                snapshot_download(
                    repo, allow_patterns=MLX_ALLOW_PATTERNS + SOURCE_ALLOW_PATTERNS, local_files_only=True
                )
            )
            if not (is_mlx_dir(local) or (local / "consolidated.safetensors").exists()):
                raise FileNotFoundError
        except Exception:
            if progress:
                progress(f"Downloading {repo} from Hugging Face…")
            local = Path(snapshot_download(repo, allow_patterns=MLX_ALLOW_PATTERNS + SOURCE_ALLOW_PATTERNS))
    except GatedRepoError as e:
        raise ModelError(
            f"{repo} is gated: accept its license on huggingface.co and run `hf auth login`, "
            "or pass --model with a local folder."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"{repo} was not found on Hugging Face (or needs `hf auth login`).") from e
    except Exception as e:
        raise ModelError(
            f"could not download {repo} ({type(e).__name__}); check the network, or convert "
            "a local copy with `pixtral-mlx convert` and pass --model FOLDER."
        ) from e
    if is_mlx_dir(local):
        return local
    if (local / "consolidated.safetensors").exists():
        from .convert import convert

        if progress:
            progress(f"Converting {repo} to 4-bit MLX into {converted} (once)…")
        convert(local, converted, quantize=True, bits=4, group_size=64, progress=progress is not None)
        return converted
    raise ModelError(f"{repo} has neither MLX weights nor an official consolidated.safetensors.")


def _read_weights(path: Path) -> dict[str, Any]:
    import mlx.core as mx

    files = sorted(p for p in path.glob("*.safetensors") if p.name != "consolidated.safetensors")
    if not files:
        raise ModelError(f"{path} has no *.safetensors weights.")
    weights: dict[str, Any] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ModelError(f"{f} is not a readable safetensors file ({e}).") from e
    return weights


def _peer_layout(weights: dict[str, Any], args: PixtralArgs) -> dict[str, Any]:
    """Names and conv layout of older MLX/HF exports -> ours (idempotent: ours pass unchanged)."""
    from .convert.weights import HF_PREFIXES

    out = {}
    for k, v in weights.items():
        for old, new in HF_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        if (
            k.endswith("patch_conv.weight")
            and v.ndim == 4
            and v.shape[1] == args.vision.num_channels
            and v.shape[3] != args.vision.num_channels
        ):
            v = v.transpose(0, 2, 3, 1)  # PyTorch [O, I, kH, kW] -> MLX [O, kH, kW, I]
        if "rotary_emb" in k or k.endswith("position_ids"):
            continue
        out[k] = v
    return out


def load_model(path: Path) -> tuple[Any, PromptEncoder]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from . import backend
    from .model import Model

    try:
        config = json.loads((path / "config.json").read_text())
        args = PixtralArgs.from_hf_config(config)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path / 'config.json'} cannot be read ({e}).") from e
    model = Model(args)
    weights = _peer_layout(_read_weights(path), args)
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
    model.load_weights(list(weights.items()), strict=True)
    backend.prepare(model)
    mx.eval(model.parameters())
    tekken = path / "tekken.json"
    encoder = PromptEncoder(tekken if tekken.exists() else bundled_tekken(), image_size=args.vision.image_size)
    return model, encoder
