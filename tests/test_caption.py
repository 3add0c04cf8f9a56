"""Batched generation equals one prompt at a time; the caption CLI (JSONL, sidecars, templates, resume after
SIGKILL/SIGTERM, bad images, progress, mlx.launch), run as real subprocesses on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
SIZES = [(40, 30), (64, 64), (100, 20), (33, 77), (20, 20), (50, 90), (28, 60), (70, 44)]
PROMPT = "Describe this image in one paragraph."  # caption's default
N = 6  # tokens per caption


def caption(*args: str, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", "caption", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=cwd,
    )


def make_folder(root: Path, n: int = len(SIZES), seed: int = 0) -> Path:
    """root/imgs with n tiny PNG/JPEGs in nested folders, one corrupt JPEG, a text file and a hidden image."""
    rng = np.random.default_rng(seed)
    d = root / "imgs"
    (d / "b" / "deep").mkdir(parents=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        sub = ["", "b", "b/deep"][i % 3]
        ext = "jpg" if i % 4 == 3 else "png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / sub / f"im{i:02d}.{ext}")
    (d / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.md").write_text("not an image")
    Image.new("RGB", (8, 8)).save(d / ".hidden.png")
    return d


def good_images(d: Path, cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in d.rglob("im*.*") if p.suffix in (".png", ".jpg"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def messages(image: str, prompt: str = PROMPT) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}],
        }
    ]


def expected(pixtral, cwd: Path, images: list[str], prompt=lambda image: PROMPT, **options) -> dict[str, dict]:
    out = {}
    for image in images:
        reply = pixtral.generate(
            messages(str(cwd / image), prompt(image)), **{"max_tokens": N, "temperature": 0, **options}
        )
        out[image] = {
            "image": image,
            "text": reply.text.strip(),
            "prompt_tokens": reply.prompt_tokens,
            "generation_tokens": reply.generation_tokens,
            "finish_reason": reply.finish_reason,
        }
    return out


def load_error(cwd: Path, image: str) -> str:
    """The one sentence `load_image` gives for an image (as the command names it)."""
    from pixtral_mlx.errors import ImageError
    from pixtral_mlx.images import load_image

    with pytest.raises(ImageError) as e:
        load_image(str(cwd / image))
    return str(e.value).replace(str(cwd / image), image)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    make_folder(root)
    return root


# The library: a batch decodes to what each prompt gives alone ------------------------------------
def random_messages(n: int) -> list[list[dict]]:
    rng = np.random.default_rng(1)
    out = []
    for w, h in SIZES[:n]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}])
    return out


def test_generate_batch_equals_generate_token_for_token(pixtral):
    msgs = random_messages(8)
    alone = [pixtral.generate(m, max_tokens=8, temperature=0) for m in msgs]
    together = pixtral.generate_batch(msgs, max_tokens=8, temperature=0)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.prompt_tokens for r in together] == [len(pixtral.encode(m)) for m in msgs]
    assert [(r.finish_reason, r.generation_tokens) for r in together] == [("length", 8)] * 8


def test_a_batch_encodes_its_rows_small_images_together(pixtral, monkeypatch):
    """A batch's new images go through the vision encoder together, consecutive rows up to VISION_BATCH_PATCHES
    patches a call (`memory.patch_groups`), and every reply is still token for token the prompt's alone."""
    import pixtral_mlx.memory as memory
    from pixtral_mlx.pipeline import Pixtral

    msgs = random_messages(4)
    patches = [pixtral.encode(m).images[0].patches for m in msgs]
    alone = [pixtral.generate(m, max_tokens=4, temperature=0).tokens for m in msgs]
    calls = []
    encode = pixtral.model.encode_images
    monkeypatch.setattr(pixtral.model, "encode_images", lambda imgs: calls.append(len(imgs)) or encode(imgs))
    together = Pixtral(pixtral.model, pixtral.encoder).generate_batch(msgs, max_tokens=4, temperature=0)
    assert calls == [4] and [r.tokens for r in together] == alone
    # Room for the first two rows' images in one call: the third starts the next, which the fourth's then passes.
    monkeypatch.setattr(memory, "VISION_BATCH_PATCHES", patches[0] + patches[1])
    assert patches[2] + patches[3] > patches[0] + patches[1]
    calls.clear()
    together = Pixtral(pixtral.model, pixtral.encoder).generate_batch(msgs, max_tokens=4, temperature=0)
    assert calls == [2, 1, 1] and [r.tokens for r in together] == alone


