"""`pixtral-mlx doctor`: what this machine runs pixtral-mlx with, and how fast its matrix products are.

Platform and CPU (with the SIMD flags the decode kernel can use), Python, MLX and its default device, the BLAS
MLX's CPU matmuls reach (the file `cblas_sgemm` resolves to in this process, where it came from, the OpenBLAS
build and its threads), a measured float32 GEMM rate (about a second; `--no-measure` skips it), the decode
kernel and the prefill kernels, the memory limit setting and the model cache folder. Offline; nothing is loaded
but MLX itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from pixtral_mlx.cli import error

SOURCES = {
    "env": "PIXTRAL_MLX_BLAS",
    "wheel": "scipy-openblas32 wheel, through pixtral_mlx._blas_shim",
    "system": "system library",
    "bundled": "MLX's bundled reference BLAS",
}
SIMD_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "neon",
    "asimd",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx doctor",
        description="Say what pixtral-mlx runs with on this machine: CPU, MLX and its device, the BLAS in use "
        "(and a measured float32 GEMM rate), the CPU decode and prefill kernels, the memory limit and the model cache.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--no-measure", action="store_true", help="skip the ~1 s GEMM measurement")
    return p


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, its logical cores (those this process may use) and the SIMD flags that matter."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            name = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or name
            )
        except (OSError, subprocess.SubprocessError):
            pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": name, "cores": cores, "simd": [f for f in SIMD_FLAGS if f in flags]}


def measure_gemm(budget_s: float = 1.0) -> dict[str, Any]:
    """float32 GEMM GFLOP/s through `mx.matmul` on the CPU: square sizes double from 256 until one product takes
    50 ms (at most 2048), then the best of repeats for about `budget_s` seconds (the machine may be shared)."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        n = 256
        while True:
            a, b = mx.random.normal((n, n), key=mx.random.key(0)), mx.random.normal((n, n), key=mx.random.key(1))
            mx.eval(a, b, a @ b)  # the first call pays for thread start-up
            tic = time.perf_counter()
            mx.eval(a @ b)
            best = time.perf_counter() - tic
            if best > 0.05 or n >= 2048:
                break
            n *= 2
        end = time.perf_counter() + budget_s
        while time.perf_counter() < end:
            tic = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - tic)
    return {"gflops": round(2 * n**3 / best / 1e9, 1), "shape": f"{n}x{n}x{n}"}


def report(measure: bool = True) -> dict[str, Any]:
    """Everything `doctor` prints, as one dict."""
    import mlx.core as mx

    from pixtral_mlx import backend, cpu_kernel
    from pixtral_mlx._version import __version__
    from pixtral_mlx.cli.models import hf_cache_dir
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.loading import cache_root
    from pixtral_mlx.memory import LIMIT_ENV, limit_setting

    try:
        limit = limit_setting()
        memory = "not set (the machine's memory)" if limit is None else "off" if limit == 0 else f"{limit / 1e9:g} GB"
    except PixtralError as e:
        memory = f"invalid: {e}"
    out: dict[str, Any] = {
        "pixtral_mlx": __version__,
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "mlx": {"version": mx.__version__, "default_device": str(mx.default_device())},
        "blas": {
            "path": backend.BLAS,
            "source": backend.BLAS_SOURCE,
            "source_text": SOURCES.get(backend.BLAS_SOURCE, backend.BLAS_SOURCE),
            "shim": backend.BLAS_SHIM,
            "cblas_sgemm": backend.gemm_library(),
            "config": backend.openblas_config() or None,
            "threads": backend.blas_threads(),
            "note": backend.BLAS_NOTE,
        },
        "decode_kernel": {
            "name": cpu_kernel.extension().isa() if cpu_kernel.available() else None,
            "describe": cpu_kernel.describe(),
            "interleaved": cpu_kernel.interleaving(),  # 4-bit weights stored 8 rows per load (cpu_kernel.interleave)
        },
        "prefill_kernels": {
            "name": cpu_kernel.extension().prefill_isa() if cpu_kernel.prefill_available() else None,
            "describe": cpu_kernel.describe_prefill(),
            "products_from_codes": cpu_kernel.gemm_isa() or None,  # 4-bit prompt products, int16 x (None: BLAS)
        },
        "float_weights": {  # unquantized layers: the matvec, 16-bit weights kept as stored (cpu.DenseLinear)
            "name": cpu_kernel.extension().dense_isa() if cpu_kernel.dense_available() else None,
            "describe": cpu_kernel.describe_dense(),
        },
        "memory_limit": {"variable": LIMIT_ENV, "setting": os.environ.get(LIMIT_ENV), "value": memory},
        "model_cache": {"converted": str(cache_root() / "models"), "hugging_face": str(hf_cache_dir())},
    }
    if measure:
        out["gemm"] = measure_gemm()
    return out


def render(r: dict[str, Any]) -> str:
    blas, cpu = r["blas"], r["cpu"]
    lines = [
        f"pixtral-mlx   {r['pixtral_mlx']}",
        f"platform      {r['platform']}",
        f"cpu           {cpu['model']}, {cpu['cores']} cores; SIMD: {', '.join(cpu['simd']) or 'none of ours'}",
        f"python        {r['python']}",
        f"mlx           {r['mlx']['version']}, default device {r['mlx']['default_device']}",
        f"blas          {blas['note']}",
        f"  source      {blas['source_text']}",
        f"  library     {blas['path'] or '-'}",
    ]
    if blas["shim"]:
        lines.append(f"  shim        {blas['shim']}")
    lines.append(f"  cblas_sgemm {blas['cblas_sgemm'] or 'unknown'}  (the file MLX's float32 matmuls call)")
    if blas["config"]:
        lines.append(f"  config      {blas['config']}")
    if blas["threads"]:
        lines.append(f"  threads     {blas['threads']}")
    if "gemm" in r:
        lines.append(f"  gemm        {r['gemm']['gflops']} GFLOP/s float32 ({r['gemm']['shape']}, best of ~1 s)")
    lines += [
        f"decode kernel {r['decode_kernel']['describe']}",
        f"prefill       {r['prefill_kernels']['describe']}",
        f"float weights {r['float_weights']['describe']}",
        f"memory limit  {r['memory_limit']['variable']}: {r['memory_limit']['value']}",
        f"model cache   {r['model_cache']['converted']} (converted); {r['model_cache']['hugging_face']} (Hugging Face)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r = report(measure=not args.no_measure)
    except ImportError as e:
        error(f"MLX cannot be loaded ({e}).")
        return 1
    print(json.dumps(r, indent=2) if args.json else render(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
