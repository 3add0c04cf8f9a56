"""Pixtral's configuration: one dataclass per part, filled from either source format.

Real Hugging Face `config.json` files list only non-default fields, so gaps are filled from the
published Pixtral-12B values (never from CLIP defaults, the mlx-vlm trap). The official
`params.json` uses mistral-inference field names and is translated here as well.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

# Published Pixtral-12B-2409 values (docs/MODEL.md §2.1 and §3.1).
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
# The trained context window, from the model card (Pixtral-12B: 128K). This is the one source of the limit:
# Hugging Face Pixtral configs (mistral-community, mlx-community) carry 1,024,000 in max_position_embeddings,
# which is not what the model was trained on, so that field can only lower the limit (`PixtralArgs.context_length`).
CONTEXT_LENGTH = 131072


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in d.items() if k in names})


def _check_fields(obj: Any, part: str) -> None:
    """Every field a positive number of the declared kind: one sentence naming the first bad one."""
    from pixtral_mlx.errors import ConfigError

    for name, f in obj.__dataclass_fields__.items():
        value = getattr(obj, name)
        want_int = f.type in ("int", int)
        ok = isinstance(value, int) if want_int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "a whole number" if want_int else "a number"
            raise ConfigError(f"{part}.{name} must be {kind}, not {value!r}")
        if not value > 0:  # also false for NaN
            raise ConfigError(f"{part}.{name} must be positive, not {value!r}")


def _require(condition: bool, message: str) -> None:
    from pixtral_mlx.errors import ConfigError

    if not condition:
        raise ConfigError(message)


def check_quantization(quant: Any) -> dict[str, Any] | None:
    """The `quantization` block of config.json: group_size and bits, plus per-module overrides."""
    if quant is None:
        return None
    _require(isinstance(quant, dict), f"quantization must be an object, not {quant!r}")
    for key in ("group_size", "bits"):
        _require(key in quant, f"quantization has no {key!r}")
    for where, block in [("quantization", quant)] + [
        (f"quantization[{k!r}]", v) for k, v in quant.items() if isinstance(v, dict)
    ]:
        g, b = block.get("group_size", quant["group_size"]), block.get("bits", quant["bits"])
        _require(g in (32, 64, 128) and not isinstance(g, bool), f"{where} group_size must be 32, 64 or 128, not {g!r}")
        _require(b in (2, 3, 4, 5, 6, 8) and not isinstance(b, bool), f"{where} bits must be 2–6 or 8, not {b!r}")
    return quant


def _rope_theta(d: dict[str, Any]) -> float | None:
    # transformers >= 5 writes rope_parameters={"rope_theta": ...}; older files write rope_theta.
    if d.get("rope_theta") is not None:
        return _number(d["rope_theta"], "rope_theta")
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return _number(params["rope_theta"], "rope_parameters.rope_theta")
    return None


def _number(value: Any, name: str, kind: type = float) -> Any:
    from pixtral_mlx.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}")
    return kind(value)


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
        _check_fields(self, "vision_config")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "vision hidden_size must be divisible by num_attention_heads",
        )
        _require(self.head_dim % 4 == 0, "vision head_dim must be a multiple of 4 for 2D RoPE")
        _require(self.image_size % self.patch_size == 0, "vision image_size must be a multiple of patch_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_config(self) -> dict[str, Any]:
        """The `vision_config` of an MLX-format config.json (every family with Pixtral's encoder writes this)."""
        return {**asdict(self), "model_type": "pixtral", "head_dim": self.head_dim, "hidden_act": "silu"}


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

    def __post_init__(self) -> None:
        _check_fields(self, "text_config")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "text_config.num_attention_heads must be a multiple of num_key_value_heads",
        )
        _require(self.head_dim % 2 == 0, "text_config.head_dim must be even (RoPE rotates pairs)")

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

    @property
    def context_length(self) -> int:
        """The trained window: the model card's, lowered (never raised) by the config's max_position_embeddings."""
        return min(CONTEXT_LENGTH, self.text.max_position_embeddings)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> PixtralArgs:
        """Read a transformers/mlx-vlm style `config.json` (LLaVA layout, sparse or complete)."""
        _require(isinstance(config, dict), f"the file must hold a JSON object, not {type(config).__name__}")
        for part in ("text_config", "vision_config"):
            value = config.get(part)
            _require(value is None or isinstance(value, dict), f"{part} must be an object, not {value!r}")
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
            image_token_id=_number(image_token, "image_token_index", int),
            image_break_token_id=_number(config.get("image_break_token_id", 12), "image_break_token_id", int),
            image_end_token_id=_number(config.get("image_end_token_id", 13), "image_end_token_id", int),
            quantization=check_quantization(config.get("quantization")),
        )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PixtralArgs:
        """Read Mistral's official `params.json` (mistral-inference field names)."""
        from pixtral_mlx.errors import ConfigError

        _require(isinstance(params, dict), f"the file must hold a JSON object, not {type(params).__name__}")
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
            raise ConfigError(f"params.json has no {e.args[0]!r} field") from e
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"params.json has a field of the wrong type ({e})") from e
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
            "vision_config": self.vision.to_config(),
            "eos_token_id": 2,
        }
        return {**config, **quantization_keys(self.quantization)}


def quantization_keys(quantization: dict[str, Any] | None) -> dict[str, Any]:
    """The quantization block of an MLX-format config.json, under both names MLX peers read."""
    return {"quantization": quantization, "quantization_config": quantization} if quantization else {}


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}