def test_the_batch_plan_counts_the_images_encoded_together(pixtral, monkeypatch):
    """`batch_bytes`' transient peak holds the vision encoder over each group of rows whose images go through it
    together (the sum of their plans' vision terms), not only the largest row's."""
    from dataclasses import replace

    from pixtral_mlx.memory import batch_bytes, estimate

    prompt = pixtral.encode(random_messages(1)[0])
    base = estimate(pixtral, prompt, keep=0, max_tokens=4, kv_bits=None, kv_group_size=64)
    small = replace(base, prefill=0, logits=0, batch_hidden=0, layer_dequant=0, features=0)
    mb = 1 << 20
    # 1000 + 1000 patches share a call; 3000 more would pass 4096, so the third row starts a group the fourth joins.
    plans = [replace(small, vision=v * mb, vision_patches=n) for v, n in ((10, 1000), (20, 1000), (70, 3000), (5, 500))]
    rest = batch_bytes([replace(p, vision=0) for p in plans], 0)  # weights, KV and features: no transient peak
    assert batch_bytes(plans, 0) == rest + 75 * mb  # groups [0, 1] (30 MB) and [2, 3] (75 MB)
    assert batch_bytes(plans[:2], 0) == batch_bytes([replace(p, vision=0) for p in plans[:2]], 0) + 30 * mb
    # an image past the limit alone: its own group, and the others' group after it
    plans[2] = replace(plans[2], vision_patches=5000)
    assert batch_bytes(plans, 0) == rest + 70 * mb


def test_each_sequence_stops_on_its_own(pixtral, monkeypatch):
    """Sequences leave the batch at different steps (end of sequence, and per-prompt context limits), and
    the others still decode exactly as alone."""
    msgs = random_messages(6)
    first = [pixtral.generate(m, max_tokens=8, temperature=0).tokens for m in msgs]
    eos = first[1][2]  # a token that ends sequence 1 at step 3 (and any other that emits it)
    monkeypatch.setattr(pixtral.encoder, "eos_id", eos)
    longest = max(len(pixtral.encode(m)) for m in msgs)
    monkeypatch.setattr(pixtral, "context_length", longest + 4)  # the longest prompt may generate 4 tokens
    alone = [pixtral.generate(m, max_tokens=8, temperature=0) for m in msgs]
    together = pixtral.generate_batch(msgs, max_tokens=8, temperature=0)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [(r.finish_reason, r.generation_tokens) for r in together] == [
        (r.finish_reason, r.generation_tokens) for r in alone
    ]
    reasons = {r.finish_reason for r in alone}
    lengths = {r.generation_tokens for r in alone}
    assert reasons == {"stop", "length"} and len(lengths) >= 3  # the test does exercise ragged stops
    assert alone[1].finish_reason == "stop" and alone[1].generation_tokens == 3


def test_batch_context_is_checked_before_any_work(pixtral, monkeypatch):
    from pixtral_mlx.errors import ContextError

    msgs = random_messages(3)
    monkeypatch.setattr(pixtral, "context_length", len(pixtral.encode(msgs[1])))
    runs = pixtral.vision_runs
    with pytest.raises(ContextError, match=r"^prompt 2 of 3: the prompt is "):
        pixtral.stream_batch(msgs, max_tokens=4)
    assert pixtral.vision_runs == runs


# The command ------------------------------------------------------------------------------------
def test_jsonl_batch_4_equals_batch_1_and_the_library(work, mlx_dir, pixtral):
    common = ["imgs", "--model", str(mlx_dir), "--temp", "0", "--max-tokens", str(N)]
    one = caption(*common, "-o", "one.jsonl", "--batch-size", "1", cwd=work)
    four = caption(*common, "-o", "four.jsonl", "--batch-size", "4", cwd=work)
    images = good_images(work / "imgs", work)
    want = expected(pixtral, work, images)
    bad = {"image": "imgs/b/corrupt.jpg", "error": load_error(work, "imgs/b/corrupt.jpg")}
    for run, name in ((one, "one.jsonl"), (four, "four.jsonl")):
        assert run.returncode == 1, run.stderr  # one image failed
        got = records(work / name)
        assert sorted(r["image"] for r in got) == sorted([*images, bad["image"]])  # one record each
        assert {r["image"]: r for r in got} == {**want, bad["image"]: bad}
        assert run.stderr.splitlines() == [f"error: {bad['error']}", "1 of 9 images failed."]  # no progress: no tty
    # JSONL on stdout when there is no --output.
    out = caption(*common, "--batch-size", "3", cwd=work)
    assert {r["image"]: r for r in map(json.loads, out.stdout.splitlines())} == {**want, bad["image"]: bad}


