"""Write the MLX checkpoint's files: streamed safetensors shards, their index, and config.json.

All output names, dtypes and shapes are known before any data is read, so each shard's header is
written first and the tensor bytes are appended as they are produced; no shard is ever held in
memory. They are written into the temporary folder `output.atomic_folder` renames into place at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}
ST_DTYPE = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint32: "U32"}


@dataclass(frozen=True)
class Planned:
    """One output tensor, as it will appear in a shard header."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def plan_shards(tensors: list[Planned], max_bytes: int = MAX_SHARD_BYTES) -> list[list[Planned]]:
    """Fill shards in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def to_bytes(a: mx.array) -> np.ndarray:
    """A numpy view of the array's bytes (numpy has no bfloat16, so view those as uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


class ShardedWriter:
    """Appends planned tensors, in plan order, to their shard files."""

    def __init__(self, folder: Path, shards: list[list[Planned]]):
        self.folder = folder
        self.shards = shards
        self.order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self.next = 0
        self.file: BinaryIO | None = None
        self.shard = -1

    def write(self, name: str, chunks: Iterable[mx.array | np.ndarray]) -> None:
        """Write one tensor from a sequence of row blocks, already in the planned dtype."""
        shard, planned = self.order[self.next]
        assert planned.name == name, f"expected {planned.name}, got {name}"
        if shard != self.shard:
            self._open(shard)
        assert self.file is not None
        written = 0
        for chunk in chunks:
            data = to_bytes(chunk) if isinstance(chunk, mx.array) else chunk
            self.file.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            written += data.nbytes
        assert written == planned.nbytes, f"{name}: wrote {written} bytes, planned {planned.nbytes}"
        self.next += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        assert self.next == len(self.order), "not every planned tensor was written"

    def _open(self, i: int) -> None:
        if self.file is not None:
            self.file.close()
        self.shard = i
        self.file = open(self.folder / shard_name(i, len(self.shards)), "wb")  # noqa: SIM115
        self.file.write(header_bytes(self.shards[i]))

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def header_bytes(tensors: list[Planned]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the safetensors library does
    return len(raw).to_bytes(8, "little") + raw


def write_index(folder: Path, shards: list[list[Planned]]) -> None:
    weight_map = {t.name: shard_name(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    index = {
        "metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")


def write_config(folder: Path, config: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
