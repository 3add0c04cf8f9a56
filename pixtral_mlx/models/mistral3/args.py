"""Mistral3's configuration (`Mistral3ForConditionalGeneration`, model_type `mistral3`) from a HF config.json.

One architecture, two decoders (/work/shared/FAMILY.md §0, §3):

- text model_type `mistral` (Mistral Small 3.1/3.2, Magistral Small 1.2): a plain Mistral decoder, RoPE θ 1e9;
- text model_type `ministral3` (Ministral 3, Devstral Small 2): YaRN RoPE and the "llama-4" query scaling
  (`rope_parameters`: factor, original_max_position_embeddings, beta_fast/slow, mscale, mscale_all_dim,
  llama_4_scaling_beta); the 3B ties its output layer to the embeddings.

The vision side is Pixtral's encoder with patch 14 and 1540-pixel images, then an RMSNorm, a 2x2 patch merger
and a bias-free GELU adapter (FAMILY.md §1, §2). Gaps in sparse config files are filled with the published
Mistral-Small-3.1 values (its Hub config.json, FAMILY.md §1.1 and §3.1) or, for `ministral3`, transformers'
`Ministral3Config` defaults (FAMILY.md §3.2).

`Mistral3Args.from_params` reads Mistral's official `params.json` instead (FAMILY.md §6.1, §3.2 "Official
`params.json` form"), and `to_config` writes the HF-style config.json the converter leaves beside its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pixtral_mlx.models.pixtral import args as pixtral_args
from pixtral_mlx.models.pixtral.args import (
    VisionArgs,
    _from_dict,
    _number,
    _require,
    _without_none,
    check_quantization,
    quantization_keys,
)

# Mistral-Small-3.1-24B-Instruct-2503 config.json (FAMILY.md §1.1, §3.1, [primary]).
TEXT_DEFAULTS: dict[str, Any] = {**pixtral_args.TEXT_DEFAULTS, "intermediate_size": 32768}
# transformers' Ministral3Config defaults (the 8B shape; FAMILY.md §3.2, [primary]).
MINISTRAL3_DEFAULTS: dict[str, Any] = {
    **TEXT_DEFAULTS,
    "hidden_size": 4096,
    "num_hidden_layers": 34,
    "intermediate_size": 14336,
    "rope_theta": 1e6,
    "max_position_embeddings": 262144,
}
MINISTRAL3_ROPE: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 16384,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
VISION_DEFAULTS: dict[str, Any] = {**pixtral_args.VISION_DEFAULTS, "image_size": 1540, "patch_size": 14}
DECODERS = ("mistral", "ministral3")


@dataclass
class TextArgs(pixtral_args.TextArgs):
    """Pixtral's decoder shapes plus what Mistral3's decoders add."""

    model_type: str = "mistral"
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None  # YaRN + llama-4 query scaling (ministral3)

    def __post_init__(self) -> None:
        # The shapes are checked as Pixtral's are (every one a positive number of its kind).
        base = {f.name for f in fields(pixtral_args.TextArgs)}
        pixtral_args.TextArgs(**{k: v for k, v in asdict(self).items() if k in base})
        _require(
            self.model_type in DECODERS, f"text_config.model_type must be one of {DECODERS}, not {self.model_type!r}"
        )
        _require(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings must be true or false")
        if self.model_type == "ministral3":
            r = self.rope_scaling
            _require(isinstance(r, dict), "a ministral3 text_config needs its rope_parameters")
            assert isinstance(r, dict)
            _require(r.get("rope_type") == "yarn", f"ministral3 rope_type must be 'yarn', not {r.get('rope_type')!r}")
            for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                _require(_positive(r.get(key)), f"rope_parameters.{key} must be a positive number, not {r.get(key)!r}")
            for key in ("mscale", "mscale_all_dim", "llama_4_scaling_beta"):
                value = r.get(key)
                _require(_non_negative(value), f"rope_parameters.{key} must be a number ≥ 0, not {value!r}")

    @property
    def trained_length(self) -> int:
        """YaRN's window, original_max_position_embeddings x factor, lowered by max_position_embeddings
        (Ministral 3: 16384 x 16 = 262144, its config's max_position_embeddings and model card's 256K);
        a plain Mistral decoder's is its max_position_embeddings (Small 3.1: 131072, the card's 128K)."""
        if self.rope_scaling:
            yarn = int(self.rope_scaling["original_max_position_embeddings"] * self.rope_scaling["factor"])
            return min(yarn, self.max_position_embeddings)
        return self.max_position_embeddings

    def to_mlx_lm(self) -> dict[str, Any]:
        """Arguments for mlx-lm's `llama.ModelArgs` (mistral) or `ministral3.ModelArgs` (ministral3)."""
        base = {f.name: getattr(self, f.name) for f in fields(pixtral_args.TextArgs)}
        if self.model_type == "mistral":
            return {
                **base,
                "model_type": "llama",
                "tie_word_embeddings": self.tie_word_embeddings,
                "rope_traditional": False,  # HF checkpoints store q/k in the rotate-half order
            }
        assert self.rope_scaling is not None
        return {
            **base,
            "model_type": "ministral3",
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {**self.rope_scaling, "type": "yarn", "rope_theta": self.rope_theta},
        }


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _rope_scaling(text: dict[str, Any]) -> dict[str, Any]:
    """The YaRN block of a ministral3 text_config: transformers 5 `rope_parameters`, or 4.x `rope_scaling`."""
    src = text.get("rope_parameters") or text.get("rope_scaling")
    _require(src is None or isinstance(src, dict), f"rope_parameters must be an object, not {src!r}")
    # transformers fills the whole block only when it is absent (Ministral3Config.__post_init__); in a given
    # block, YaRN defaults beta_fast 32 and beta_slow 1, and a missing mscale means "not set".
    r = dict(MINISTRAL3_ROPE) if src is None else {"beta_fast": 32.0, "beta_slow": 1.0, **_without_none(src)}
    r["rope_type"] = r.pop("type", None) or r.get("rope_type")
    r.pop("rope_theta", None)
    r.pop("max_position_embeddings", None)
    # transformers: attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) when
    # both are set (non-zero), else get_mscale(factor); mlx-lm's YarnRoPE always takes the ratio, so a missing or
    # zero mscale_all_dim means mscale 1 there (FAMILY.md §3.2, "YaRN as computed by transformers").
    if not (r.get("mscale") and r.get("mscale_all_dim")):
        r["mscale"], r["mscale_all_dim"] = 1.0, 0.0
    return r


