"""The BLAS MLX's CPU matmuls reach (pixtral_mlx.backend.preload_blas) and the shim to the scipy-openblas32 wheel.

On Linux x86-64/aarch64 the wheel is a dependency and setup.py builds `pixtral_mlx._blas_shim`: these tests
fail (not skip) when either is missing, so a broken build shows in CI. Elsewhere they are skipped. The choice of
BLAS is made once per process, before mlx is loaded, so each setting is checked in a fresh interpreter.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixtral_mlx import backend

WHEEL_PLATFORM = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")
ROW, COL, NO, TRANS = 101, 102, 111, 112  # CblasRowMajor, CblasColMajor, CblasNoTrans, CblasTrans

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS preload is Linux-only")


@pytest.fixture(scope="module")
def wheel() -> tuple[str, str]:
    found = backend.wheel_blas()
    if found is None:
        if WHEEL_PLATFORM:
            pytest.fail("scipy-openblas32 and pixtral_mlx._blas_shim must be installed on Linux (pip install -e .)")
        pytest.skip(f"no scipy-openblas32 wheel for {platform.machine()}")
    ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)  # the shim's symbols come from it, as backend._use loads them
    return found


THREAD_SETTINGS = ("PIXTRAL_MLX_BLAS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def child(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (PIXTRAL_MLX_BLAS and OpenBLAS's thread settings as given, else unset); it
    prints one JSON object."""
    environ = {k: v for k, v in os.environ.items() if k not in THREAD_SETTINGS} | env
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


CHOICE = """
import json
import pixtral_mlx
from pixtral_mlx import backend
print(json.dumps({"blas": backend.BLAS, "shim": backend.BLAS_SHIM, "source": backend.BLAS_SOURCE,
                  "note": backend.BLAS_NOTE, "sgemm": backend.gemm_library(), "threads": backend.blas_threads(),
                  "mapped": backend._mapped_files()}))
"""


def bundled_blas() -> Path:
    import mlx

    libs = sorted((Path(mlx.__path__[0]).parent / "mlx_cpu.libs").glob("libblas*.so*"))
    if not libs:
        pytest.skip("this mlx has no bundled reference BLAS in mlx_cpu.libs")
    return libs[0]


# --- the shim itself, called through ctypes ------------------------------------------------------------------------
def sgemm(lib, order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) -> None:
    f = lib.cblas_sgemm
    i, ptr = ctypes.c_int32, ctypes.POINTER(ctypes.c_float)
    f.restype = None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, ctypes.c_float, ptr, i, ptr, i,
                  ctypes.c_float, ptr, i]  # fmt: skip
    p = lambda x: x.ctypes.data_as(ptr)  # noqa: E731
    f(order, ta, tb, m, n, k, alpha, p(a), lda, p(b), ldb, beta, p(c), ldc)


def openblas_threads(wheel) -> int:
    f = ctypes.CDLL(wheel[0]).scipy_openblas_get_num_threads
    f.restype = ctypes.c_int
    return f()


