"""The `pixtral-mlx` entry point: instant --help/--version (no MLX import), subcommand dispatch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pixtral_mlx import __version__

PROBE = """
import sys
from pixtral_mlx.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = [m for m in ("mlx.core", "mlx_lm", "textual", "torch", "transformers") if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["describe", "--help"],
        ["chat", "--help"],
        ["convert", "--help"],
        ["caption", "--help"],
    ],
)
def test_help_and_version_import_nothing_heavy(argv):
    run = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in run.stdout, run.stdout + run.stderr
    assert "usage:" in run.stdout or __version__ in run.stdout


def test_python_dash_m_and_console_script_agree():
    a = subprocess.run([sys.executable, "-m", "pixtral_mlx", "--version"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout.strip() == f"pixtral-mlx {__version__}"
    b = subprocess.run([sys.executable, "-m", "pixtral_mlx", "frobnicate"], capture_output=True, text=True)
    assert b.returncode == 2 and "invalid choice" in b.stderr and "Traceback" not in b.stderr
