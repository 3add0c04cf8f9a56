"""Pixtral-12B: the Pixtral-ViT vision encoder, a GELU adapter and the Mistral-NeMo decoder (mlx-lm's llama).

- `args.py`: `PixtralArgs` (text and vision parts) from a Hugging Face `config.json` or Mistral's `params.json`,
  with the published defaults and the trained context window (`CONTEXT_LENGTH`);
- `weights.py`: the weight map: official and Hugging Face tensor names -> ours, and the RoPE permutation;
- `vision.py`, `model.py`: the modules (importing these loads MLX; `args` and this file do not).
"""

from .args import CONTEXT_LENGTH, PixtralArgs

Args = PixtralArgs  # the family's args class, as the loader asks for it

__all__ = ["CONTEXT_LENGTH", "Args", "PixtralArgs"]