# small: one thread (the shim sets OpenBLAS's count to 1 and back); large: all of OpenBLAS's threads
@pytest.mark.parametrize("m,n,k", [(37, 23, 51), (301, 263, 290)], ids=["small", "large"])
@pytest.mark.parametrize("order", [ROW, COL])
@pytest.mark.parametrize("ta", [NO, TRANS])
@pytest.mark.parametrize("tb", [NO, TRANS])
def test_shim_sgemm_equals_numpy(wheel, order, ta, tb, m, n, k):
    """C = alpha op(A) op(B) + beta C for a non-square product, with padded leading dimensions."""
    lib = ctypes.CDLL(wheel[1])  # the wheel's OpenBLAS is in the global scope (the fixture), which the shim calls
    rng = np.random.default_rng(order + ta + tb)
    pad, alpha, beta = 3, 0.75, -1.5
    threads = openblas_threads(wheel)
    op_a = rng.standard_normal((m, k)).astype(np.float32)
    op_b = rng.standard_normal((k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    expected = alpha * (op_a.astype(np.float64) @ op_b) + beta * c0

    def stored(x: np.ndarray, trans: int) -> tuple[np.ndarray, int]:
        """x as the BLAS reads it: op(stored) = x, in `order`, with `pad` extra elements per leading dimension."""
        y = x.T if trans == TRANS else x  # the matrix as held in memory (logical shape)
        if order == COL:
            y = y.T  # column-major: memory holds y's transpose row by row
        held = np.zeros((y.shape[0], y.shape[1] + pad), np.float32)
        held[:, : y.shape[1]] = y
        return held, y.shape[1] + pad

    a, lda = stored(op_a, ta)
    b, ldb = stored(op_b, tb)
    c, ldc = stored(c0, NO)
    sgemm(lib, order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    got = c[:, : (n if order == ROW else m)]
    got = got if order == ROW else got.T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert np.all(c[:, -pad:] == 0)  # nothing written past each row
    assert openblas_threads(wheel) == threads  # a small product put OpenBLAS's thread count back


def test_shim_dgemm_and_cgemm(wheel):
    lib = ctypes.CDLL(wheel[1])
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((7, 3))
    c = np.zeros((5, 3))
    dp, i = ctypes.POINTER(ctypes.c_double), ctypes.c_int32
    lib.cblas_dgemm.argtypes = [ctypes.c_int] * 3 + [i] * 3 + [ctypes.c_double, dp, i, dp, i, ctypes.c_double, dp, i]
    lib.cblas_dgemm(ROW, NO, NO, 5, 3, 7, 2.0, a.ctypes.data_as(dp), 7, b.ctypes.data_as(dp), 3, 0.0,
                    c.ctypes.data_as(dp), 3)  # fmt: skip
    np.testing.assert_allclose(c, 2 * a @ b, rtol=1e-12)

    za = (rng.standard_normal((4, 6)) + 1j * rng.standard_normal((4, 6))).astype(np.complex64)
    zb = (rng.standard_normal((6, 2)) + 1j * rng.standard_normal((6, 2))).astype(np.complex64)
    zc = np.zeros((4, 2), np.complex64)
    alpha, beta = np.array([1 - 2j], np.complex64), np.array([0], np.complex64)
    v = ctypes.c_void_p
    lib.cblas_cgemm.argtypes = [ctypes.c_int] * 3 + [i] * 3 + [v, v, i, v, i, v, v, i]
    lib.cblas_cgemm(ROW, NO, NO, 4, 2, 6, alpha.ctypes.data, za.ctypes.data, 6, zb.ctypes.data, 2, beta.ctypes.data,
                    zc.ctypes.data, 2)  # fmt: skip
    np.testing.assert_allclose(zc, (1 - 2j) * (za.astype(np.complex128) @ zb), rtol=1e-4, atol=1e-4)


# --- MLX's matmuls through the shim, in a fresh process ------------------------------------------------------------
MATMULS = """
import json, sys
import numpy as np
import pixtral_mlx
from pixtral_mlx import backend
import mlx.core as mx

rng = np.random.default_rng(0)
a, b, c = (rng.standard_normal(s).astype(np.float32) for s in [(33, 70), (70, 19), (33, 19)])
A, B, C = mx.array(a), mx.array(b), mx.array(c)
at, bt = mx.array(np.ascontiguousarray(a.T)), mx.array(np.ascontiguousarray(b.T))
out = {"plain": A @ B, "trans_a": at.T @ B, "trans_b": A @ bt.T, "both": at.T @ bt.T,
       "addmm": mx.addmm(C, A, B, alpha=0.5, beta=-2.0), "batched": mx.stack([A, 2 * A]) @ B,
       "f64": mx.matmul(A.astype(mx.float64), B.astype(mx.float64), stream=mx.cpu)}
np.savez(sys.argv[1], **{k: np.array(v) for k, v in out.items()})
print(json.dumps({"sgemm": backend.gemm_library(), "shim": backend.BLAS_SHIM}))
"""


def test_mlx_matmul_through_shim(wheel, tmp_path):
    out = tmp_path / "out.npz"
    environ = {k: v for k, v in os.environ.items() if k != "PIXTRAL_MLX_BLAS"}
    done = subprocess.run([sys.executable, "-c", MATMULS, str(out)], env=environ, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["sgemm"] == os.path.realpath(wheel[1]) == os.path.realpath(info["shim"])
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(s) for s in [(33, 70), (70, 19), (33, 19)])
    a, b, c = (x.astype(np.float32).astype(np.float64) for x in (a, b, c))
    got = np.load(out)
    for name in ("plain", "trans_a", "trans_b", "both"):
        np.testing.assert_allclose(got[name], a @ b, rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(got["addmm"], 0.5 * a @ b - 2.0 * c, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["batched"], np.stack([a @ b, 2 * a @ b]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["f64"], a @ b, rtol=1e-10)


# --- which BLAS preload_blas chooses ------------------------------------------------------------------------------
def test_prefers_the_wheel_shim(wheel):
    r = child(CHOICE)
    assert (r["source"], r["blas"], r["shim"]) == ("wheel", wheel[0], wheel[1])
    assert r["sgemm"] == os.path.realpath(wheel[1])
    assert not [f for f in r["mapped"] if "libopenblas" in f]  # a system OpenBLAS, if any, is not even loaded
    assert r["note"].startswith("OpenBLAS ") and "scipy-openblas32 wheel" in r["note"]
    assert r["threads"] == min(len(os.sched_getaffinity(0)), 64)  # every core this process may use


def test_openblas_num_threads_is_honoured(wheel):
    assert child(CHOICE, OPENBLAS_NUM_THREADS="1")["threads"] == 1


def test_off_keeps_the_bundled_reference():
    r = child(CHOICE, PIXTRAL_MLX_BLAS="off")
    assert (r["source"], r["blas"], r["shim"]) == ("bundled", None, None)
    assert r["note"] == "bundled reference BLAS (PIXTRAL_MLX_BLAS=off)"
    assert r["sgemm"] == os.path.realpath(bundled_blas())


def test_a_path_is_loaded_instead():
    path = str(bundled_blas())  # a BLAS that is always there and exports cblas_sgemm itself
    r = child(CHOICE, PIXTRAL_MLX_BLAS=path)
    assert (r["source"], r["blas"], r["shim"]) == ("env", path, None)
    assert r["sgemm"] == os.path.realpath(path)
    assert r["note"] == f"optimized BLAS (PIXTRAL_MLX_BLAS={path})"


def test_a_missing_path_is_said(tmp_path):
    missing = str(tmp_path / "libnothing.so")
    r = child(CHOICE, PIXTRAL_MLX_BLAS=missing)
    assert (r["source"], r["blas"]) == ("bundled", None)
    assert r["note"] == f"bundled reference BLAS (PIXTRAL_MLX_BLAS={missing} could not be loaded)"


def test_mlx_imported_first_keeps_the_bundled_one():
    r = child("import mlx.core\n" + CHOICE)
    assert (r["source"], r["blas"]) == ("bundled", None)
    assert r["note"] == "bundled reference BLAS (mlx was imported before pixtral_mlx)"
