"""Shared fixtures: tiny random Pixtral checkpoints (real architecture and tokenizer), built once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import pixtral_mlx  # before any test module imports mlx: this preloads the fast BLAS (backend.py)

sys.path.insert(0, str(Path(__file__).parent))

import checkpoints  # noqa: E402


@pytest.fixture(scope="session")
def hf_model():
    return checkpoints.hf_model(seed=0)


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory):
    return checkpoints.write_hf_checkpoint(hf_model, tmp_path_factory.mktemp("hf") / "tiny-hf")


@pytest.fixture(scope="session")
def official_dir(hf_model, tmp_path_factory):
    return checkpoints.write_official_checkpoint(hf_model, tmp_path_factory.mktemp("official") / "tiny-official")


@pytest.fixture(scope="session")
def mlx_dir(hf_dir, tmp_path_factory):
    """The tiny checkpoint converted to MLX format in float32 (exact comparisons)."""
    from pixtral_mlx.convert import convert

    return convert(hf_dir, tmp_path_factory.mktemp("mlx") / "tiny-mlx", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def pixtral(mlx_dir):
    return pixtral_mlx.load(str(mlx_dir))


@pytest.fixture(scope="session")
def think_dir(mlx_dir, tmp_path_factory):
    """The tiny MLX checkpoint with a tekken v13 tokenizer that has [THINK]/[/THINK] (Pixtral's image settings:
    patch 16, no merge): a reasoning model's prompt and reply layout on the tiny weights."""
    import shutil

    import tekken_files

    path = tmp_path_factory.mktemp("think") / "tiny-think"
    shutil.copytree(mlx_dir, path)
    tekken_files.make_tekken(path, "v13", image={"image_patch_size": 16, "max_image_size": 1024})
    return path
