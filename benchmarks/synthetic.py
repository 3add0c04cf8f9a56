"""A synthetic Pixtral checkpoint in Mistral's official layout, written tensor by tensor.

`consolidated.safetensors` + `params.json` + `tekken.json`, with Pixtral-12B's real widths
(docs/MODEL.md §2.1–2.2) and random bfloat16 weights; only the numbers of decoder and vision
layers are chosen. The safetensors file is written with our own header writer and filled in
blocks from a pool of random values, so a multi-GB checkpoint never sits in memory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Pixtral-12B-2409 (docs/MODEL.md §2.1). The benchmark only changes the depths.
FULL_TEXT = {
    "dim": 5120,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "rope_theta": 1e9,
    "norm_eps": 1e-5,
    "n_layers": 40,
}
FULL_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 1024,
    "patch_size": 16,
    "num_channels": 3,
    "rope_theta": 10000.0,
    "image_token_id": 10,
    "image_break_token_id": 12,
    "image_end_token_id": 13,
    "adapter_bias": True,
}
# Tiny widths for the smoke test; the vocabulary stays real so that tekken works.
TINY_TEXT = {**FULL_TEXT, "dim": 64, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32}
TINY_VISION = {**FULL_VISION, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}

POOL = 1 << 24  # random values kept in memory (32 MB of bfloat16)
BLOCK = 1 << 22  # values written per block


def params(text_layers: int, vision_layers: int, tiny: bool = False) -> dict:
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (FULL_TEXT, FULL_VISION)
    return {**text, "n_layers": text_layers, "vision_encoder": {**vision, "num_hidden_layers": vision_layers}}


def tensor_shapes(p: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Official key -> PyTorch-layout shape, in the order the real file lists them."""
    d, hd, v = p["dim"], p["head_dim"], p["vision_encoder"]
    q, kv, ffn = p["n_heads"] * hd, p["n_kv_heads"] * hd, p["hidden_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (p["vocab_size"], d))]
    for i in range(p["n_layers"]):
        out += [
            (f"layers.{i}.attention.wq.weight", (q, d)),
            (f"layers.{i}.attention.wk.weight", (kv, d)),
            (f"layers.{i}.attention.wv.weight", (kv, d)),
            (f"layers.{i}.attention.wo.weight", (d, q)),
            (f"layers.{i}.feed_forward.w1.weight", (ffn, d)),
            (f"layers.{i}.feed_forward.w2.weight", (d, ffn)),
            (f"layers.{i}.feed_forward.w3.weight", (ffn, d)),
            (f"layers.{i}.attention_norm.weight", (d,)),
            (f"layers.{i}.ffn_norm.weight", (d,)),
        ]
    out += [("norm.weight", (d,)), ("output.weight", (p["vocab_size"], d))]
    vd, vf, ps, ch = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["num_channels"]
    out += [("vision_encoder.patch_conv.weight", (vd, ch, ps, ps)), ("vision_encoder.ln_pre.weight", (vd,))]
    for i in range(v["num_hidden_layers"]):
        pre = f"vision_encoder.transformer.layers.{i}"
        out += [(f"{pre}.attention.w{n}.weight", (vd, vd)) for n in "qkvo"]
        out += [
            (f"{pre}.feed_forward.w1.weight", (vf, vd)),
            (f"{pre}.feed_forward.w2.weight", (vd, vf)),
            (f"{pre}.feed_forward.w3.weight", (vf, vd)),
            (f"{pre}.attention_norm.weight", (vd,)),
            (f"{pre}.ffn_norm.weight", (vd,)),
        ]
    out += [
        ("vision_language_adapter.w_in.weight", (d, vd)),
        ("vision_language_adapter.w_in.bias", (d,)),
        ("vision_language_adapter.w_out.weight", (d, d)),
        ("vision_language_adapter.w_out.bias", (d,)),
    ]
    return out


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


class _Filler:
    """Random bfloat16 blocks: slices of a fixed pool at random offsets (fast, never all in RAM)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = _bf16(self.rng.standard_normal(POOL, dtype=np.float32) * 0.02)

    def blocks(self, name: str, n: int) -> Iterator[np.ndarray]:
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            yield _bf16(1.0 + 0.1 * self.rng.standard_normal(n, dtype=np.float32))
            return
        if name.endswith(".bias"):
            yield _bf16(0.02 * self.rng.standard_normal(n, dtype=np.float32))
            return
        while n > 0:
            k = min(n, BLOCK)
            start = int(self.rng.integers(0, POOL - k + 1))
            yield self.pool[start : start + k]
            n -= k


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> int:
    """Write BF16 tensors with random values; return the largest tensor's size in bytes."""
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    filler = _Filler(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes:
            for block in filler.blocks(name, int(np.prod(shape))):
                f.write(memoryview(np.ascontiguousarray(block)).cast("B"))
    return max(int(np.prod(s)) * 2 for _, s in shapes)


def tekken_json() -> Path:
    from pixtral_mlx.config import bundled_tekken

    return bundled_tekken()


def write_checkpoint(folder: Path, text_layers: int, vision_layers: int, tiny: bool = False, seed: int = 0) -> dict:
    """Create `folder` with consolidated.safetensors, params.json and tekken.json; return facts."""
    folder.mkdir(parents=True, exist_ok=True)
    p = params(text_layers, vision_layers, tiny)
    shapes = tensor_shapes(p)
    largest = write_safetensors(folder / "consolidated.safetensors", shapes, seed)
    (folder / "params.json").write_text(json.dumps(p, indent=2))
    shutil.copyfile(tekken_json(), folder / "tekken.json")
    return {
        "params": p,
        "tensors": len(shapes),
        "largest_tensor_bytes": largest,
        "largest_tensor": max(shapes, key=lambda s: int(np.prod(s[1])))[0],
        "bytes": (folder / "consolidated.safetensors").stat().st_size,
    }
