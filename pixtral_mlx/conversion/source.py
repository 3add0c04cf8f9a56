"""Find, check and read a source checkpoint, one tensor (or a slice of rows) at a time.

Two layouts are read: Mistral's official one (`consolidated.safetensors` + `params.json`) and the
Hugging Face one (`config.json` + `model*.safetensors`), for each model family: Pixtral-12B (LLaVA) and Mistral3
(Mistral Small 3.x, Ministral 3), told apart by the config (`family_args`). FP8 tensors (`F8_E4M3`) are decoded to
float32 as they are read; their scales are applied by `stream`. The safetensors headers are parsed
here rather than by `safetensors.safe_open`, because its numpy backend has no bfloat16 and the real
source is one 25 GB file that must never be loaded whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from pixtral_mlx import hub
from pixtral_mlx.conversion import fp8
from pixtral_mlx.errors import ConversionError, PixtralError
from pixtral_mlx.hub import is_repo_id
from pixtral_mlx.models.mistral3.args import Mistral3Args
from pixtral_mlx.models.pixtral.args import PixtralArgs
from pixtral_mlx.prompt import tokenizer_file

__all__ = ["Source", "TensorInfo", "download", "is_repo_id", "open_source", "read_header", "read_json"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HF_FILES = hub.HF_FILES
# safetensors dtype -> (numpy dtype to read the bytes as, mlx dtype to view them as)
DTYPES: dict[str, tuple[Any, mx.Dtype]] = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    fp8.DTYPE: (np.uint8, mx.float32),  # decoded through fp8.TABLE, exactly
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name: "BF16", "F16", "F32" or "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Source:
    path: Path
    format: str  # "official" or "hf"
    args: Any  # the family's args: PixtralArgs or Mistral3Args
    tensors: dict[str, TensorInfo]  # in file and offset order
    tokenizer: Path | None  # tekken.json or a SentencePiece *.model.v7m1 (prompt.tokenizer_file), if it has one
    fp8_block: tuple[int, int] | None = None  # the tile of FP8 block scales (config.json's weight_block_size)
    _handles: dict[Path, BinaryIO] = field(default_factory=dict, repr=False)

    def read(self, name: str, rows: slice | None = None) -> mx.array:
        """One tensor, or rows [start, stop) of it, as an mx.array in the source dtype."""
        info = self.tensors[name]
        np_dtype, mx_dtype = DTYPES[info.dtype]
        shape = list(info.shape)
        start = info.start
        if rows is not None:
            row_bytes = info.nbytes // max(shape[0], 1)
            start += rows.start * row_bytes
            shape[0] = rows.stop - rows.start
        buf = np.empty(shape, dtype=np_dtype)
        if info.file not in self._handles:  # one handle per file, closed by close()
            self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115
        f = self._handles[info.file]
        f.seek(start)
        if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
            raise ConversionError(f"{info.file} ended while reading {name!r}: the file is truncated")
        if info.dtype == fp8.DTYPE:
            return fp8.decode(buf)
        return mx.array(buf).view(mx_dtype)

    @property
    def weights(self) -> Any:
        """The family's weight map module (`target`, `transform`, `expected_shapes`)."""
        from importlib import import_module

        family = "mistral3" if isinstance(self.args, Mistral3Args) else "pixtral"
        return import_module(f"pixtral_mlx.models.{family}.weights")

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def download(repo_id: str) -> Path:
    """Fetch only the files a conversion needs from the Hub (or its cache) and return the folder."""
    names = hub.repo_files(repo_id, ConversionError)
    # one layout, the one `load` takes from the same repo (the HF one when both are there): one copy in the cache
    return hub.download(repo_id, hub.layout_files(names, HF_FILES), error=ConversionError)