def test_kv_bits_and_json_schema_go_through_the_library(work, mlx_dir, pixtral):
    """Options the batched decode does not cover run image by image on the full turn path: same records as the
    library with the same options; under a schema every caption parses and validates."""
    schema = {"type": "object", "properties": {"kind": {"enum": ["photo", "drawing", "noise"]}}, "required": ["kind"],
              "additionalProperties": False}  # fmt: skip
    (work / "kind.schema.json").write_text(json.dumps(schema))
    common = ["imgs", "--model", str(mlx_dir), "--temp", "0", "--batch-size", "4"]
    images = good_images(work / "imgs", work)
    kv = caption(*common, "--max-tokens", str(N), "--kv-bits", "8", "--kv-group-size", "32", "-o", "kv.jsonl", cwd=work)
    assert kv.returncode == 1, kv.stderr  # the corrupt image
    got = {r["image"]: r for r in records(work / "kv.jsonl") if "error" not in r}
    assert got == expected(pixtral, work, images, kv_bits=8, kv_group_size=32)
    js = caption(*common, "--max-tokens", "30", "--json-schema", "kind.schema.json", "-o", "js.jsonl", cwd=work)
    assert js.returncode == 1, js.stderr
    got = [r for r in records(work / "js.jsonl") if "error" not in r]
    assert len(got) == len(images) and all(r["finish_reason"] == "stop" for r in got)
    assert all(json.loads(r["text"])["kind"] in ("photo", "drawing", "noise") for r in got)


