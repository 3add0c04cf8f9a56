"""Runtime decisions for the device we run on, in one place.

- BLAS: the Linux `mlx[cpu]` wheel links the reference (netlib) BLAS (~2 GFLOP/s). An optimized
  BLAS loaded into the global symbol scope *before* mlx is imported takes over its GEMM calls
  (~90x faster here). `preload_blas()` runs when `pixtral_mlx` is imported; it never fails.
- dtype: on the CPU backend compute in float32 (bf16 matmuls skip BLAS, 4-bit matmuls with bf16
  activations are ~10x slower); on Metal/CUDA keep the checkpoint's half precision.
- Quantized layers on CPU: prefill (many tokens) dequantizes the layer and uses the BLAS GEMM;
  decode (one token) keeps the quantized kernel, which reads 4x fewer bytes.

The measurements behind these choices, the CPU decode kernel and its settings: docs/CPU.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

_BLAS_CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/blis-pthread/libblis.so.4",
]

BLAS: str | None = None  # path of the optimized BLAS in use, if any
BLAS_NOTE = "bundled BLAS"


def preload_blas() -> str | None:
    """Load an optimized BLAS into the global namespace before mlx; return its path or None."""
    global BLAS, BLAS_NOTE
    if BLAS is not None or platform.system() != "Linux":
        return BLAS
    setting = os.environ.get("PIXTRAL_MLX_BLAS", "")
    if setting.lower() in ("0", "off", "none"):
        BLAS_NOTE = "bundled BLAS (PIXTRAL_MLX_BLAS=off)"
        return None
    if "mlx.core" in sys.modules:
        BLAS_NOTE = "bundled BLAS (mlx was imported before pixtral_mlx)"
        return None
    arch = platform.machine()
    candidates = [setting] if setting else [c.format(arch=arch) for c in _BLAS_CANDIDATES]
    found = ctypes.util.find_library("openblas")
    if found and not setting:
        candidates.append(found)
    for path in candidates:
        if path and (Path(path).exists() or not path.startswith("/")):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            BLAS, BLAS_NOTE = path, f"optimized BLAS {path}"
            return path
    BLAS_NOTE = "bundled reference BLAS (install libopenblas0-pthread for ~90x faster CPU matmuls)"
    return None


def private_tmpdir() -> str | None:
    """Give MLX a compile cache this user owns; return its path (None: left as it was).

    MLX's CPU backend compiles fused kernels with the system compiler into `$TMPDIR/mlx/<version>`
    (C++ `temp_directory_path()`); on a machine with several users, `/tmp/mlx` belongs to whoever ran
    first, and everyone else's run dies with "Failed to compile function". Unless the user set TMPDIR
    themselves, point it at a folder of this user's own (mode 0700, checked to be theirs) before MLX
    is loaded. Python's own `tempfile` keeps the system folder (it is fixed first).
    """
    import tempfile

    if os.name != "posix" or os.environ.get("TMPDIR") or "mlx.core" in sys.modules:
        return None
    system = tempfile.gettempdir()  # fixed now: Python's temporary files stay where they were
    folder = Path(system) / f"pixtral-mlx-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()  # not a link someone else planted, and ours alone
        if not Path(folder).is_dir() or folder.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
    except OSError:
        return None
    os.environ["TMPDIR"] = str(folder)
    return str(folder)


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu or not mx.is_available(mx.gpu)


def compute_dtype(weight_dtype: Any) -> Any:
    """float32 on the CPU backend; the checkpoint's float dtype elsewhere."""
    import mlx.core as mx

    if on_cpu():
        return mx.float32
    return weight_dtype if weight_dtype in (mx.float16, mx.bfloat16) else mx.float32


def device_name() -> str:
    import mlx.core as mx

    if on_cpu():
        from . import cpu_kernel

        return f"cpu ({BLAS_NOTE}; decode: {cpu_kernel.describe()})"
    try:
        info = mx.device_info()
        return f"gpu ({info.get('device_name', info.get('architecture', 'gpu'))})"
    except Exception:
        return "gpu"


def prepare(model: Any) -> None:
    """Cast floating weights to the compute dtype; on the CPU backend, swap in the CPU classes (`cpu.py`).

    With the CPU kernel, the quantized layers keep their scales and biases in the checkpoint's dtype
    (bf16): decode reads them on every token, and the kernel (`cpu_kernel`) converts them exactly as it
    goes, so float32 copies would only add bytes (7.24 instead of 6.51 GB per token for Pixtral-12B).
    Without it they are cast like the rest (the fallback would otherwise cast them on every call).
    """
    import mlx.nn as nn

    from . import cpu_kernel

    weight_dtype = model.language_model.model.norm.weight.dtype
    cpu = on_cpu()
    stored = []
    if cpu and cpu_kernel.available():
        for _, module in model.named_modules():
            if isinstance(module, nn.QuantizedLinear):
                stored.append((module, {k: module[k] for k in ("scales", "biases") if k in module}))
    model.set_dtype(compute_dtype(weight_dtype))
    if not cpu:
        return
    from .cpu import REPLACEMENTS

    for module, params in stored:
        module.update(params)
    for _, module in model.named_modules():
        if type(module) in REPLACEMENTS:
            module.__class__ = REPLACEMENTS[type(module)]


def place_weights(model: Any) -> str:
    """On Linux with the CPU kernel's extension: back the evaluated weights with huge pages.

    Decode streams every weight from memory once per token, and with 4 KiB pages TLB misses hold the
    stream back (measured on this project's 2-core Xeon VM: 22 GB/s on 4 KiB pages, 28-30 GB/s on
    2 MiB pages, decode ~1.2x faster). It costs time once, here (about 0.5-3 s per GB, most of it in
    a VM's hypervisor). `PIXTRAL_MLX_HUGE_PAGES=off` skips it. Returns a phrase for --verbose.
    """
    if not on_cpu():
        return ""
    from mlx.utils import tree_flatten

    from . import cpu_kernel

    return cpu_kernel.huge_pages([v for _, v in tree_flatten(model.parameters())])
