"""Runtime decisions for the device we run on, in one place.

- BLAS: the Linux `mlx[cpu]` wheel links the reference (netlib) BLAS (~2 GFLOP/s). An optimized
  BLAS loaded into the global symbol scope *before* mlx is imported takes over its GEMM calls
  (~40x faster here). `preload_blas()` runs when `pixtral_mlx` is imported; it never fails. It
  takes PIXTRAL_MLX_BLAS (a path, or `off`), else the OpenBLAS of the `scipy-openblas32` wheel
  (a Linux dependency) through `pixtral_mlx._blas_shim`, else a system OpenBLAS/BLIS.
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
_OFF = ("0", "off", "none")

BLAS: str | None = None  # path of the optimized BLAS in use, if any (for the wheel: its OpenBLAS)
BLAS_SHIM: str | None = None  # the shim MLX's cblas_*gemm calls go through, when BLAS is the wheel's
BLAS_SOURCE = "bundled"  # where BLAS came from: "env" (PIXTRAL_MLX_BLAS), "wheel", "system" or "bundled"
BLAS_NOTE = "bundled BLAS"  # the phrase --verbose and --dry-run print
_blas_lib: ctypes.CDLL | None = None


def preload_blas() -> str | None:
    """Load an optimized BLAS into the global namespace before mlx; return its path or None.

    Order: PIXTRAL_MLX_BLAS (a path, or `off` for the bundled one), the scipy-openblas32 wheel's
    OpenBLAS with the shim that gives it MLX's unprefixed names, a system OpenBLAS or BLIS.
    """
    global BLAS_NOTE
    if BLAS is not None or platform.system() != "Linux":
        return BLAS
    setting = os.environ.get("PIXTRAL_MLX_BLAS", "").strip()
    if setting.lower() in _OFF:
        BLAS_NOTE = "bundled reference BLAS (PIXTRAL_MLX_BLAS=off)"
        return None
    if "mlx.core" in sys.modules:
        BLAS_NOTE = "bundled reference BLAS (mlx was imported before pixtral_mlx)"
        return None
    if setting:
        if _use(setting, "env"):
            return BLAS
        BLAS_NOTE = f"bundled reference BLAS (PIXTRAL_MLX_BLAS={setting} could not be loaded)"
        return None
    wheel = wheel_blas()
    if wheel is not None and _use(wheel[0], "wheel", shim=wheel[1]):
        return BLAS
    arch = platform.machine()
    candidates = [c.format(arch=arch) for c in _BLAS_CANDIDATES]
    found = ctypes.util.find_library("openblas")
    if found:
        candidates.append(found)
    for path in candidates:
        if (Path(path).exists() or not path.startswith("/")) and _use(path, "system"):
            return BLAS
    BLAS_NOTE = "bundled reference BLAS (reinstall pixtral-mlx or install OpenBLAS for ~40x faster CPU matmuls)"
    return None


def wheel_blas() -> tuple[str, str] | None:
    """(the scipy-openblas32 wheel's OpenBLAS, our shim) when both are installed; found, not loaded."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("scipy_openblas32")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = sorted(Path(next(iter(spec.submodule_search_locations)), "lib").glob("libscipy_openblas*.so"))
    shims = sorted(Path(__file__).parent.glob("_blas_shim*.so"))
    return (str(libs[0]), str(shims[0])) if libs and shims else None


def _use(path: str, source: str, shim: str | None = None) -> bool:
    """Load `path` (then `shim`) into the global symbol scope; on success record it as the BLAS in use."""
    global BLAS, BLAS_SHIM, BLAS_SOURCE, BLAS_NOTE, _blas_lib
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        if shim is not None:
            ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    BLAS, BLAS_SHIM, BLAS_SOURCE, _blas_lib = path, shim, source, lib
    config = openblas_config()
    name = " ".join(config.split()[:2]) if config.startswith("OpenBLAS") else "optimized BLAS"
    where = {"env": f"PIXTRAL_MLX_BLAS={path}", "wheel": "scipy-openblas32 wheel, through the BLAS shim"}
    BLAS_NOTE = f"{name} ({where.get(source, path)})"
    return True


def _openblas_function(name: str, restype: Any) -> Any:
    """The loaded OpenBLAS's `openblas_<name>` (`scipy_openblas_<name>` in the wheel), or None."""
    for prefix in ("scipy_openblas_", "openblas_"):
        try:
            function = getattr(_blas_lib, prefix + name)
        except AttributeError:
            continue
        function.restype = restype
        return function
    return None


def openblas_config() -> str:
    """OpenBLAS's own description of the build in use (version, kernel, thread limit); "" when not OpenBLAS."""
    function = _openblas_function("get_config", ctypes.c_char_p)
    core = _openblas_function("get_corename", ctypes.c_char_p)
    if function is None:
        return ""
    text = (function() or b"").decode(errors="replace").strip()
    name = (core() or b"").decode(errors="replace").strip() if core is not None else ""
    return f"{text} (core: {name})" if name and name not in text else text


def blas_threads() -> int | None:
    """The threads the loaded OpenBLAS uses for one GEMM (None when that is not known)."""
    function = _openblas_function("get_num_threads", ctypes.c_int)
    return int(function()) if function is not None else None


def gemm_library() -> str | None:
    """The file whose `cblas_sgemm` MLX's CPU matmuls reach in this process: the first definition in the
    global symbol scope, else the one libmlx's own dependencies (the bundled reference BLAS) provide.
    Linux only; loads mlx when it is not loaded yet (None when that or the lookup fails)."""
    if platform.system() != "Linux":
        return None
    try:
        import mlx.core  # noqa: F401 - libmlx must be loaded to ask it
    except ImportError:
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]  # fmt: skip

    libc = ctypes.CDLL(None)
    libc.dlsym.restype, libc.dlsym.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    address = libc.dlsym(None, b"cblas_sgemm")  # RTLD_DEFAULT: the global scope, searched first
    if not address:
        libmlx = [p for p in _mapped_files() if Path(p).name == "libmlx.so"]
        if not libmlx:
            return None
        handle = ctypes.CDLL(libmlx[0], mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        address = libc.dlsym(ctypes.c_void_p(handle._handle), b"cblas_sgemm")
    found = DlInfo()
    if not address or not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(found)) or not found.fname:
        return None
    return os.path.realpath(found.fname.decode())


