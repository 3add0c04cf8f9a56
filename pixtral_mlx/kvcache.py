"""KV-cache types and the chat KV file.

- `make_layers`: one cache per decoder layer: mlx-lm's `KVCache`, or its `QuantizedKVCache` from the first
  token when `kv_bits` is set (no conversion later, so no full-precision peak). Never a rotating cache:
  image prefixes are never evicted.
- The chat KV file is mlx-lm's prompt-cache format (`save_prompt_cache`: safetensors, one entry per layer)
  with our metadata: the messages (PIL images as PNG data: URLs), the cached tokens, the image digests,
  a model fingerprint and the KV setting. `read_file` returns the layers only when all of it matches the
  model and setting that will use them; otherwise a reason, and the caller prefills again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import PromptError

FORMAT = "pixtral-mlx.chat-kv"
VERSION = 1
META_KEY = "pixtral_mlx"
_FINGERPRINTS: dict[str, str] = {}


def check_group(args: Any, kv_bits: int | None, kv_group_size: int) -> None:
    """A quantized cache's groups must tile each head's keys and values."""
    if kv_bits is not None and args.text.head_dim % kv_group_size:
        raise PromptError(
            f"kv_group_size must divide the model's head size {args.text.head_dim}, got {kv_group_size}.",
            param="kv_group_size",
        )


def make_layers(model: Any, kv_bits: int | None, kv_group_size: int) -> list[Any]:
    """The decoder's per-layer caches for this KV setting."""
    if kv_bits is None:
        return model.make_cache()
    from mlx_lm.models.cache import QuantizedKVCache

    check_group(model.args, kv_bits, kv_group_size)
    return [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) for _ in model.layers]


def nbytes(layers: list[Any]) -> int:
    """Bytes the caches have allocated (mlx-lm's `nbytes`: keys, values, and scales and biases if quantized)."""
    return sum(c.nbytes for c in layers if not c.empty())


def kv_dtype(model: Any) -> str:
    """The dtype keys and values are computed in (float32 on CPU, the checkpoint's half type on Metal)."""
    return str(model.language_model.model.norm.weight.dtype).removeprefix("mlx.core.")


# Model fingerprint ---------------------------------------------------------------------------------
def _sample(file: Path, size: int = 1 << 16) -> bytes:
    """A safetensors file's header and three 64 KiB samples of its data: cheap, and different for
    different weights of the same shapes."""
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        header = f.read(min(n, 1 << 24))
        end = f.seek(0, os.SEEK_END)
        out = [head, header]
        for at in (8 + n, (8 + n + end) // 2, max(end - size, 8 + n)):
            f.seek(at)
            out.append(f.read(size))
    return b"".join(out)


def fingerprint(pixtral: Any) -> str:
    """Which weights and tokenizer a cache was computed with: config.json, tekken.json, the weight index
    and a sample of every weight file (never a full hash of gigabytes)."""
    path = Path(pixtral.path) if pixtral.path is not None else None
    key = str(path.resolve()) if path is not None else f"id:{id(pixtral)}"
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    if path is not None and path.is_dir():
        for name in ("config.json", "tekken.json", "model.safetensors.index.json"):
            if (path / name).is_file():
                h.update(name.encode() + (path / name).read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            if f.name != "consolidated.safetensors":
                h.update(f.name.encode() + _sample(f))
    else:
        import numpy as np
        from mlx.utils import tree_flatten

        h.update(repr(pixtral.args).encode())
        for name, v in tree_flatten(pixtral.model.parameters()):
            h.update(name.encode() + np.array(v.reshape(-1)[:64]).tobytes())
    _FINGERPRINTS[key] = h.hexdigest()[:32]
    return _FINGERPRINTS[key]


# Messages as JSON ----------------------------------------------------------------------------------
def _png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def jsonable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with PIL images as lossless PNG data: URLs (paths and URLs stay as they are)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, dict) and p.get("type") == "image" and not isinstance(p.get("image"), str):
                    url = {"url": _png_data_url(p["image"])}
                    p = {"type": "image_url", "image_url": url, **({"name": p["name"]} if p.get("name") else {})}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


# The file ------------------------------------------------------------------------------------------
def image_starts(tokens: list[int], image_token: int, break_token: int) -> list[int]:
    """Where each image's [IMG] block begins in `tokens`."""
    starts = []
    for i, tok in enumerate(tokens):
        if tok == image_token and (i == 0 or tokens[i - 1] not in (image_token, break_token)):
            starts.append(i)
    return starts


def _exact(layer: Any) -> Any:
    """A copy of a layer's cache holding only its `offset` positions (not the allocation's spare room)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    n = layer.offset
    if isinstance(layer, QuantizedKVCache):
        out = QuantizedKVCache(group_size=layer.group_size, bits=layer.bits)
        if layer.keys is not None:
            out.keys = tuple(x[..., :n, :] for x in layer.keys)
            out.values = tuple(x[..., :n, :] for x in layer.values)
    else:
        out = KVCache()
        if layer.keys is not None:
            out.keys, out.values = layer.keys[..., :n, :], layer.values[..., :n, :]
    out.offset = n
    return out


def write_file(path: str | os.PathLike, layers: list[Any], meta: dict[str, Any]) -> Path:
    """Write the caches and `meta` atomically (a temporary file renamed over `path`)."""
    from mlx_lm.models.cache import save_prompt_cache

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_prompt_cache(tmp, [_exact(c) for c in layers], {META_KEY: json.dumps({"format": FORMAT, **meta})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a chat KV file; PromptError if it is not one."""
    import mlx.core as mx

    if not Path(path).is_file():
        raise PromptError(f"{path}: no such file.")
    try:
        _, raw = mx.load(str(path), return_metadata=True)
        meta = json.loads(next(v for k, v in raw.items() if k.endswith(META_KEY)))
    except Exception as e:
        raise PromptError(f"{path} is not a pixtral-mlx chat KV file ({type(e).__name__}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PromptError(f"{path} is not a pixtral-mlx chat KV file.")
    return meta


def read_file(path: str | os.PathLike, pixtral: Any, kv_bits: int | None, kv_group_size: int) -> tuple[Any, str]:
    """(layers, meta) when the file's caches fit this model and KV setting, else (None, the reason)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, load_prompt_cache

    try:
        meta = read_meta(path)
    except PromptError as e:
        return None, str(e)
    wanted = {
        "version": VERSION,
        "fingerprint": fingerprint(pixtral),
        "kv_bits": kv_bits,
        "kv_group_size": kv_group_size if kv_bits else None,
        "kv_dtype": kv_dtype(pixtral.model),
    }
    for key, value in wanted.items():
        if meta.get(key) != value:
            what = "model" if key == "fingerprint" else key.replace("_", " ")
            return None, f"it was saved with another {what}"
    try:
        layers = load_prompt_cache(str(path))
    except Exception as e:
        return None, f"its caches cannot be read ({type(e).__name__})"
    tokens = meta.get("tokens")
    t = pixtral.args.text
    kind = KVCache if kv_bits is None else QuantizedKVCache
    if not isinstance(tokens, list) or len(layers) != t.num_hidden_layers:
        return None, "its caches do not match the model's layers"
    width = t.head_dim if kv_bits is None else t.head_dim * kv_bits // 32
    for c in layers:
        if type(c) is not kind or c.offset != len(tokens):
            return None, "its caches do not match its tokens"
        keys = c.keys if kv_bits is None else (c.keys[0] if c.keys else None)
        if tokens and (keys is None or tuple(keys.shape) != (1, t.num_key_value_heads, len(tokens), width)):
            return None, "its caches do not have the model's shapes"
    return (layers, meta), ""
