"""Build the optional native parts of pixtral_mlx on Linux: the CPU decode kernel and the BLAS shim.

Everything else is declared in pyproject.toml. Both are built with CMake; neither is built on macOS
(Metal does the work there), and if one cannot be built the package still installs, with a warning.

- `pixtral_mlx._qmv` (csrc/qmv): the CPU quantized matvec, an MLX custom primitive compiled against
  the `mlx` and `nanobind` that pyproject.toml's build requirements pin to the versions `mlx.core`
  itself was built with (a C++ ABI: see docs/CPU.md). Missing: `pixtral_mlx.cpu_kernel` reports it
  and decode uses `mx.quantized_matmul`. Set PIXTRAL_MLX_BUILD_QMV=0 to skip it.
- `pixtral_mlx._blas_shim` (csrc/blas_shim): a few lines of C that give MLX's `cblas_*gemm` calls the
  OpenBLAS of the `scipy-openblas32` wheel (a Linux dependency). Missing: `pixtral_mlx.backend` falls
  back to a system OpenBLAS, else MLX's bundled reference BLAS.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path, without: str, variable: str, named: bool = False) -> None:
        # optional: setuptools then skips copying it into the source tree (editable installs) when absent.
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = str(sourcedir)
        self.without = without  # what a failed build costs, for the warning
        self.variable = variable  # the CMake variables' prefix: <variable>_OUTPUT_DIR, <variable>_FILE_NAME
        self.named = named  # pass CMake the file name setuptools expects (nanobind names _qmv's itself)


def _warn(msg: str) -> None:
    line = "=" * 78
    print(f"\n{line}\nWARNING (pixtral-mlx): {msg}\n{line}\n", file=sys.stderr, flush=True)


class OptionalCMakeBuild(build_ext):
    """Builds CMake extensions; a failure warns instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._cmake(ext)
        except Exception as e:  # noqa: BLE001 - any failure: install without the extension
            _warn(f"could not build {ext.name} ({e}). pixtral-mlx works without it, but {ext.without}")

    def _cmake(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        configure = [
            cmake,
            "-S",
            ext.sourcedir,
            "-B",
            str(build_dir),
            "--no-warn-unused-cli",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-D{ext.variable}_OUTPUT_DIR={out_dir}",
        ]
        if ext.named:
            configure.append(f"-D{ext.variable}_FILE_NAME={target.name}")
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], check=True)
        print(f"pixtral-mlx: built {ext.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def get_outputs(self) -> list[str]:
        return [o for o in super().get_outputs() if Path(o).exists()]


def ext_modules() -> list[Extension]:
    if platform.system() != "Linux":
        return []
    shim = CMakeExtension(
        "pixtral_mlx._blas_shim",
        ROOT / "csrc" / "blas_shim",
        "without a system OpenBLAS CPU matrix products are much slower (MLX's reference BLAS). "
        "`pixtral-mlx doctor` says which BLAS is in use.",
        "SHIM",
        named=True,
    )
    qmv = CMakeExtension(
        "pixtral_mlx._qmv",
        ROOT / "csrc" / "qmv",
        "CPU decode is much slower (mx.quantized_matmul). `pixtral-mlx doctor` says which kernel is in use.",
        "QMV",
    )
    if os.environ.get("PIXTRAL_MLX_BUILD_QMV", "1") in ("0", "off", "no"):
        return [shim]
    return [shim, qmv]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalCMakeBuild})