def open_source(path: Path) -> Source:
    """Check a local checkpoint folder (format, config, headers) and return its tensor index."""
    if not path.exists():
        raise ConversionError(f"source {path} does not exist: pass a checkpoint folder or a Hugging Face repo id")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        raise ConversionError(f"source {path} is a file: pass the folder that holds the checkpoint")
    consolidated = sorted(path.glob("consolidated*.safetensors"))
    if consolidated or ((path / "params.json").exists() and not (path / "config.json").exists()):
        fmt, config_file, files = "official", path / "params.json", consolidated
    elif (path / "config.json").exists() or list(path.glob("model*.safetensors")):
        fmt, config_file, files = "hf", path / "config.json", _hf_files(path)
    else:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(pickles[0])
        raise ConversionError(
            f"{path} is not a Pixtral checkpoint: expected consolidated.safetensors + params.json "
            "(Mistral) or config.json + model*.safetensors (Hugging Face)"
        )
    if not files:
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(pickles[0])
        wanted = "consolidated.safetensors" if fmt == "official" else "model*.safetensors"
        raise ConversionError(f"{path} has {config_file.name} but no {wanted}")
    if not config_file.exists():
        raise ConversionError(f"{path} has {files[0].name} but no {config_file.name}, which describes the model")
    config = read_json(config_file)
    try:
        args = family_args(fmt, config)
    except PixtralError as e:
        what = "Mistral3 (Mistral Small 3.x, Ministral 3)" if is_mistral3(fmt, config) else "Pixtral"
        raise ConversionError(f"{config_file} does not describe a {what} model: {e}") from e
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise ConversionError(f"tensor {name!r} is in both {tensors[name].file.name} and {file.name}")
            tensors[name] = info
    try:
        block = fp8.block_size(config) if fmt == "hf" else None
    except PixtralError as e:
        raise ConversionError(f"{config_file}: {e}") from e
    return Source(path, fmt, args, tensors, tokenizer_file(path), block)


def is_mistral3(fmt: str, config: dict[str, Any]) -> bool:
    """Whether a params.json (a patch merger or the norm before the adapter, FAMILY.md §6.1) or a config.json
    (`model_type: mistral3`) describes a Mistral3-architecture model rather than Pixtral-12B."""
    if fmt != "official":
        return config.get("model_type") == "mistral3"
    venc = config.get("vision_encoder")
    if not isinstance(venc, dict):
        return False
    return (
        venc.get("mm_projector_id") == "patch_merge"
        or bool(venc.get("add_pre_mm_projector_layer_norm"))
        or venc.get("spatial_merge_size", 1) not in (1, None)
    )


def family_args(fmt: str, config: dict[str, Any]) -> PixtralArgs | Mistral3Args:
    """The family's args read from its config file (params.json when `fmt` is official, else config.json)."""
    cls: Any = Mistral3Args if is_mistral3(fmt, config) else PixtralArgs
    return cls.from_params(config) if fmt == "official" else cls.from_hf_config(config)


def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return sorted(path.glob("model*.safetensors"))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map: the index file is corrupt")
    files = [path / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.exists():
            raise ConversionError(f"{index.name} lists {f.name}, which is missing from {path}")
    return files


def _pickle_error(file: Path) -> ConversionError:
    return ConversionError(
        f"refusing to read pickle checkpoint {file}: only safetensors is supported, because "
        "pickle files can run code; use the repo's .safetensors files instead"
    )


def read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{file} is not valid JSON ({e}): the file is corrupt") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{file} does not hold a JSON object: the file is corrupt")
    return data


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header: 8-byte little-endian length, then JSON."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ConversionError(f"{file} is not a valid safetensors file: its header is truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{file} has a corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{file} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{file} has a corrupt safetensors header entry for {name!r}") from e
        if dtype not in DTYPES:
            raise ConversionError(
                f"tensor {name!r} in {file} has dtype {dtype}; only BF16, F16, F32 and F8_E4M3 are supported"
            )
        if end - begin != math.prod(shape) * np.dtype(DTYPES[dtype][0]).itemsize or begin < 0:
            raise ConversionError(f"{file} has a corrupt safetensors header: {name!r} has wrong data offsets")
        if data_start + end > size:
            raise ConversionError(f"{file} is truncated: tensor {name!r} ends beyond the end of the file")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin, data_start + end)
    return dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
