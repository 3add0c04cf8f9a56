"""Model configuration: one dataclass per part, filled from either source format.

Real Hugging Face `config.json` files list only non-default fields, so gaps are filled from the
published Pixtral-12B values (never from CLIP defaults, the mlx-vlm trap). The official
`params.json` uses mistral-inference field names and is translated here as well.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

# Published Pixtral-12B-2409 values (REFERENCE.md §2.1 and §3.1).
TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "vocab_size": 131072,
    "rope_theta": 1e9,
    "max_position_embeddings": 131072,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "image_size": 1024,
    "patch_size": 16,
    "num_channels": 3,
    "rope_theta": 10000.0,
}
CONTEXT_LENGTH = 131072  # the model card's 128K


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in d.items() if k in names})


def _rope_theta(d: dict[str, Any]) -> float | None:
    # transformers >= 5 writes rope_parameters={"rope_theta": ...}; older files write rope_theta.
    if d.get("rope_theta") is not None:
        return float(d["rope_theta"])
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return None


@dataclass
class VisionArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    rope_theta: float
    num_channels: int = 3
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision hidden_size must be divisible by num_attention_heads")
        if self.head_dim % 4:
            raise ValueError("vision head_dim must be a multiple of 4 for 2D RoPE")
        if self.image_size % self.patch_size:
            raise ValueError("vision image_size must be a multiple of patch_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int = 131072

    def to_mlx_lm(self) -> dict[str, Any]:
        """Arguments for mlx-lm's `llama.ModelArgs` (Mistral-NeMo is a llama-family decoder)."""
        return {
            **asdict(self),
            "model_type": "llama",
            "tie_word_embeddings": False,  # mlx-lm defaults to tied; Pixtral is untied
            "rope_traditional": False,  # the converter stores q/k in the HF (rotate-half) order
        }


@dataclass
class PixtralArgs:
    text: TextArgs
    vision: VisionArgs
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> PixtralArgs:
        """Read a transformers/mlx-vlm style `config.json` (LLaVA layout, sparse or complete)."""
        text = {**TEXT_DEFAULTS, **_without_none(config.get("text_config") or {})}
        vision = {**VISION_DEFAULTS, **_without_none(config.get("vision_config") or {})}
        for part, src in ((text, config.get("text_config") or {}), (vision, config.get("vision_config") or {})):
            theta = _rope_theta(src)
            if theta is not None:
                part["rope_theta"] = theta
        # vision_config.hidden_act is not read: Pixtral's vision FFN is SiLU-gated whatever the file
        # says (transformers defaults it to "gelu"; every Mistral-format consumer hard-codes SiLU).
        image_token = config.get("image_token_index", config.get("image_token_id", 10))
        return cls(
            text=_from_dict(TextArgs, text),
            vision=_from_dict(VisionArgs, vision),
            image_token_id=int(image_token),
            image_break_token_id=int(config.get("image_break_token_id", 12)),
            image_end_token_id=int(config.get("image_end_token_id", 13)),
            quantization=config.get("quantization"),
        )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PixtralArgs:
        """Read Mistral's official `params.json` (mistral-inference field names)."""
        try:
            venc = params["vision_encoder"]
            text = TextArgs(
                hidden_size=params["dim"],
                num_hidden_layers=params["n_layers"],
                intermediate_size=params["hidden_dim"],
                num_attention_heads=params["n_heads"],
                num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
                head_dim=params.get("head_dim", params["dim"] // params["n_heads"]),
                rms_norm_eps=params.get("norm_eps", 1e-5),
                vocab_size=params["vocab_size"],
                rope_theta=params.get("rope_theta", 1e9),
            )
            vision = VisionArgs(
                hidden_size=venc["hidden_size"],
                num_hidden_layers=venc["num_hidden_layers"],
                num_attention_heads=venc["num_attention_heads"],
                intermediate_size=venc["intermediate_size"],
                image_size=venc["image_size"],
                patch_size=venc["patch_size"],
                rope_theta=venc.get("rope_theta", 1e4),
                num_channels=venc.get("num_channels", 3),
            )
        except KeyError as e:
            raise ValueError(f"params.json has no {e.args[0]!r} field") from e
        return cls(
            text=text,
            vision=vision,
            image_token_id=venc.get("image_token_id", 10),
            image_break_token_id=venc.get("image_break_token_id", 12),
            image_end_token_id=venc.get("image_end_token_id", 13),
        )

    def to_config(self) -> dict[str, Any]:
        """The MLX-format `config.json` (the layout mlx-vlm publishes for Pixtral)."""
        text = {
            **asdict(self.text),
            "model_type": "mistral",
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "sliding_window": None,
        }
        vision = {
            **asdict(self.vision),
            "model_type": "pixtral",
            "head_dim": self.vision.head_dim,
            "hidden_act": "silu",
        }
        config: dict[str, Any] = {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "pixtral",
            "image_token_index": self.image_token_id,
            "image_break_token_id": self.image_break_token_id,
            "image_end_token_id": self.image_end_token_id,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "text_config": text,
            "vision_config": vision,
            "eos_token_id": 2,
        }
        if self.quantization:
            config["quantization"] = self.quantization
            config["quantization_config"] = self.quantization
        return config


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
