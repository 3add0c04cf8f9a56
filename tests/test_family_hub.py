"""Repos that ship both layouts (Mistral Small 3.x: consolidated.safetensors AND model-*.safetensors) are downloaded
in one layout only, the Hugging Face one, which `load` reads as it is and `convert` reads too (hub.layout_files)."""

from __future__ import annotations

import json

import pytest

from pixtral_mlx import hub

BOTH = {
    "consolidated.safetensors",
    "params.json",
    "tekken.json",
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "SYSTEM_PROMPT.txt",
    "README.md",
}
OFFICIAL = {"consolidated.safetensors", "params.json", "tekken.json", "README.md"}
MLX = {"config.json", "model.safetensors", "tokenizer.json", "README.md"}


@pytest.mark.parametrize(
    "names,layout",
    [(BOTH, "hf"), (OFFICIAL, "official"), (MLX, "hf"), (None, "both"), ({"README.md"}, "both")],
)
def test_one_layout_per_listing(names, layout):
    files = hub.layout_files(names)
    has_hf, has_official = "model*.safetensors" in files, "consolidated.safetensors" in files
    assert (has_hf, has_official) == {"hf": (True, False), "official": (False, True), "both": (True, True)}[layout]
    assert "tekken.json" in files
    assert set(hub.OFFICIAL_FILES) <= set(files) or not has_official  # whatever OFFICIAL_FILES holds comes along


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A Hub whose repo lists both layouts, nothing cached: records each snapshot_download's patterns."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[tuple[list[str], bool]] = []
    folder = tmp_path / "snapshot"

    class Info:
        siblings = [type("S", (), {"rfilename": n})() for n in sorted(BOTH)]

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append((list(allow_patterns), local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo: Info())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "ours"))
    return calls, folder


def test_load_downloads_the_hf_layout_only(fake_hub, hf_dir):
    import shutil

    from pixtral_mlx.loading import MLX_ALLOW_PATTERNS, resolve

    calls, folder = fake_hub
    shutil.copytree(hf_dir, folder)
    assert resolve("mistralai/Mistral-Small-3.1-24B-Instruct-2503") == folder
    downloads = [patterns for patterns, local in calls if not local]
    assert downloads == [MLX_ALLOW_PATTERNS]  # one download, of one layout
    assert "consolidated.safetensors" not in downloads[0] and "model*.safetensors" in downloads[0]


def test_convert_downloads_the_same_layout(fake_hub, hf_dir, tmp_path):
    import shutil

    from pixtral_mlx.convert import convert

    calls, folder = fake_hub
    shutil.copytree(hf_dir, folder)
    out = convert("mistralai/Mistral-Small-3.1-24B-Instruct-2503", tmp_path / "out", progress=False)
    assert [patterns for patterns, _ in calls] == [hub.HF_FILES]
    assert json.loads((out / "config.json").read_text())["model_type"] == "pixtral"


def test_a_cached_layout_starts_offline(monkeypatch, tmp_path, hf_dir):
    """A repo cached in one layout is used without asking the Hub, though it lists the other layout too."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pixtral_mlx.loading import MLX_ALLOW_PATTERNS, resolve

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, **kw):
        calls.append(local_files_only)
        if not local_files_only or "consolidated.safetensors" in allow_patterns:
            raise LocalEntryNotFoundError("the official files are not cached")  # as an incomplete snapshot is
        assert allow_patterns == MLX_ALLOW_PATTERNS
        return str(hf_dir)

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_hub)
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "ours"))
    assert resolve("mistralai/Mistral-Small-3.1-24B-Instruct-2503") == hf_dir
    assert calls == [True, True]
