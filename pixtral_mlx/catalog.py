"""The supported family: short names, repo ids, architecture shapes, and what each costs in parameters and bytes.

Shapes come from /work/shared/FAMILY.md (§0, §1.1, §3) and docs/MODEL.md (§2, Pixtral-12B). Where a value is not
established there, the entry says so in `notes` and `approximate` marks its figures. Repo ids are only those
the documents or the code name; an MLX repo nobody has named is None.

Bytes follow how MLX stores a model: bf16 is 2 bytes per parameter; `bits`-bit quantization (mlx-lm's affine
format, what `convert -q` writes) packs the decoder's matrices (projections, embeddings, untied lm_head) into
uint32 words plus one bf16 scale and one bf16 bias per group of `group_size` inputs; the vision tower, the
projector and the norms stay bf16 (conversion/quantize.py). Importing this module does not import MLX.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixtral_mlx.memory import kv_bytes_per_token

BF16 = 2  # bytes per element
DEFAULT_CONTEXT = 8192  # tokens of KV cache the `models` listing budgets for


@dataclass(frozen=True)
class TextShape:
    """The decoder (Mistral blocks: GQA attention, SwiGLU FFN, RMSNorm)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix (Ministral-3-3B)

    def matrices(self) -> list[tuple[int, int, int]]:
        """(rows, cols, count) of every matrix quantization packs (grouped along cols, the input dimension)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [(self.vocab, d, 1 if self.tied else 2)]  # embed_tokens (+ lm_head)
        out += [(q, d, self.layers), (kv, d, 2 * self.layers), (d, q, self.layers)]  # q, k, v, o
        out += [(self.ffn, d, 2 * self.layers), (d, self.ffn, self.layers)]  # gate, up, down
        return out

    def dense(self) -> int:
        """Parameters that stay bf16: the two norms per layer and the final norm."""
        return (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return sum(r * c * n for r, c, n in self.matrices()) + self.dense()


@dataclass(frozen=True)
class VisionShape:
    """Pixtral-ViT (SwiGLU, RMSNorm, no biases) and the projector in front of the decoder."""

    layers: int = 24
    hidden: int = 1024
    heads: int = 16
    ffn: int = 4096
    patch: int = 16
    channels: int = 3
    merge: int = 1  # spatial_merge_size: 2 adds the 2x2 patch merger (Mistral3)
    pre_norm: bool = False  # RMSNorm before the projector (Mistral3)
    adapter_bias: bool = True  # Pixtral-12B's adapter has biases, Mistral3's does not

    def tower(self) -> int:
        h = self.hidden
        block = 4 * h * h + 3 * h * self.ffn + 2 * h  # q, k, v, o; gate, up, down; two norms
        return self.channels * self.patch * self.patch * h + h + self.layers * block  # patch conv, ln_pre

    def projector(self, text_hidden: int) -> int:
        h, d = self.hidden, text_hidden
        n = h * d + d * d + (2 * d if self.adapter_bias else 0)  # linear_1 (h -> d), linear_2 (d -> d)
        if self.pre_norm:
            n += h
        if self.merge > 1:
            n += h * self.merge**2 * h  # merging_layer (h*s^2 -> h), no bias
        return n


PIXTRAL_VISION = VisionShape()
MISTRAL3_VISION = VisionShape(patch=14, merge=2, pre_norm=True, adapter_bias=False)
SMALL_TEXT = TextShape(layers=40, hidden=5120, heads=32, kv_heads=8, head_dim=128, ffn=32768, vocab=131072)


@dataclass(frozen=True)
class Model:
    """One member of the family."""

    name: str  # the short name `--model` takes
    official: str  # Mistral's repo id
    text: TextShape
    vision: VisionShape | None  # None: not established (see `vision_params`)
    context: int  # tokens the model was trained on
    mlx_4bit: str | None = None  # an MLX 4-bit repo, where one is named
    also: tuple[str, ...] = ()  # other repos holding the same model (e.g. a Hugging Face layout)
    fp8: bool = False  # the official checkpoint stores the decoder's projections in FP8
    vision_params: int = 0  # vision side (tower + projector) when `vision` is None: an estimate
    estimated: bool = False  # a shape is assumed (see notes)
    notes: str = ""

    @property
    def approximate(self) -> bool:
        return self.vision is None or self.estimated

    @property
    def repos(self) -> tuple[str, ...]:
        return (self.official, *((self.mlx_4bit,) if self.mlx_4bit else ()), *self.also)

    def parts(self) -> dict[str, int]:
        """Parameters by part: decoder, vision tower, projector (with merger and norm)."""
        if self.vision is None:
            return {"decoder": self.text.params(), "vision": self.vision_params, "projector": 0}
        return {
            "decoder": self.text.params(),
            "vision": self.vision.tower(),
            "projector": self.vision.projector(self.text.hidden),
        }

    def params(self) -> int:
        return sum(self.parts().values())

    def weight_bytes(self, bits: int | None = None, group_size: int = 64) -> int:
        """Bytes of the weights in MLX: bf16 (`bits` None), or the decoder's matrices quantized to `bits`."""
        if bits is None:
            return BF16 * self.params()
        quantized = sum(n * (r * c * bits // 8 + 2 * BF16 * r * (c // group_size)) for r, c, n in self.text.matrices())
        packed = sum(r * c * n for r, c, n in self.text.matrices())
        return quantized + BF16 * (self.params() - packed)

    def download_bytes(self) -> int:
        """About what the official repo's weights weigh (one layout): bf16, or FP8 (1 byte) for the decoder's
        projections of an FP8 checkpoint (embeddings, lm_head and the vision side stay bf16)."""
        if not self.fp8:
            return BF16 * self.params()
        t = self.text
        projections = t.params() - t.dense() - t.vocab * t.hidden * (1 if t.tied else 2)
        return BF16 * self.params() - projections

    def kv_bytes(self, tokens: int = DEFAULT_CONTEXT) -> int:
        """The bf16 KV cache for `tokens` positions."""
        t = self.text
        return int(kv_bytes_per_token(t.layers, t.kv_heads, t.head_dim, BF16, None) * tokens)

    def memory_bytes(self, bits: int | None = None, tokens: int = DEFAULT_CONTEXT) -> int:
        """Weights at `bits` plus a bf16 KV cache of `tokens` positions."""
        return self.weight_bytes(bits) + self.kv_bytes(tokens)


def _ministral(size: str, text: TextShape, *, reasoning: bool = False, estimated: bool = False) -> Model:
    kind = "Reasoning" if reasoning else "Instruct"
    notes = [_M3_14B_NOTE] if estimated else []
    if not reasoning:
        notes.append(_FP8_NOTE)
    return Model(
        name=f"ministral-3-{size.lower()}" + ("-reasoning" if reasoning else ""),
        official=f"mistralai/Ministral-3-{size}-{kind}-2512",
        text=text,
        vision=MISTRAL3_VISION,
        context=262144,
        fp8=not reasoning,  # FAMILY.md §3.2: the Instruct checkpoints are FP8
        estimated=estimated,
        notes="; ".join(notes),
    )


_M3_3B = TextShape(layers=26, hidden=3072, heads=32, kv_heads=8, head_dim=128, ffn=9216, vocab=131072, tied=True)
_M3_8B = TextShape(layers=34, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=131072)
_M3_14B = TextShape(layers=40, hidden=5120, heads=32, kv_heads=8, head_dim=128, ffn=16384, vocab=131072)
_M3_14B_NOTE = "FFN size not established (FAMILY.md §10); 16384 assumed, which gives the published ~14B"
_FP8_NOTE = "the official checkpoint is FP8: it loads as bf16; for 4-bit, pixtral-mlx convert NAME -q"

FAMILY: tuple[Model, ...] = (
    Model(
        name="pixtral-12b",
        official="mistralai/Pixtral-12B-2409",
        text=TextShape(layers=40, hidden=5120, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=131072),
        vision=PIXTRAL_VISION,
        context=131072,
        mlx_4bit="mlx-community/pixtral-12b-4bit",
        also=("mistral-community/pixtral-12b",),
    ),
    Model("mistral-small-3.1", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", SMALL_TEXT, MISTRAL3_VISION, 131072),
    Model("mistral-small-3.2", "mistralai/Mistral-Small-3.2-24B-Instruct-2506", SMALL_TEXT, MISTRAL3_VISION, 131072),
    Model("magistral-small-1.2", "mistralai/Magistral-Small-2509", SMALL_TEXT, MISTRAL3_VISION, 131072),
    _ministral("3B", _M3_3B),
    _ministral("8B", _M3_8B),
    _ministral("14B", _M3_14B, estimated=True),
    _ministral("3B", _M3_3B, reasoning=True),
    _ministral("8B", _M3_8B, reasoning=True),
    _ministral("14B", _M3_14B, reasoning=True, estimated=True),
    Model(
        name="pixtral-large",
        official="mistralai/Pixtral-Large-Instruct-2411",
        text=TextShape(layers=88, hidden=12288, heads=96, kv_heads=8, head_dim=128, ffn=28672, vocab=32768),
        vision=None,
        context=131072,
        also=("mistral-community/Pixtral-Large-Instruct-2411",),
        vision_params=1_000_000_000,
        estimated=True,
        notes="vision encoder dims not established (FAMILY.md §3.3): ~1B assumed; not yet loadable",
    ),
)
DEFAULT = "pixtral-12b"  # the family member of the CLI's default model (its MLX 4-bit repo)
ALIASES = {"magistral-small": "magistral-small-1.2"}


def find(name: str) -> Model | None:
    """The member a short name (`ministral-3-8b`) or a repo's model name (`Pixtral-12B-2409`) names,
    case-insensitively; None for anything else."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    for m in FAMILY:
        if key == m.name or key == m.official.split("/", 1)[1].lower():
            return m
    return None


def repo_for(name: str) -> str | None:
    """The official repo id of a short name, or None when `name` is not one."""
    m = find(name)
    return m.official if m else None
