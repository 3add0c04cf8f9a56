"""Mistral3 (`Mistral3ForConditionalGeneration`): Mistral Small 3.1/3.2, Magistral Small 1.2, Ministral 3.

Pixtral's vision encoder at patch 14, an RMSNorm and a 2x2 patch merger before a bias-free adapter, and a
Mistral decoder (`mistral`) or Ministral 3's YaRN decoder with llama-4 query scaling (`ministral3`).

- `args.py`: `Mistral3Args` from a Hugging Face `config.json` or Mistral's `params.json`; the trained window;
- `weights.py`: the weight map of both layouts (Pixtral's names plus the projector's norm and merger);
- `model.py`: the modules (importing it loads MLX; `args` and this file do not).
"""

from importlib import import_module
from types import ModuleType

from pixtral_mlx.models.mistral3.args import Mistral3Args

Args = Mistral3Args  # the family's args class, as the loader asks for it


def __getattr__(name: str) -> ModuleType:
    """`weights` and `model` on first use, as the loader asks for them (both import MLX)."""
    if name in ("weights", "model"):
        return import_module(f"{__name__}.{name}")
    raise AttributeError(name)


__all__ = ["Args", "Mistral3Args"]
