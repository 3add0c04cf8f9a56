"""Opening a model and starting MLX: unreadable files are one sentence, and MLX compiles into a folder this
user owns."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

import pixtral_mlx
from pixtral_mlx.errors import ModelError


def _denied(path):
    def raise_(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    return raise_


def test_unreadable_model_folder_is_one_sentence(mlx_dir, monkeypatch):
    from pixtral_mlx import loading

    # A folder the user cannot list: Path.is_file() on its config.json raises PermissionError.
    monkeypatch.setattr(loading, "is_mlx_dir", _denied(mlx_dir / "config.json"))
    with pytest.raises(ModelError) as e:
        pixtral_mlx.load(str(mlx_dir))
    assert str(e.value) == f"{mlx_dir / 'config.json'} cannot be read (Permission denied)."


def test_unreadable_tokenizer_is_one_sentence(mlx_dir, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("tekken.json") else real(p, mode))
    with pytest.raises(ModelError, match=r"tekken.json cannot be read \(Permission denied\)\.$"):
        pixtral_mlx.load(str(mlx_dir))


def test_unreadable_weights_are_one_sentence(mlx_dir, monkeypatch):
    import mlx.core as mx

    real = mx.load

    def load(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mx, "load", load)
    with pytest.raises(ModelError, match=r"safetensors is not a readable safetensors file"):
        pixtral_mlx.load(str(mlx_dir))


_PROBE = """
import os, sys
import pixtral_mlx, mlx.core as mx, tempfile
x = mx.array([1.0, 2.0, 3.0])
f = mx.compile(lambda a: mx.sigmoid(a) * a + 1.0)  # a fused CPU kernel: compiled with the system compiler
print(os.environ.get("TMPDIR", ""), tempfile.gettempdir(), round(f(x).sum().item(), 4), sep="|")
"""


def test_mlx_compiles_into_a_folder_this_user_owns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TMP", "TEMP")}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    tmpdir, python_tmp, value = out.stdout.strip().split("|")
    assert tmpdir == os.path.join(python_tmp, f"pixtral-mlx-{os.getuid()}")
    st = os.stat(tmpdir)
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    assert os.path.isdir(os.path.join(tmpdir, "mlx"))  # MLX's compile cache went there
    assert float(value) == pytest.approx(sum(1 / (1 + 2.718281828**-a) * a + 1 for a in (1, 2, 3)), abs=1e-3)

    # The user's own TMPDIR is respected.
    mine = tmp_path / "mine"
    mine.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env={**env, "TMPDIR": str(mine)}, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("|")[0] == str(mine) and (mine / "mlx").is_dir()


def test_a_planted_folder_is_not_used(tmp_path, monkeypatch):
    import tempfile

    from pixtral_mlx import backend

    planted = tmp_path / f"pixtral-mlx-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)  # writable by everyone: someone else may have made it
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delitem(sys.modules, "mlx.core")  # as before MLX is loaded (restored after the test)
    assert backend.private_tmpdir() is None
    assert "TMPDIR" not in os.environ
    os.chmod(planted, 0o700)
    assert backend.private_tmpdir() == str(planted)
    assert os.environ["TMPDIR"] == str(planted)
