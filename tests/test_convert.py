"""The checkpoint converter: both layouts, shards, quantization, bad input, interruption."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from checkpoints import (  # noqa: E402
    hf_model,
    legacy_hf_state_dict,
    tekken_path,
    write_hf_checkpoint,
    write_official_checkpoint,
)
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import pixtral_mlx.conversion.stream as stream  # noqa: E402
from pixtral_mlx.conversion.save import ShardedWriter  # noqa: E402
from pixtral_mlx.convert import ConversionError, convert  # noqa: E402
from pixtral_mlx.convert.__main__ import default_output, main  # noqa: E402
from pixtral_mlx.models.pixtral.args import PixtralArgs  # noqa: E402
from pixtral_mlx.models.pixtral.weights import expected_shapes  # noqa: E402

VT = "vision_tower.vision_model"
LM = "language_model.model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One random model written in three source layouts."""
    root = tmp_path_factory.mktemp("sources")
    model = hf_model(seed=0)
    hf = write_hf_checkpoint(model, root / "hf")
    official = write_official_checkpoint(model, root / "official")
    # transformers-5 names in one unindexed file.
    hf5 = root / "hf5"
    hf5.mkdir()
    save_file(
        {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
        str(hf5 / "model.safetensors"),
    )
    shutil.copy(hf / "config.json", hf5 / "config.json")
    return {
        "model": model,
        "hf": hf,
        "official": official,
        "hf5": hf5,
        "reference": legacy_hf_state_dict(model),
    }


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in ("hf", "official", "hf5"):
        out[name] = convert(tiny[name], root / name, dtype="float32", progress=False, max_shard_bytes=20_000_000)
    return out


def load_all(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        part = mx.load(str(f))
        assert not set(part) & set(weights), "a tensor is stored twice"
        weights.update(part)
    return weights


def test_sources_agree_and_match_the_reference(tiny, converted):
    # Equal outputs from both layouts prove the RoPE permutation and the key table agree.
    hf, official, hf5 = (load_all(converted[k]) for k in ("hf", "official", "hf5"))
    args = PixtralArgs.from_params(json.loads((tiny["official"] / "params.json").read_text()))
    assert set(hf) == set(official) == set(hf5) == set(expected_shapes(args))
    for key, shape in expected_shapes(args).items():
        assert hf[key].shape == shape and hf[key].dtype == mx.float32
        assert mx.array_equal(hf[key], official[key]).item(), key
        assert mx.array_equal(hf[key], hf5[key]).item(), key
    ref = tiny["reference"]
    conv_w = ref["vision_tower.patch_conv.weight"]  # PyTorch [O, I, kH, kW] -> MLX [O, kH, kW, I]
    np.testing.assert_array_equal(np.array(hf[f"{VT}.patch_conv.weight"]), conv_w.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(
        np.array(official[f"{LM}.layers.1.self_attn.k_proj.weight"]),
        ref["language_model.model.layers.1.self_attn.k_proj.weight"],
    )
    np.testing.assert_array_equal(
        np.array(official[f"{VT}.transformer.layers.0.attention.q_proj.weight"]),
        ref["vision_tower.transformer.layers.0.attention.q_proj.weight"],
    )


def test_shards_index_config_and_tokenizer(tiny, converted):
    out = converted["official"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    total = 0
    for shard in shards:
        with safe_open(str(shard), framework="numpy") as f:  # the reference reader accepts our files
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][key] == shard.name
                total += f.get_tensor(key).nbytes
    assert len(index["weight_map"]) == len(load_all(out))
    assert index["metadata"]["total_size"] == total
    text = (out / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=4, sort_keys=True) + "\n"
    params = PixtralArgs.from_params(json.loads((tiny["official"] / "params.json").read_text()))
    hf = PixtralArgs.from_hf_config(json.loads((tiny["hf"] / "config.json").read_text()))
    assert PixtralArgs.from_hf_config(json.loads(text)) == params == hf
    assert PixtralArgs.from_hf_config(json.loads((converted["hf"] / "config.json").read_text())) == hf
    # tekken.json: the source's own, else the one mistral_common ships.
    assert (out / "tekken.json").read_bytes() == (tiny["official"] / "tekken.json").read_bytes()
    assert (converted["hf"] / "tekken.json").read_bytes() == tekken_path().read_bytes()
    assert not list(out.parent.glob("*.partial-*"))


def test_bfloat16_default_and_row_blocks(tiny, converted, tmp_path, monkeypatch):
    out = convert(tiny["official"], tmp_path / "bf16", progress=False)
    bf16, f32 = load_all(out), load_all(converted["official"])
    for key, w in bf16.items():
        assert w.dtype == mx.bfloat16
        assert mx.array_equal(w, f32[key].astype(mx.bfloat16)).item(), key
    with safe_open(str(next(out.glob("model-*.safetensors"))), framework="pt") as f:
        assert str(f.get_tensor(f.keys()[0]).dtype) == "torch.bfloat16"
    # Tiny row blocks (the streaming path for big tensors) give the same bytes, quantized too.
    for kwargs in ({}, {"quantize": True}):
        whole = convert(tiny["official"], tmp_path / f"whole{len(kwargs)}", progress=False, **kwargs)
        monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 20)  # 32 blocks for the embedding
        blocks = convert(tiny["official"], tmp_path / f"blocks{len(kwargs)}", progress=False, **kwargs)
        monkeypatch.undo()
        pairs = zip(sorted(whole.glob("model-*")), sorted(blocks.glob("model-*")), strict=True)
        for a, b in pairs:
            assert a.read_bytes() == b.read_bytes()


def test_half_precision_sources(tiny, converted, tmp_path):
    # The real checkpoints are bfloat16: read as raw uint16 and viewed, never through float32 numpy.
    reference = load_all(converted["official"])
    bf16 = _copy_official(tiny, tmp_path / "bf16")
    weights = mx.load(str(bf16 / "consolidated.safetensors"))
    mx.save_safetensors(
        str(bf16 / "consolidated.safetensors"),
        {k: v.astype(mx.bfloat16) for k, v in weights.items()},
    )
    f16 = write_hf_checkpoint(tiny["model"], tmp_path / "f16", dtype="float16")
    for src, dtype in ((bf16, mx.bfloat16), (f16, mx.float16)):
        name = "bfloat16" if dtype == mx.bfloat16 else "float16"
        out = load_all(convert(src, tmp_path / f"out-{name}", dtype=name, progress=False))
        for key, w in reference.items():
            assert mx.array_equal(out[key], w.astype(dtype)).item() and out[key].dtype == dtype, key


# Measured mean relative errors: 0.094-0.098 (4-bit), 0.009-0.010 (8-bit; bf16 biases dominate).
@pytest.mark.parametrize("bits, max_rel_err", [(4, 0.11), (8, 0.012)])
def test_quantized(tiny, converted, tmp_path, bits, max_rel_err):
    out = convert(tiny["official"], tmp_path / "q", quantize=True, bits=bits, progress=False)
    q, dense = load_all(out), load_all(converted["official"])
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: config[k] for k in ("bits", "group_size", "mode")} == {
        "bits": bits,
        "group_size": 64,
        "mode": "affine",
    }
    assert not [k for k in q if k.endswith(".scales") and not k.startswith("language_model.")]
    for key, w in dense.items():
        stem = key.removesuffix(".weight")
        if f"{stem}.scales" not in q:
            assert mx.array_equal(q[key], w.astype(mx.bfloat16)).item(), key
            continue
        assert q[key].dtype == mx.uint32 and q[f"{stem}.scales"].dtype == mx.bfloat16
        ref = mx.quantize(w, 64, bits)  # exactly what nn.quantize would store
        assert mx.array_equal(q[key], ref[0]).item()
        assert mx.array_equal(q[f"{stem}.scales"], ref[1].astype(mx.bfloat16)).item()
        back = mx.dequantize(q[key], q[f"{stem}.scales"], q[f"{stem}.biases"], 64, bits).astype(mx.float32)
        assert (mx.abs(back - w).mean() / mx.abs(w).mean()).item() < max_rel_err, key
    quantized = {k.removesuffix(".scales") for k in q if k.endswith(".scales")}
    assert f"{LM}.embed_tokens" in quantized and "language_model.lm_head" in quantized
    assert f"{LM}.layers.0.self_attn.q_proj" in quantized
    # down_proj's input (96) is not a multiple of 64: left dense and recorded, as mlx-lm does.
    assert f"{LM}.layers.0.mlp.down_proj" not in quantized
    assert config[f"{LM}.layers.0.mlp.down_proj"] is False
    # A loader rebuilding layers from the `.scales` keys gets matching shapes.
    layer = nn.Linear(64, 128, bias=False).to_quantized(group_size=64, bits=bits)
    assert layer.weight.shape == q[f"{LM}.layers.0.self_attn.q_proj.weight"].shape
    assert layer.scales.shape == q[f"{LM}.layers.0.self_attn.q_proj.scales"].shape
    embed = nn.Embedding(131072, 64).to_quantized(group_size=64, bits=bits)
    assert embed.weight.shape == q[f"{LM}.embed_tokens.weight"].shape


def test_quantize_vision(tiny, tmp_path):
    out = convert(
        tiny["hf"],
        tmp_path / "qv",
        quantize=True,
        group_size=32,
        quantize_vision=True,
        progress=False,
    )
    q = load_all(out)
    config = json.loads((out / "config.json").read_text())["quantization"]
    vt = f"{VT}.transformer.layers.0"
    assert f"{vt}.attention.q_proj.scales" in q and f"{vt}.feed_forward.gate_proj.scales" in q
    assert "multi_modal_projector.linear_1.scales" in q
    assert f"{vt}.feed_forward.down_proj.scales" not in q and config[f"{vt}.feed_forward.down_proj"] is False
    assert q[f"{VT}.patch_conv.weight"].dtype == mx.bfloat16 and f"{VT}.ln_pre.scales" not in q


def _rewrite(folder: Path, edit) -> None:
    f = folder / "consolidated.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


def _copy_official(tiny, dest: Path) -> Path:
    dest.mkdir()
    for name in ("consolidated.safetensors", "params.json"):
        shutil.copy(tiny["official"] / name, dest / name)
    return dest


def _truncate(folder: Path) -> None:
    f = folder / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_header(folder: Path) -> None:
    f = folder / "consolidated.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"\x00garbage{{{{]]]]"
    f.write_bytes(bytes(data))


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


BAD = {
    "missing": (None, "does not exist"),
    "empty": (lambda t, d: d.mkdir(), "not a Pixtral checkpoint"),
    "corrupt params": (
        lambda t, d: (_copy_official(t, d) / "params.json").write_text("{not json"),
        "not valid JSON",
    ),
    "truncated": (lambda t, d: _truncate(_copy_official(t, d)), "truncated"),
    "corrupt header": (
        lambda t, d: _corrupt_header(_copy_official(t, d)),
        "corrupt safetensors header",
    ),
    "unknown tensor": (
        lambda t, d: _rewrite(_copy_official(t, d), lambda w: w.update(extra=np.zeros(3, np.float32))),
        "unknown tensor 'extra'",
    ),
    "missing tensor": (
        lambda t, d: _rewrite(_copy_official(t, d), lambda w: w.pop("layers.1.feed_forward.w3.weight")),
        "no tensor for 'language_model.model.layers.1.mlp.up_proj.weight'",
    ),
    "wrong shape": (
        lambda t, d: _rewrite(_copy_official(t, d), lambda w: w.update({"norm.weight": np.ones(65, np.float32)})),
        "'norm.weight'",
    ),
    "index file": (
        lambda t, d: (shutil.copytree(t["hf"], d) / "model-00002-of-00002.safetensors").unlink(),
        "lists model-00002-of-00002.safetensors, which is missing",
    ),
    "no params": (lambda t, d: (_copy_official(t, d) / "params.json").unlink(), "no params.json"),
    "pickle": (
        lambda t, d: (
            d.mkdir(),
            shutil.copy(t["hf"] / "config.json", d),
            (d / "pytorch_model.bin").write_bytes(b"PK"),
        ),
        "refusing to read pickle checkpoint",
    ),
    "bad config": (
        lambda t, d: _edit_json(
            shutil.copytree(t["hf"], d) / "config.json",
            lambda c: c["vision_config"].update(num_attention_heads=3),
        ),
        "config.json does not describe a Pixtral model: vision hidden_size",
    ),
    "params field": (
        lambda t, d: _edit_json(_copy_official(t, d) / "params.json", lambda p: p.pop("dim")),
        "params.json does not describe a Pixtral model: params.json has no 'dim' field",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, case):
    make, expected = BAD[case]
    src = tmp_path / "src"
    if make:
        make(tiny, src)
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["src"] if make else [])


def test_existing_output_needs_force(tiny, converted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(converted["hf"], out)  # a previous conversion (float32)
    assert main([str(tiny["official"]), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: output {out} already exists: pass --force (force=True) to replace it\n"
    assert main([str(tiny["official"]), "-o", str(out), "--quiet", "--force"]) == 0
    assert next(iter(load_all(out).values())).dtype == mx.bfloat16  # replaced by the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_never_replaces_anything_but_a_conversion(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for flags in ([], ["--force"]):
        assert main([str(tiny["official"]), "-o", str(out), "--quiet", *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: output {out} is not a model conversion (it holds old.txt): ")
        assert err.count("\n") == 1 and err.endswith("choose another folder\n")
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="--force replaces only a previous conversion"):
        convert(tiny["official"], out, force=True, progress=False)


def test_offline_repo_id(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["nobody-here/not-cached-pixtral"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download nobody-here/not-cached-pixtral") and err.count("\n") == 1
    assert "download it yourself" in err and not (tmp_path / "not-cached-pixtral-mlx").exists()


def test_repo_id_downloads_only_needed_files(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class Info:
        siblings = [type("S", (), {"rfilename": n})() for n in ("consolidated.safetensors", "params.json", "README.md")]

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo: Info())
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, allow_patterns: calls.append(allow_patterns) or str(tiny["official"]),
    )
    out = convert("mistralai/Pixtral-12B-2409", tmp_path / "out", progress=False)
    assert calls == [["consolidated.safetensors", "params.json", "tekken.json", "*.model.v*", "SYSTEM_PROMPT.txt"]]
    assert (out / "config.json").exists()
    assert default_output("mistralai/Pixtral-12B-2409", True, 4) == Path("Pixtral-12B-2409-mlx-4bit")
    assert default_output(str(tiny["hf"]) + "/", False, 4) == Path("hf-mlx")


def test_interrupt_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    write = ShardedWriter.write
    count = {"n": 0}

    def flaky(self, name, chunks):
        count["n"] += 1
        if count["n"] > 3:
            raise KeyboardInterrupt
        write(self, name, chunks)

    monkeypatch.setattr(ShardedWriter, "write", flaky)
    assert main([str(tiny["official"]), "-o", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == "interrupted: nothing was written\n"
    assert list(tmp_path.iterdir()) == []
    # With --force, an interrupted run keeps the previous conversion as it was.
    monkeypatch.undo()
    convert(tiny["official"], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(ShardedWriter, "write", flaky)
    count["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        convert(tiny["official"], out, force=True, dtype="float32", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_library_errors_are_conversion_errors(tiny, tmp_path):
    with pytest.raises(ConversionError, match="dtype"):
        convert(tiny["official"], tmp_path / "x", dtype="int8")
    with pytest.raises(ConversionError, match="would replace the source"):
        convert(tiny["official"], tiny["official"], force=True, progress=False)
    assert issubclass(ConversionError, ValueError)


def test_argument_aliases(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                str(tiny["official"]),
                "--mlx-path",
                str(out),
                "-q",
                "--q-bits",
                "8",
                "--q-group-size",
                "128",
                "--dtype",
                "float16",
                "--quiet",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert (config["bits"], config["group_size"]) == (8, 128)
    assert capsys.readouterr().err == ""
    assert main([str(tiny["official"]), "--quantize-vision"]) == 2  # needs -q: a usage error
    assert main(["--help"]) == 0


def test_command_line(tiny, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = [sys.executable, "-m", "pixtral_mlx.convert"]
    ok = subprocess.run(
        [*run, str(tiny["hf"]), "-o", str(tmp_path / "out"), "-q", "--bits", "8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[INFO] Saved" in ok.stdout and "bits per weight" in ok.stdout and "Traceback" not in ok.stderr
    bad = subprocess.run([*run, str(tmp_path / "nope")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    size = sum(f.stat().st_size for f in (tmp_path / "out").glob("model-*"))
    assert math.isclose(
        json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]["total_size"],
        size,
        rel_tol=0.01,
    )
