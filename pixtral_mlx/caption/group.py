"""Several processes under `mlx.launch` (MLX distributed, e.g. the ring backend): rank 0 lists the work,
every rank takes every size-th image of it, and after each batch the records travel to rank 0 through
`all_gather`, which writes them, in sorted order: one output, resumable as a single run is."""

from __future__ import annotations

import json
from typing import Any


class Group:
    """MLX distributed (`mlx.launch`): rank, size and an all-gather of bytes; one process: size 1."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's JSON-able `payload`, in rank order (a collective: every rank must call it)."""
        if self.size == 1:
            return [payload]
        import mlx.core as mx
        import numpy as np

        data = json.dumps(payload).encode()
        sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        sizes = sizes.tolist()
        buf = np.zeros(max(max(sizes), 1), dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        every = mx.distributed.all_gather(mx.array(buf), group=self.group, stream=mx.cpu)
        rows = np.array(every).reshape(self.size, -1)
        return [json.loads(rows[r, : sizes[r]].tobytes()) for r in range(self.size)]
