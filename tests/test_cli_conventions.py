"""The usual CLI conventions around a command: a closed pipe, a full disk, Ctrl-C before the command runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "square.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


def describe_argv(image, mlx_dir, *extra):
    return [sys.executable, "-m", "pixtral_mlx", "describe", str(image), "--model", str(mlx_dir), "--temp", "0",
            "--max-tokens", "20", *extra]  # fmt: skip


def test_closed_pipe_exits_quietly(image, mlx_dir):
    """`describe … | head -c 1`: the reader is gone before the first word; no traceback, no noise."""
    proc = subprocess.Popen(describe_argv(image, mlx_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_full_disk_is_one_sentence(image, mlx_dir):
    with open("/dev/full", "w") as full:
        run = subprocess.run(describe_argv(image, mlx_dir), stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["error: cannot write the output (No space left on device)."]


CTRL_C_DURING = """
import sys
class Interrupt:  # Ctrl-C while a module of the command is being imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from pixtral_mlx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module", ["pixtral_mlx.cli.describe", "pixtral_mlx.pipeline"])
def test_ctrl_c_during_startup_exits_130_quietly(module, image, mlx_dir):
    code = CTRL_C_DURING.format(module=module)
    argv = [sys.executable, "-c", code, *describe_argv(image, mlx_dir)[3:]]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert run.stdout == ""
