"""KV-cache types and the chat KV file.

- `make_layers`: one cache per decoder layer: mlx-lm's `KVCache`, or its `QuantizedKVCache` from the first
  token when `kv_bits` is set (no conversion later, so no full-precision peak). Never a rotating cache:
  image prefixes are never evicted.
- The chat KV file is mlx-lm's prompt-cache format (`save_prompt_cache`: safetensors, one entry per layer)
  with our metadata: the messages (every image as a PNG data: URL, so the file is the whole chat), the
  cached tokens, the image digests, a hash that ties these to the caches, a model fingerprint and the KV
  setting. `read_file` returns the layers only when all of it matches the model and setting that will use
  them and the hash holds; otherwise a reason, and the caller prefills again.
- A saved chat is data: loading one reads that file and nothing else (`check_images` refuses any image that
  is not a data: URL, so no path is opened and no URL fetched).

One module on purpose, though about 300 lines: the chat KV file is most of it, and the cache types are the few
lines whose setting (KV bits, group size, dtype) that file records and checks again on load.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from .errors import PromptError

FORMAT = "pixtral-mlx.chat-kv"
VERSION = 2  # 2: the tokens hash (files without one are prefilled again)
SUFFIX = ".safetensors"
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
    """Which weights and tokenizer a cache was computed with: config.json, the tokenizer file, the weight index
    and a sample of every weight file (never a full hash of gigabytes)."""
    path = Path(pixtral.path) if pixtral.path is not None else None
    key = str(path.resolve()) if path is not None else f"id:{id(pixtral)}"
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    if path is not None and path.is_dir():
        spm = sorted(f.name for f in path.glob("*.model.v*"))  # Pixtral-Large's SentencePiece tokenizer
        for name in ("config.json", "tekken.json", *spm, "model.safetensors.index.json"):
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


def image_source(part: Any) -> Any:
    """An image part's image: a PIL image, a path or a URL (None for a part that is not an image)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in ("image", "image_url"):
        return None
    source = part.get("image") if kind == "image" else part.get("image_url")
    return source.get("url") if isinstance(source, dict) else source


def _is_data_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith("data:")


def _data_url(source: Any) -> tuple[str, str | None]:
    """(`source`'s image as a data: URL, the name it was known by). A local file's bytes go in as they are
    (cheap, and they decode to the same pixels); a PIL image or a download as a lossless PNG of its RGB."""
    from PIL import Image

    from .images import _read_path, describe_source, load_image

    if isinstance(source, (str, Path)) and not str(source).startswith(("data:", "http://", "https://")):
        source = str(source)
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path)) if source.startswith("file://") else None
        name = str(path) if path else describe_source(source)
        data = _read_path(path or Path(source), name)
        try:
            mime = Image.open(io.BytesIO(data)).get_format_mimetype()  # reads the header only
        except Exception:
            load_image(source)  # says in one sentence what is wrong with it
            raise
        return f"data:{mime or 'image/png'};base64," + base64.b64encode(data).decode("ascii"), name
    image, name = load_image(source)
    return _png_data_url(image), (name if isinstance(source, str) else None)


def jsonable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every image as a data: URL (read once more here from its path or URL, so that
    loading the chat never has to read anything else)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                source = image_source(p)
                if source is not None and not _is_data_url(source):
                    url, name = _data_url(source)
                    name = p.get("name") or name
                    p = {"type": "image_url", "image_url": {"url": url}, **({"name": name} if name else {})}
                parts.append(p)
            m = {**m, "content": parts}
        out.append(m)
    return out


def check_images(messages: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """PromptError unless every image of a saved chat's messages is a data: URL (nothing to open or fetch)."""
    from .images import describe_source

    for i, m in enumerate(messages, 1):
        content = m.get("content") if isinstance(m, dict) else None
        for p in content if isinstance(content, list) else []:
            source = image_source(p)
            if source is not None and not _is_data_url(source):
                raise PromptError(
                    f"{path} cannot be loaded: message {i} has an image at {describe_source(source)[:80]!r}, "
                    "and a saved chat may hold its images only as data: URLs."
                )


def tokens_hash(tokens: list[int], digests: list[str]) -> str:
    """What ties a file's caches to the tokens and images they were computed from."""
    return hashlib.sha256(json.dumps([FORMAT, tokens, digests]).encode()).hexdigest()


def resolve(path: str | os.PathLike) -> Path:
    """The file a chat saved as `path` lives in: like mlx's `save_safetensors`, `.safetensors` is appended
    when the name lacks it (`save` and `load` both go through here, so any name round-trips)."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


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
    """Write the caches and `meta` atomically (a temporary file renamed over `path`); return the file written
    (`path`, with `.safetensors` appended if it lacks it)."""
    from mlx_lm.models.cache import save_prompt_cache

    path = resolve(path)
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

    path = resolve(path)
    if not path.is_file():
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
    path = resolve(path)
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
    tokens, digests = meta.get("tokens"), meta.get("image_digests")
    if not isinstance(tokens, list) or not all(type(x) is int for x in tokens):
        return None, "its tokens are not a list of token ids"
    if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
        return None, "its image digests are not a list of strings"
    if meta.get("tokens_sha256") != tokens_hash(tokens, digests):
        return None, "its tokens or image digests were changed after its caches were saved"
    args = pixtral.args
    if len(digests) != len(image_starts(tokens, args.image_token_id, args.image_break_token_id)):
        return None, "its image digests do not match its tokens"
    try:
        layers = load_prompt_cache(str(path))
    except Exception as e:
        return None, f"its caches cannot be read ({type(e).__name__})"
    t = args.text
    kind = KVCache if kv_bits is None else QuantizedKVCache
    if not isinstance(layers, list) or len(layers) != t.num_hidden_layers:
        return None, "its caches do not match the model's layers"
    width = t.head_dim if kv_bits is None else t.head_dim * kv_bits // 32
    for c in layers:
        if type(c) is not kind or c.offset != len(tokens):
            return None, "its caches do not match its tokens"
        keys = c.keys if kv_bits is None else (c.keys[0] if c.keys else None)
        if tokens and (keys is None or tuple(keys.shape) != (1, t.num_key_value_heads, len(tokens), width)):
            return None, "its caches do not have the model's shapes"
    return (layers, meta), ""
