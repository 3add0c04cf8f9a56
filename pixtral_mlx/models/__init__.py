"""The architectures, one package per model family (as mlx-lm's `models/` and mlx-vlm's `models/<arch>/`).

Each family holds its args (dataclasses read from `config.json` or `params.json`: shapes and the window it was
trained on), its weight map (checkpoint tensor names of each format -> the names of its modules) and its model
(`model.py`, plus its vision encoder), written device-free like mlx-lm's `llama.py`. Nothing here imports the
runtime: the loader picks a family from the checkpoint's config, the runtime drives what it builds.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import Any

# model_type in config.json -> package. Pixtral-12B's Hugging Face config says "llava" (the default below);
# Mistral Small 3.x, Magistral Small 1.2 and Ministral 3 say "mistral3" (Mistral3ForConditionalGeneration).
FAMILIES = {"pixtral": "pixtral_mlx.models.pixtral", "mistral3": "pixtral_mlx.models.mistral3"}


def family(config: dict[str, Any]) -> ModuleType:
    """The package of the family a checkpoint's config describes (Pixtral-12B's LLaVA layout by default)."""
    name = config.get("model_type") if isinstance(config, dict) else None
    return import_module(FAMILIES.get(name, FAMILIES["pixtral"]))


def part(config: dict[str, Any], name: str) -> ModuleType:
    """One module of the family's package: `weights` (its weight map) or `model` (both import MLX)."""
    return import_module(f"{family(config).__name__}.{name}")