def _mapped_files() -> list[str]:
    """The shared objects mapped into this process (Linux /proc)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6 and ".so" in line})


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


def _decoder_float_dtype(model: Any) -> str | None:
    """The dtype name of the decoder's float projection weights where its first layer has no quantized one (an
    unquantized checkpoint: decode runs on the float-weight matvec), else None."""
    import mlx.nn as nn

    lm = getattr(model, "language_model", model)
    layers = getattr(getattr(lm, "model", lm), "layers", None)
    part = layers[0] if layers else lm
    linears = [m for _, m in part.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    if not linears or any(isinstance(m, nn.QuantizedLinear) for m in linears):
        return None
    return str(linears[0].weight.dtype).removeprefix("mlx.core.")


def device_name(model: Any = None) -> str:
    """The device in words for --verbose and the memory plan; on the CPU, the BLAS and the decode kernel that
    `model`'s weights take (the 4-bit kernel where it is not given)."""
    import mlx.core as mx

    if on_cpu():
        from . import cpu_kernel

        threads = blas_threads()
        blas = f"{BLAS_NOTE}, {threads} thread{'s' if threads != 1 else ''}" if threads else BLAS_NOTE
        dtype = _decoder_float_dtype(model) if model is not None else None
        decode = cpu_kernel.describe_float(dtype) if dtype else cpu_kernel.describe()
        return f"cpu (BLAS: {blas}; decode: {decode})"
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
    Without it they are cast like the rest (the fallback would otherwise cast them on every call). With it, the
    float layers (`nn.Linear`, `nn.Embedding`) of a bfloat16/float16 checkpoint keep their weights as they are:
    `cpu.DenseLinear` reads them in 16 bits for decode and widens them for a prompt chunk's GEMM, the same values as
    float32 copies in half the memory (Pixtral-12B in bf16: 25 instead of 51 GB) and half the bytes per token.
    Where `cpu_kernel.interleaves` a layer, its weights are then stored interleaved
    (`cpu.InterleavedQuantizedLinear`), one layer at a time.
    """
    import mlx.core as mx
    import mlx.nn as nn

    from . import cpu_kernel

    weight_dtype = model.language_model.model.norm.weight.dtype
    cpu = on_cpu()
    stored = []
    if cpu and cpu_kernel.available():
        half = (mx.bfloat16, mx.float16) if cpu_kernel.dense_available() else ()  # float weights kept in 16 bits
        for _, module in model.named_modules():
            if isinstance(module, nn.QuantizedLinear):
                stored.append((module, {k: module[k] for k in ("scales", "biases") if k in module}))
            elif type(module) in (nn.Linear, nn.Embedding) and module.weight.dtype in half:
                stored.append((module, {"weight": module.weight}))
    model.set_dtype(compute_dtype(weight_dtype))
    if not cpu:
        return
    from .cpu import install

    for module, params in stored:
        module.update(params)
    stored.clear()  # (the interleaving in `install` frees each original as it goes)
    install(model)


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
