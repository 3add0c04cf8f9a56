"""Build the optional C++ extension `pixtral_mlx._qmv` (the CPU quantized matvec) on Linux.

Everything else is declared in pyproject.toml. The extension is an MLX custom primitive compiled
with CMake against the `mlx` and `nanobind` that pyproject.toml's build requirements pin to the
versions `mlx.core` itself was built with (a C++ ABI: see docs/CPU.md). It is built
on Linux only, never on macOS (Metal does the work there). If it cannot be built the package still
installs, with a warning; `pixtral_mlx.cpu_kernel` then reports it missing and decode uses
`mx.quantized_matmul`. Set PIXTRAL_MLX_BUILD_QMV=0 to skip it.
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
    def __init__(self, name: str, sourcedir: Path) -> None:
        # optional: setuptools then skips copying it into the source tree (editable installs) when absent.
        super().__init__(name, sources=[], optional=True)
        self.sourcedir = str(sourcedir)


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
            _warn(
                f"could not build the C++ CPU kernel {ext.name} ({e}). pixtral-mlx works without it, "
                "but CPU decode is much slower (mx.quantized_matmul). `pixtral-mlx ... --verbose` says "
                "which kernel is in use."
            )

    def _cmake(self, ext: CMakeExtension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found")
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
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
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DQMV_OUTPUT_DIR={out_dir}",
        ]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], check=True)
        print(f"pixtral-mlx: built {ext.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def get_outputs(self) -> list[str]:
        return [o for o in super().get_outputs() if Path(o).exists()]


def ext_modules() -> list[Extension]:
    if platform.system() != "Linux" or os.environ.get("PIXTRAL_MLX_BUILD_QMV", "1") in ("0", "off", "no"):
        return []
    return [CMakeExtension("pixtral_mlx._qmv", ROOT / "csrc" / "qmv")]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalCMakeBuild})
