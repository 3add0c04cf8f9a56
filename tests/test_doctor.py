"""`pixtral-mlx doctor`: what it says is what the process actually runs with (BLAS, decode kernel, settings)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pixtral_mlx import backend, cpu_kernel
from pixtral_mlx.cli import doctor

MAIN = "import sys; from pixtral_mlx.cli import main; sys.exit(main())"
SETTINGS = ("PIXTRAL_MLX_BLAS", "PIXTRAL_MLX_MEMORY_LIMIT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
BACKEND = (
    "import json, pixtral_mlx; from pixtral_mlx import backend; "
    "print(json.dumps([backend.BLAS, backend.BLAS_SHIM, backend.BLAS_SOURCE, backend.gemm_library()]))"
)


def run(args: list[str], code: str = MAIN, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in SETTINGS} | env
    return subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("blas", [None, "off"])
def test_json_names_the_blas_backend_loaded(blas):
    env = {"PIXTRAL_MLX_BLAS": blas} if blas else {}
    done = run(["doctor", "--no-measure", "--json"], PIXTRAL_MLX_MEMORY_LIMIT="24", **env)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    loaded = json.loads(run([], BACKEND, **env).stdout)  # the same setup, asked directly
    assert [r["blas"][k] for k in ("path", "shim", "source", "cblas_sgemm")] == loaded
    if blas == "off":
        assert r["blas"]["source"] == "bundled" and r["blas"]["path"] is None
        assert r["blas"]["note"] == "bundled reference BLAS (PIXTRAL_MLX_BLAS=off)"
    elif platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64"):
        assert r["blas"]["source"] == "wheel"
        assert r["blas"]["config"].startswith("OpenBLAS ")
        assert r["blas"]["cblas_sgemm"] == os.path.realpath(r["blas"]["shim"])
    assert "gemm" not in r  # --no-measure
    assert r["memory_limit"] == {"variable": "PIXTRAL_MLX_MEMORY_LIMIT", "setting": "24", "value": "24 GB"}
    assert r["decode_kernel"]["name"] == (cpu_kernel.extension().isa() if cpu_kernel.available() else None)
    prefill = cpu_kernel.extension().prefill_isa() if cpu_kernel.prefill_available() else None
    assert r["prefill_kernels"]["name"] == prefill
    if prefill is not None:  # the decode kernel's family decides (csrc/qmv/prefill.cpp)
        isa = r["decode_kernel"]["name"]
        assert prefill == ("scalar" if isa == "scalar" else "avx512" if isa.startswith("avx512") else "avx2")
    codes = r["prefill_kernels"]["products_from_codes"]  # with an int16 decode kernel, of its family
    assert codes == (cpu_kernel.gemm_isa() or None)
    if codes is not None:
        assert codes == ("avx512vl-vnni" if r["decode_kernel"]["name"].startswith("avx512") else "avx2")
        assert f"4-bit products from the codes, int16 x ({codes})" in r["prefill_kernels"]["describe"]
    interleaved = r["decode_kernel"]["interleaved"]  # by default with the Zen 4 kernel, and never without codes
    assert interleaved == cpu_kernel.interleaving()
    assert interleaved == (codes is not None and r["decode_kernel"]["name"] == "avx512vl-vnni")
    assert ("4-bit weights interleaved" in r["decode_kernel"]["describe"]) == interleaved
    assert ("interleaved weights as decode-kernel passes" in r["prefill_kernels"]["describe"]) == interleaved
    dense = r["float_weights"]["name"]  # the decode kernel's family and vector width decide (csrc/qmv/dense.cpp)
    assert dense == (cpu_kernel.extension().dense_isa() if cpu_kernel.dense_available() else None)
    if dense is not None:
        isa = r["decode_kernel"]["name"]
        want = "avx512vl" if isa.startswith("avx512vl") else "avx512" if isa.startswith("avx512") else "avx2"
        assert dense == ("scalar" if isa == "scalar" else want)
        assert r["float_weights"]["describe"].startswith(f"qmv {dense} (")
    assert r["mlx"]["version"] == __import__("mlx.core").core.__version__


def test_text_names_blas_and_kernel(capsys):
    assert doctor.main(["--no-measure"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(" "))
    assert lines["blas"] == backend.BLAS_NOTE
    assert f"  library     {backend.BLAS or '-'}" in out.splitlines()
    assert lines["decode"] == f"kernel {cpu_kernel.describe()}"
    if cpu_kernel.available():
        assert lines["decode"].startswith(f"kernel qmv {cpu_kernel.extension().isa()}, ")
    assert lines["prefill"] == cpu_kernel.describe_prefill()
    assert lines["float"] == f"weights {cpu_kernel.describe_dense()}"
    assert "GFLOP/s" not in out  # --no-measure


def test_measure_gemm_reports_a_rate():
    r = doctor.measure_gemm(budget_s=0.05)
    n = int(r["shape"].split("x")[0])
    assert r["shape"] == f"{n}x{n}x{n}" and n in (256, 512, 1024, 2048)
    assert r["gflops"] > 0


def test_an_invalid_memory_setting_is_reported_not_raised():
    done = run(["doctor", "--no-measure", "--json"], PIXTRAL_MLX_MEMORY_LIMIT="lots")
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)["memory_limit"]["value"]
    assert value.startswith("invalid: PIXTRAL_MLX_MEMORY_LIMIT must be a number of GB")


def test_device_line_names_blas_and_kernel():
    """The device phrase `describe --verbose` prints and `--dry-run --json` carries names both."""
    line = backend.device_name()
    if not backend.on_cpu():
        pytest.skip("a GPU device line")
    assert line.startswith(f"cpu (BLAS: {backend.BLAS_NOTE}")
    assert line.endswith(f"; decode: {cpu_kernel.describe()})")
    if backend.BLAS_SOURCE == "wheel":
        assert f"(scipy-openblas32 wheel, through the BLAS shim), {backend.blas_threads()} thread" in line
    if cpu_kernel.available():
        assert f"decode: qmv {cpu_kernel.extension().isa()}, " in line
