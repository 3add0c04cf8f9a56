"""`pixtral-mlx models` and the family catalog: parameter counts, memory per precision, the local cache, short names."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from pixtral_mlx import catalog
from pixtral_mlx.catalog import FAMILY, Model, TextShape, VisionShape
from pixtral_mlx.cli import main
from pixtral_mlx.errors import ModelError
from pixtral_mlx.loading import resolve


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, empty caches in tmp_path, a fixed 24 GB limit."""

    def refuse(*args, **kwargs):
        raise AssertionError("the models command must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "ours"))
    monkeypatch.setenv("PIXTRAL_MLX_MEMORY_LIMIT", "24")
    return tmp_path


def run_models(capsys, *argv):
    assert main(["models", *argv]) == 0
    return capsys.readouterr().out


def test_pixtral_12b_parameter_count_from_the_layer_formulas():
    d, layers, q, kv, ffn, vocab = 5120, 40, 32 * 128, 8 * 128, 14336, 131072
    layer = d * q + 2 * d * kv + q * d + 3 * d * ffn + 2 * d  # wq, wk+wv, wo, w1+w2+w3, two norms
    decoder = 2 * vocab * d + layers * layer + d  # untied embeddings and output, final norm
    vh, vf = 1024, 4096
    vision = 3 * 16 * 16 * vh + vh + 24 * (4 * vh * vh + 3 * vh * vf + 2 * vh)  # patch conv, ln_pre, 24 blocks
    adapter = vh * d + d + d * d + d  # w_in, w_out with biases
    expected = decoder + vision + adapter
    pixtral = catalog.find("pixtral-12b")
    assert pixtral.parts() == {"decoder": decoder, "vision": vision, "projector": adapter}
    assert pixtral.params() == expected
    # REFERENCE.md §1 (computed from the tensor shapes of the release): 12,682,739,712, vision 403,489,792.
    # ("12.4B" is the rounded 12B decoder + 0.4B vision of the model card; the untied output matrix adds 0.67B.)
    assert abs(pixtral.params() - 12_682_739_712) / 12_682_739_712 < 0.01
    assert abs(vision - 0.4e9) / 0.4e9 < 0.01
    assert abs(pixtral.weight_bytes() / 1e9 - 25.37) < 0.01  # REFERENCE.md: ~25.37 GB in bf16


@pytest.mark.parametrize(
    "name,language,total",
    [("ministral-3-3b", 3.4e9, 3.8e9), ("ministral-3-8b", 8.4e9, 8.8e9), ("mistral-small-3.1", 23.6e9, 24.0e9)],
)
def test_published_sizes(name, language, total):
    """The model cards' rounded figures (language model + 0.4B vision encoder), within rounding."""
    m = catalog.find(name)
    assert abs(m.parts()["decoder"] - language) / language < 0.02
    assert abs(m.params() - total) / total < 0.02


TINY = Model(
    name="tiny",
    official="owner/tiny",
    text=TextShape(layers=1, hidden=64, heads=2, kv_heads=1, head_dim=32, ffn=128, vocab=256),
    vision=VisionShape(layers=1, hidden=64, heads=2, ffn=128, patch=2),
    context=1024,
)


def test_memory_per_precision_of_a_tiny_entry():
    # Decoder matrices (quantized): embed + lm_head 2*256*64, q 64*64, k and v 2*32*64, o 64*64,
    # gate and up 2*128*64, down 64*128 = 69,632 elements; decoder norms 3*64 = 192 stay bf16.
    packed = 2 * 256 * 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
    assert packed == 69_632
    vision = 3 * 2 * 2 * 64 + 64 + (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)  # conv, ln_pre, one block
    projector = 64 * 64 + 64 + 64 * 64 + 64  # Pixtral's adapter, with biases
    dense = 192 + vision + projector
    assert TINY.params() == packed + dense == 120_064
    groups = packed // 64  # one bf16 scale and one bf16 bias per group of 64
    assert TINY.weight_bytes(None) == 2 * 120_064 == 240_128
    assert TINY.weight_bytes(8) == packed + 4 * groups + 2 * dense == 174_848
    assert TINY.weight_bytes(4) == packed // 2 + 4 * groups + 2 * dense == 140_032
    kv = 2 * 1 * 1 * 32 * 2  # keys and values, 1 layer, 1 KV head of 32, bf16: 128 bytes per token
    assert TINY.kv_bytes(100) == 100 * kv
    assert TINY.memory_bytes(4, 100) == 140_032 + 12_800
    for m in (*FAMILY, TINY):
        assert m.memory_bytes(4) < m.memory_bytes(8) < m.memory_bytes(None)
        assert m.download_bytes() <= m.weight_bytes(None)


def test_lists_every_member_offline_within_100_columns(offline, capsys):
    out = run_models(capsys)
    for m in FAMILY:
        assert m.name in out and m.official in out
    assert "mlx-community/pixtral-12b-4bit" in out
    assert "8,192 tokens" in out and "24.0 GB" in out
    assert "fits" in out and "too big" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    row = next(line for line in out.splitlines() if line.startswith("pixtral-12b *"))
    assert row.endswith("-")  # nothing cached


def test_json(offline, capsys):
    report = json.loads(run_models(capsys, "--json", "--context", "4096"))
    assert report["context_tokens"] == 4096 and report["limit_bytes"] == 24 * 10**9
    assert [m["name"] for m in report["models"]] == [m.name for m in FAMILY]
    by = {m["name"]: m for m in report["models"]}
    pixtral = by["pixtral-12b"]
    assert pixtral["default"] and pixtral["params"] == 12_682_739_712 and pixtral["cached"] == []
    assert pixtral["memory"]["4bit"]["fits"] is True and pixtral["memory"]["bf16"]["fits"] is False
    assert pixtral["memory"]["4bit"]["kv_cache"] == 2 * 40 * 8 * 128 * 2 * 4096
    assert by["pixtral-large"]["memory"]["4bit"]["fits"] is False and by["pixtral-large"]["approximate"]


def test_no_limit(offline, capsys, monkeypatch):
    monkeypatch.setenv("PIXTRAL_MLX_MEMORY_LIMIT", "off")
    report = json.loads(run_models(capsys, "--json"))
    assert report["limit_bytes"] is None
    assert all(m["memory"]["bf16"]["fits"] is None for m in report["models"])


def snapshot(hub, repo, files, rev="0123abcd"):
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_cached_models_are_marked(offline, capsys):
    hub = offline / "hub"
    snapshot(hub, "mistralai/Ministral-3-8B-Instruct-2512", {"config.json": "{}", "model.safetensors": ""})
    snapshot(hub, "mlx-community/pixtral-12b-4bit", {"config.json": "{}", "model.safetensors": ""})
    snapshot(hub, "mistralai/Pixtral-12B-2409", {"params.json": "{}", "consolidated.safetensors": ""})
    index = json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    )
    partial = {"config.json": "{}", "model.safetensors.index.json": index, "model-00001-of-00002.safetensors": ""}
    snapshot(hub, "mistralai/Mistral-Small-3.1-24B-Instruct-2503", partial)  # an interrupted download
    converted = offline / "ours" / "models" / "mistralai--Mistral-Small-3.2-24B-Instruct-2506-4bit"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    (converted / "model.safetensors").write_text("")

    by = {m["name"]: m for m in json.loads(run_models(capsys, "--json"))["models"]}
    assert [c["kind"] for c in by["ministral-3-8b"]["cached"]] == ["hf"]
    assert [c["kind"] for c in by["pixtral-12b"]["cached"]] == ["hf", "mlx"]
    assert by["mistral-small-3.1"]["cached"] == []
    assert by["mistral-small-3.2"]["cached"] == [
        {"kind": "conv", "repo": "mistralai/Mistral-Small-3.2-24B-Instruct-2506", "path": str(converted)}
    ]
    assert by["ministral-3-8b-reasoning"]["cached"] == []

    rows = {line.split()[0]: line for line in run_models(capsys).splitlines() if line[:1].isalpha()}
    assert rows["ministral-3-8b"].endswith(" hf")
    assert rows["pixtral-12b"].endswith(" hf,mlx")
    assert rows["mistral-small-3.2"].endswith(" conv")
    assert rows["mistral-small-3.1"].endswith(" -")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download records the repo it was asked for and returns a local MLX-layout folder."""
    import huggingface_hub

    asked = []
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text("")

    def fake(repo_id, allow_patterns=None, local_files_only=False, **kwargs):
        asked.append(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("PIXTRAL_MLX_HOME", str(tmp_path / "ours"))
    monkeypatch.chdir(tmp_path)
    return asked, folder


@pytest.mark.parametrize(
    "name,repo",
    [
        ("ministral-3-8b", "mistralai/Ministral-3-8B-Instruct-2512"),
        ("Mistral-Small-3.2", "mistralai/Mistral-Small-3.2-24B-Instruct-2506"),
        ("MAGISTRAL-SMALL", "mistralai/Magistral-Small-2509"),
        ("ministral-3-14b-reasoning", "mistralai/Ministral-3-14B-Reasoning-2512"),
        ("pixtral-12b", "mistralai/Pixtral-12B-2409"),
        ("Pixtral-12B-2409", "mistralai/Pixtral-12B-2409"),
        ("mistralai/Pixtral-12B-2409", "mistralai/Pixtral-12B-2409"),  # repo ids as before
    ],
)
def test_short_names_resolve_to_the_official_repo(fake_hub, name, repo):
    asked, folder = fake_hub
    assert resolve(name) == folder
    assert asked and set(asked) == {repo}


def test_unknown_names_and_folders(fake_hub, tmp_path):
    asked, _ = fake_hub
    with pytest.raises(ModelError, match=r"not a Hugging Face repo id \(owner/name\).*pixtral-mlx models"):
        resolve("ministral-9-1b")
    (tmp_path / "pixtral-12b").mkdir()  # a folder of that name is the folder, as before
    with pytest.raises(ModelError, match="holds no model"):
        resolve("pixtral-12b")
    assert asked == []


def test_help_imports_nothing_heavy():
    probe = (
        "import sys\nfrom pixtral_mlx.cli import main\n"
        "try:\n    main(['models', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('mlx.core', 'mlx_lm', 'torch', 'transformers') if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in run.stdout and "pixtral-mlx models" in run.stdout, run.stdout + run.stderr


def test_bad_context(capsys):
    assert main(["models", "--context", "0"]) == 2
    assert "--context" in capsys.readouterr().err


def test_convert_takes_short_names_too(monkeypatch, tmp_path):
    from pixtral_mlx.conversion import stream
    from pixtral_mlx.errors import ConversionError

    asked = []

    def download(repo):
        asked.append(repo)
        raise ConversionError("stop here: nothing is downloaded in tests")

    monkeypatch.setattr(stream, "download", download)
    with pytest.raises(ConversionError, match="stop here"):
        stream.convert("Ministral-3-8B", tmp_path / "out", quantize=True)
    assert asked == ["mistralai/Ministral-3-8B-Instruct-2512"]
