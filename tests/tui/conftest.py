"""Fixtures for the chat tests: a private data folder and a few small images on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chat_fakes import make_image


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """Conversations go to a temporary folder, never the user's."""
    path = tmp_path / "data"
    monkeypatch.setenv("PIXTRAL_MLX_DATA", str(path))
    return path


@pytest.fixture
def images(tmp_path):
    """A PNG with a space in its name, a large JPEG (downscaled to 768×1024) and a broken file."""
    folder = tmp_path / "my pictures"
    red = make_image(folder / "red square.png", (300, 200), (200, 20, 20))
    photo = make_image(folder / "photo.jpg", (3024, 4032), (20, 120, 200))
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png at all")
    return {"red": red, "photo": photo, "broken": broken}