@dataclass
class Mistral3Args:
    text: TextArgs
    vision: VisionArgs
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    spatial_merge_size: int = 2
    projector_bias: bool = False
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.spatial_merge_size
        _require(isinstance(s, int) and not isinstance(s, bool) and s > 0, f"spatial_merge_size must be ≥ 1, not {s!r}")
        _require(isinstance(self.projector_bias, bool), "multimodal_projector_bias must be true or false")

    @property
    def context_length(self) -> int:
        """The trained window (`TextArgs.trained_length`)."""
        return self.text.trained_length

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> Mistral3Args:
        """Read a transformers `Mistral3ForConditionalGeneration` config.json (sparse or complete)."""
        _require(isinstance(config, dict), f"the file must hold a JSON object, not {type(config).__name__}")
        for part in ("text_config", "vision_config"):
            value = config.get(part)
            _require(value is None or isinstance(value, dict), f"{part} must be an object, not {value!r}")
        src_text = _without_none(config.get("text_config") or {})
        src_vision = _without_none(config.get("vision_config") or {})
        kind = src_text.get("model_type", "mistral")
        _require(kind in DECODERS, f"text_config.model_type must be one of {DECODERS}, not {kind!r}")
        text = {**(MINISTRAL3_DEFAULTS if kind == "ministral3" else TEXT_DEFAULTS), **src_text}
        vision = {**VISION_DEFAULTS, **src_vision}
        for part, src in ((text, src_text), (vision, src_vision)):
            theta = pixtral_args._rope_theta(src)
            if theta is not None:
                part["rope_theta"] = theta
        text["model_type"] = kind
        text["rope_scaling"] = _rope_scaling(src_text) if kind == "ministral3" else None
        # transformers reads tie_word_embeddings from text_config (the top-level key defaults to True in
        # Mistral3Config, FAMILY.md §7's pitfall); a real Small 3.1 file sets neither, and is untied.
        text["tie_word_embeddings"] = bool(src_text.get("tie_word_embeddings", False))
        # vision_config.hidden_act is not read: the encoder is SiLU-gated (FAMILY.md §1.2).
        _require(
            config.get("vision_feature_layer", -1) in (-1, [-1]),
            f"vision_feature_layer {config.get('vision_feature_layer')!r} is not supported (only -1, the last layer)",
        )
        act = config.get("projector_hidden_act", "gelu")
        _require(act == "gelu", f"projector_hidden_act {act!r} is not supported (only 'gelu')")
        image_token = config.get("image_token_index", config.get("image_token_id", 10))
        return cls(
            text=_from_dict(TextArgs, text),
            vision=_from_dict(VisionArgs, vision),
            image_token_id=_number(image_token, "image_token_index", int),
            image_break_token_id=_number(config.get("image_break_token_id", 12), "image_break_token_id", int),
            image_end_token_id=_number(config.get("image_end_token_id", 13), "image_end_token_id", int),
            spatial_merge_size=_number(config.get("spatial_merge_size", 2), "spatial_merge_size", int),
            projector_bias=config.get("multimodal_projector_bias", False),
            quantization=check_quantization(config.get("quantization")),
        )

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Mistral3Args:
        """Read Mistral's official `params.json` (mistral-inference names; FAMILY.md §6.1 and §3.2).

        A `yarn` or `llama_4_scaling` block makes the decoder `ministral3` (the transformers converter's mapping:
        yarn.beta -> beta_fast, yarn.alpha -> beta_slow, llama_4_scaling.beta -> llama_4_scaling_beta; mscale is
        1, and mscale_all_dim 0 when `apply_scale` is true, else 1); without them it is a plain `mistral` one."""
        from pixtral_mlx.errors import ConfigError

        _require(isinstance(params, dict), f"the file must hold a JSON object, not {type(params).__name__}")
        try:
            venc = params["vision_encoder"]
            _require(isinstance(venc, dict), "params.json vision_encoder must be an object")
            yarn, l4 = params.get("yarn"), params.get("llama_4_scaling")
            kind = "ministral3" if (yarn or l4) else "mistral"
            defaults = MINISTRAL3_DEFAULTS if kind == "ministral3" else TEXT_DEFAULTS
            text: dict[str, Any] = {
                "model_type": kind,
                "hidden_size": params["dim"],
                "num_hidden_layers": params["n_layers"],
                "intermediate_size": params["hidden_dim"],
                "num_attention_heads": params["n_heads"],
                "num_key_value_heads": params.get("n_kv_heads", params["n_heads"]),
                "head_dim": params.get("head_dim") or params["dim"] // params["n_heads"],
                "rms_norm_eps": params.get("norm_eps", 1e-5),
                "vocab_size": params["vocab_size"],
                "rope_theta": params.get("rope_theta", defaults["rope_theta"]),
                "max_position_embeddings": params.get("max_position_embeddings")
                or params.get("max_seq_len")
                or defaults["max_position_embeddings"],
                "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
                "rope_scaling": None,
            }
            if kind == "ministral3":
                yarn = yarn or {}
                l4 = l4 or {}
                _require(isinstance(yarn, dict) and isinstance(l4, dict), "params.json yarn must be an object")
                original = yarn.get("original_max_position_embeddings", l4.get("original_max_position_embeddings"))
                rope = {
                    "rope_type": "yarn",
                    "factor": yarn.get("factor", MINISTRAL3_ROPE["factor"]),
                    "original_max_position_embeddings": original or MINISTRAL3_ROPE["original_max_position_embeddings"],
                    "beta_fast": yarn.get("beta", MINISTRAL3_ROPE["beta_fast"]),
                    "beta_slow": yarn.get("alpha", MINISTRAL3_ROPE["beta_slow"]),
                    "mscale": 1.0,
                    "mscale_all_dim": 0.0 if yarn.get("apply_scale") else 1.0,
                    "llama_4_scaling_beta": l4.get("beta", 0.0),
                }
                text["rope_scaling"] = _rope_scaling({"rope_parameters": rope})
            merge = venc.get("spatial_merge_size", 1)
            _require(
                venc.get("mm_projector_id") == "patch_merge" and merge > 1,
                "params.json vision_encoder has no patch merger (mm_projector_id 'patch_merge'): not a Mistral3 model",
            )
            _require(
                bool(venc.get("add_pre_mm_projector_layer_norm", False)),
                "params.json vision_encoder has no add_pre_mm_projector_layer_norm: not a Mistral3 model",
            )
            vision = {
                "hidden_size": venc["hidden_size"],
                "num_hidden_layers": venc["num_hidden_layers"],
                "num_attention_heads": venc["num_attention_heads"],
                "intermediate_size": venc["intermediate_size"],
                "image_size": venc.get("max_image_size", venc.get("image_size")),
                "patch_size": venc["patch_size"],
                "rope_theta": venc.get("rope_theta", 1e4),
                "num_channels": venc.get("num_channels", 3),
            }
            return cls(
                text=_from_dict(TextArgs, text),
                vision=_from_dict(VisionArgs, vision),
                image_token_id=_number(venc.get("image_token_id", 10), "image_token_id", int),
                image_break_token_id=_number(venc.get("image_break_token_id", 12), "image_break_token_id", int),
                image_end_token_id=_number(venc.get("image_end_token_id", 13), "image_end_token_id", int),
                spatial_merge_size=merge,
                projector_bias=bool(venc.get("adapter_bias", True)),  # mistral-inference's default
            )
        except KeyError as e:
            raise ConfigError(f"params.json has no {e.args[0]!r} field") from e
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"params.json has a field of the wrong type ({e})") from e

    def to_config(self) -> dict[str, Any]:
        """The MLX-format config.json: transformers' `Mistral3ForConditionalGeneration` layout, which
        `from_hf_config` reads back to these same args."""
        base = {f.name: getattr(self.text, f.name) for f in fields(pixtral_args.TextArgs)}
        theta = base.pop("rope_theta")
        text: dict[str, Any] = {
            **base,
            "model_type": self.text.model_type,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "hidden_act": "silu",
            "sliding_window": None,
        }
        if self.text.rope_scaling:
            text["rope_parameters"] = {**self.text.rope_scaling, "type": "yarn", "rope_theta": theta}
        else:
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        config: dict[str, Any] = {
            "architectures": ["Mistral3ForConditionalGeneration"],
            "model_type": "mistral3",
            "image_token_index": self.image_token_id,
            "image_break_token_id": self.image_break_token_id,
            "image_end_token_id": self.image_end_token_id,
            "spatial_merge_size": self.spatial_merge_size,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": -1,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": text,
            "vision_config": self.vision.to_config(),
            "eos_token_id": 2,
        }
        return {**config, **quantization_keys(self.quantization)}