def test_sidecars_and_templates(tmp_path, mlx_dir, pixtral):
    d = make_folder(tmp_path, n=4)
    (d / "im00.txt").write_text("red, square\n")  # tags the user already has
    template = "Tags: {existing}. File {name} ({stem}) in {folder}."
    run = caption(
        "imgs", "--sidecar", "--ext", ".caption", "-p", template, "--prefix", "sks, ", "--suffix", " .",
        "--model", str(mlx_dir), "--temp", "0", "--max-tokens", str(N), "--batch-size", "2", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1 and run.stderr.splitlines()[0].startswith("error: imgs/b/corrupt.jpg ")
    images = good_images(d, tmp_path)

    def prompt(image):
        p = Path(image)
        tags = "red, square" if p.stem == "im00" else ""
        return f"Tags: {tags}. File {p.name} ({p.stem}) in {p.parent.name}."

    want = expected(pixtral, tmp_path, images, prompt)
    for image in images:
        side = (tmp_path / image).with_suffix(".caption")
        assert side.read_text() == "sks, " + want[image]["text"] + " .\n"
    assert not (d / "b" / "corrupt.caption").exists()
    assert (d / "im00.txt").read_text() == "red, square\n"  # the user's file is untouched
    assert sorted(p.name for p in d.rglob("*.caption")) == sorted(Path(i).stem + ".caption" for i in images)
    assert not list(d.rglob("*.partial"))
    # Done images are skipped: a second run rewrites nothing and retries only the corrupt one.
    stamps = {p: p.stat().st_mtime_ns for p in d.rglob("*.caption")}
    again = caption("imgs", "--sidecar", "--ext", ".caption", "-p", template, "--model", str(mlx_dir), cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.splitlines()[-1] == "1 of 1 images failed."
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.caption")} == stamps


def _run_until_records(args: list[str], out: Path, cwd: Path, n: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixtral_mlx", "caption", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=cwd,
    )
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_kill_gives_one_record_per_image(sig, tmp_path, mlx_dir, pixtral):
    d = make_folder(tmp_path, n=12)
    out = tmp_path / "c.jsonl"
    args = ["imgs", "-o", str(out), "--model", str(mlx_dir), "--temp", "0", "--max-tokens", str(N), "--batch-size", "1"]
    proc = _run_until_records(args, out, tmp_path, 3)  # the corrupt image's record comes first (sorted)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    first = records(out)  # whole lines only
    assert 3 <= len(first) < 13  # it was stopped mid-run
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "interrupted: run the same command again" in proc.stderr.read()
    else:
        with out.open("a") as f:  # as if killed in the middle of writing a record
            f.write('{"image": "imgs/im05.png", "text": "half a rec')
    run = caption(*args, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    if sig == signal.SIGKILL:
        assert run.stderr.startswith("note: dropped the incomplete last line of ")
    got = records(out)
    captions = [r for r in first if "error" not in r]
    assert got[: len(captions)] == captions  # what was done stays, and is not redone (errors are retried)
    images = good_images(d, tmp_path)
    assert sorted(r["image"] for r in got) == sorted([*images, "imgs/b/corrupt.jpg"])
    want = expected(pixtral, tmp_path, images)
    assert {r["image"]: r for r in got if "error" not in r} == want


def test_overwrite_redoes_and_keeps_one_record(tmp_path, mlx_dir):
    make_folder(tmp_path, n=2)
    other = {"image": "elsewhere.png", "text": "kept", "prompt_tokens": 1, "generation_tokens": 1}
    (tmp_path / "c.jsonl").write_text(json.dumps(other) + "\n")
    args = ["imgs", "-o", "c.jsonl", "--model", str(mlx_dir), "--temp", "0", "--max-tokens", "2"]
    caption(*args, cwd=tmp_path)
    before = records(tmp_path / "c.jsonl")
    caption(*args, "--overwrite", "--max-tokens", "3", cwd=tmp_path)
    after = records(tmp_path / "c.jsonl")
    assert after[0] == other and len(after) == len(before) == 4
    assert sorted(r.get("generation_tokens", 0) for r in after[1:]) == [0, 3, 3]


def test_progress_only_on_a_terminal(tmp_path, mlx_dir):
    make_folder(tmp_path, n=2)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixtral_mlx", "caption", "imgs", "-o", "c.jsonl", "--model", str(mlx_dir),
         "--max-tokens", "2"],
        stdout=subprocess.DEVNULL, stderr=slave, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    os.close(slave)
    err = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        err += data
    proc.wait(timeout=60)
    os.close(master)
    text = err.decode()
    assert "0/3 images · 0.0 images/min · ETA --" in text
    assert "3/3 images · " in text and " images/min · ETA 0:00:00" in text


def bad_args(tmp: Path) -> dict:
    make_folder(tmp, n=1)
    (tmp / "notes.txt").write_text("my notes\nnot yours")
    return {
        "unknown field": (["imgs", "-p", "Describe {animal}."], "error: the prompt template uses {animal}; the fields "
                          "are {name}, {stem}, {folder}, {existing} (write {{ and }} for literal braces)."),
        "bad brace": (["imgs", "-p", "Describe {"], "error: the prompt template is malformed (Single '{' "
                      "encountered in format string); write {{ and }} for literal braces."),
        "batch size": (["imgs", "--batch-size", "0"],
                       "error: --batch-size must be a whole number of at least 1, got 0."),
        "no paths": (["--files-from", "empty.list"], "error: give image files or folders (or --files-from LIST)."),
        "no images": (["empty"], "error: no image files found in empty."),
        "not ours": (["imgs", "-o", "notes.txt"], "error: notes.txt is not a captions JSONL file (line 1 is not a "
                     "caption record); choose another --output or add --overwrite to replace it."),
        "existing": (["imgs", "--sidecar", "-p", "{existing}"], "error: {existing} reads the .txt sidecars that "
                     "--sidecar would replace; write the captions with another --ext (e.g. --ext .caption)."),
        "temp": (["imgs", "--temp", "-1"], "error: --temp must be a number of at least 0 (0 is greedy), got -1.0."),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["unknown field", "bad brace", "batch size", "not ours", "existing", "temp", "no paths", "no images"]
)
def test_bad_arguments_one_sentence_before_any_work(case, tmp_path):
    args, message = bad_args(tmp_path)[case]
    (tmp_path / "empty.list").write_text("# nothing\n")
    (tmp_path / "empty").mkdir()
    run = caption(*args, "--model", str(tmp_path / "no-model-needed"), cwd=tmp_path)
    assert (run.returncode, run.stderr.strip()) == (2, message)
    assert (tmp_path / "notes.txt").read_text() == "my notes\nnot yours"


def _free_port() -> int:
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def test_mlx_launch_two_processes_give_the_records_of_one(work, mlx_dir):
    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        launch = Path(shutil.which("mlx.launch") or "mlx.launch")
    args = ["imgs", "--model", str(mlx_dir), "--temp", "0", "--max-tokens", str(N), "--batch-size", "2"]
    single = caption(*args, "-o", "single.jsonl", cwd=work)
    run = subprocess.run(
        [str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()), "--",
         sys.executable, "-m", "pixtral_mlx", "caption", *args, "-o", "two.jsonl"],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=work,
    )  # fmt: skip
    assert single.returncode == 1
    # mlx.launch does not pass the status on; rank 0 reports, and no rank was stopped or failed.
    assert run.stderr.splitlines() == [f"error: {load_error(work, 'imgs/b/corrupt.jpg')}", "1 of 9 images failed."]
    two = records(work / "two.jsonl")
    assert two == records(work / "single.jsonl")  # the same records, in the same (sorted) order
    assert [r["image"] for r in two] == sorted(r["image"] for r in two)
