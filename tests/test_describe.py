"""Generation equals transformers' greedy generate; the describe CLI, run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def pixtral_cli(*args: str, stdin: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 40, 3), dtype=np.uint8)).save(d / "portrait.png")
    Image.fromarray(rng.integers(0, 256, (30, 90, 3), dtype=np.uint8)).save(d / "wide.jpg")
    return d


def hf_greedy(hf_model, px, messages, n):
    import torch

    prompt = px.encode(messages)
    H = max(i.pixels.shape[1] for i in prompt.images)
    W = max(i.pixels.shape[2] for i in prompt.images)
    pv = np.zeros((len(prompt.images), 3, H, W), np.float32)
    for k, img in enumerate(prompt.images):
        pv[k, :, : img.pixels.shape[1], : img.pixels.shape[2]] = img.pixels
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor([prompt.tokens]),
            pixel_values=torch.from_numpy(pv),
            image_sizes=torch.tensor([i.pixels.shape[1:] for i in prompt.images]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=11,
        )
    return out[0, len(prompt.tokens) :].tolist()


def messages_for(paths, prompt="Describe this image."):
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": str(p)}} for p in paths]
            + [{"type": "text", "text": prompt}],
        }
    ]


@pytest.mark.parametrize("names", [["portrait.png"], ["portrait.png", "wide.jpg"]])
def test_greedy_equals_transformers(names, images, hf_model, pixtral, mlx_dir):
    n = 24
    paths = [images / x for x in names]
    prompt = "Describe this image." if len(names) == 1 else "Describe these images."
    ref = hf_greedy(hf_model, pixtral, messages_for(paths, prompt), n)
    reply = pixtral.generate(messages_for(paths, prompt), max_tokens=n, temperature=0.0)
    assert reply.tokens == [t for t in ref if t != 2][: len(reply.tokens)]
    assert len(reply.tokens) == len(ref) or ref[len(reply.tokens)] == 2
    # The CLI prints the same text.
    run = pixtral_cli("describe", *map(str, paths), "--model", str(mlx_dir), "--temp", "0", "--max-tokens", str(n))
    assert run.returncode == 0, run.stderr
    assert run.stdout == pixtral.encoder.decode(reply.tokens) + "\n"


def test_json_and_stats(images, mlx_dir, pixtral):
    run = pixtral_cli(
        "describe",
        str(images / "portrait.png"),
        "--model",
        str(mlx_dir),
        "--json",
        "--temp",
        "0",
        "--max-tokens",
        "5",
        "--verbose",
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["generation_tokens"] <= 5 and out["finish_reason"] in ("length", "stop")
    text = pixtral.encoder.text.encode("Describe this image.", bos=False, eos=False)
    assert out["prompt_tokens"] == 2 + 5 * 4 + len(text) + 1  # <s>[INST], 5 rows x (3+1), text, [/INST]
    assert out["prompt_tps"] > 0 and out["peak_memory"] > 0
    assert "portrait.png 40×70 → 48×80, 20 tokens" in run.stderr
    assert "Prompt: " in run.stderr and "Peak memory: " in run.stderr and "cpu" in run.stderr


def test_each_prints_one_line_per_image(images, mlx_dir):
    run = pixtral_cli(
        "describe",
        str(images / "portrait.png"),
        str(images / "wide.jpg"),
        str(images / "nope.png"),
        "--model",
        str(mlx_dir),
        "--each",
        "--max-tokens",
        "3",
        "--seed",
        "1",
    )
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert [x["image"].rsplit("/", 1)[-1] for x in lines] == ["nope.png", "portrait.png", "wide.jpg"]
    assert "no such file" in lines[0]["error"] and lines[1]["text"] and lines[2]["generation_tokens"] <= 3
    assert run.returncode == 1  # one image failed; the others were still captioned


def test_prompt_from_stdin(images, mlx_dir, pixtral):
    run = pixtral_cli(
        "describe",
        str(images / "portrait.png"),
        "--model",
        str(mlx_dir),
        "--prompt",
        "-",
        "--json",
        "--temp",
        "0",
        "--max-tokens",
        "4",
        stdin="What is this?\n",
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["prompt"] == "What is this?"
    expected = pixtral.generate(messages_for([images / "portrait.png"], "What is this?"), max_tokens=4, temperature=0)
    assert out["text"] == expected.text


def bad_inputs(tmp):
    (tmp / "text.png").write_text("not an image")
    (tmp / "cut.png").write_bytes((tmp / "ok.png").read_bytes()[:60])
    Image.new("1", (12000, 12000)).save(tmp / "bomb.png")
    return {
        "missing": ([str(tmp / "missing.jpg")], "no such file"),
        "directory": ([str(tmp)], "is a directory"),
        "text_as_png": ([str(tmp / "text.png")], "not an image"),
        "truncated": ([str(tmp / "cut.png")], "truncated or corrupt"),
        "bomb": ([str(tmp / "bomb.png")], "decompression bombs"),
        "unknown_model": ([str(tmp / "ok.png"), "--model", str(tmp / "no-model")], "no such folder"),
        "bad_repo": ([str(tmp / "ok.png"), "--model", "not a repo"], "not a Hugging Face repo id"),
        "max_edge": ([str(tmp / "ok.png"), "--max-edge", "4096"], "--max-edge"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "directory", "text_as_png", "truncated", "bomb", "unknown_model", "bad_repo", "max_edge"]
)
def test_bad_input_one_line_nonzero(case, tmp_path, mlx_dir):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.png")
    args, expected = bad_inputs(tmp_path)[case]
    if "--model" not in args:
        args = [*args, "--model", str(mlx_dir)]
    run = pixtral_cli("describe", *args)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr


def test_prompt_longer_than_context(images, mlx_dir):
    long = "word " * 140_000
    run = pixtral_cli("describe", str(images / "portrait.png"), "--model", str(mlx_dir), "--prompt", "-", stdin=long)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: the prompt is ")
    assert "131,072-token context" in run.stderr


def test_ctrl_c_prints_partial_and_exits_130(images, mlx_dir):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pixtral_mlx",
            "describe",
            str(images / "portrait.png"),
            "--model",
            str(mlx_dir),
            "--max-tokens",
            "100000",
            "--temp",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    # Wait for the first streamed text, then interrupt.
    first = proc.stdout.read(1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert first + out  # what was generated is printed
    assert "Traceback" not in err and "interrupted" in err
