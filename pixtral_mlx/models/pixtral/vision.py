"""Pixtral-ViT: the vision encoder of Pixtral-12B.

References: the Pixtral blog and paper (arXiv:2410.07073); mistral-inference `vision_encoder.py`;
transformers `models/pixtral/modeling_pixtral.py`. Weights are stored in the HF rotate-half RoPE
order (the converter permutes official checkpoints), so RoPE-2D here is `q*cos + rotate_half(q)*sin`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .args import VisionArgs


def rope_2d(grid: list[tuple[int, int]], args: VisionArgs) -> tuple[mx.array, mx.array]:
    """cos/sin tables (N, head_dim) for the patches of all images, row-major within each image.

    Frequencies f_k = theta^(-2k/hd); even k rotate by the patch row, odd k by the column
    (mistral-inference `precompute_freqs_cis_2d`). Positions restart at (0, 0) for every image.
    """
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (mx.arange(0, hd, 2, dtype=mx.float32) / hd))
    rows, cols = [], []
    for h, w in grid:
        idx = mx.arange(h * w)
        rows.append(idx // w)
        cols.append(idx % w)
    r = mx.concatenate(rows).astype(mx.float32)[:, None]
    c = mx.concatenate(cols).astype(mx.float32)[:, None]
    angles = mx.concatenate([r * freqs[0::2], c * freqs[1::2]], axis=-1)  # (N, hd/2)
    angles = mx.concatenate([angles, angles], axis=-1)  # (N, hd) for rotate-half
    return mx.cos(angles), mx.sin(angles)


def rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        d = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.scale = args.head_dim**-0.5
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, bounds: list[int]) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # (B, n_heads, L, head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Patches attend only within their own image: one attention per image, no N x N mask.
        out = mx.concatenate(
            [self._attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], axis=2
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)


class FeedForward(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.feed_forward = FeedForward(args)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, bounds: list[int]) -> mx.array:
        h = x + self.attention(self.attention_norm(x), cos, sin, bounds)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]


class PixtralVisionModel(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        # MLX conv weights are [out, kH, kW, in] on NHWC input (PyTorch: [out, in, kH, kW] on NCHW).
        self.patch_conv = nn.Conv2d(
            args.num_channels, args.hidden_size, args.patch_size, stride=args.patch_size, bias=False
        )
        self.ln_pre = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.transformer = Transformer(args)

    def __call__(self, images: list[mx.array]) -> mx.array:
        """Images as (H, W, 3) arrays (sides multiples of patch_size) -> (sum h*w, hidden) features."""
        p = self.args.patch_size
        dtype = self.patch_conv.weight.dtype
        if dtype not in (mx.float32, mx.float16, mx.bfloat16):
            dtype = mx.float32
        grid = [(img.shape[0] // p, img.shape[1] // p) for img in images]
        # Each image is convolved on its own: no padding ever reaches the encoder.
        patches = [self.patch_conv(img[None].astype(dtype)).reshape(-1, self.args.hidden_size) for img in images]
        x = self.ln_pre(mx.concatenate(patches, axis=0)[None])  # (1, N, D)
        cos, sin = rope_2d(grid, self.args)
        cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
        bounds = [0]
        for h, w in grid:
            bounds.append(bounds[-1] + h * w)
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, bounds)
        return x[0]


class VisionModel(nn.Module):
    """Wrapper that gives the checkpoint names `vision_tower.vision_model.*` (mlx-vlm layout)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.vision_model = PixtralVisionModel(args)

    def __call__(self, images: list[mx.array]) -> mx.array:
        return self.vision_model(images)
