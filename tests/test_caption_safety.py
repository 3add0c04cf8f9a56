"""The caption command never destroys or fakes results: files it did not write stay as they are (refused
before they are touched), temp files are its own, every input it cannot use is reported and fails the run,
a NUL byte in a list is one sentence, and batches respect the memory plan. `main()` runs in-process (so
that a test can make a folder unreadable while running as root, or watch the batches) on the tiny model."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.caption import run as cap
from pixtral_mlx.cli import flag_message
from pixtral_mlx.memory import batch_bytes
from pixtral_mlx.pipeline import Pixtral

OURS = {"image": "elsewhere.png", "text": "kept", "prompt_tokens": 1, "generation_tokens": 1}


@pytest.fixture
def run(monkeypatch, capsys):
    """`run(*args, cwd=...)`: the caption command in-process: (exit status, stdout, stderr lines)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def go(*args: str, cwd: Path) -> tuple[int, str, list[str]]:
        monkeypatch.chdir(cwd)
        code = cap.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err.splitlines()

    yield go
    for s, handler in handlers.items():  # main() installs its own
        signal.signal(s, handler)


def images(root: Path, names=("a.png", "b.png"), seed: int = 0) -> Path:
    """root/imgs with a few tiny random images (sub/ folders as the names say)."""
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = root / "imgs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = [(40, 30), (64, 64), (100, 20), (33, 77)][i % 4]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root / "imgs"


def model_args(mlx_dir: Path) -> list[str]:
    return ["--model", str(mlx_dir), "--temp", "0", "--max-tokens", "4"]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its bytes (files) or its kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else _kind(p)
    return out


def _kind(p: Path) -> str:
    mode = p.lstat().st_mode
    return "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "fifo" if stat.S_ISFIFO(mode) else "?"


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A JSONL file we did not write ------------------------------------------------------------------
FOREIGN_FILES = {
    # Another tool's JSON lines without a final newline: the last line used to be cut before the refusal.
    "other tool": (b'{"file": "a.png", "caption": "a cat"}\n{"file": "b.png", "caption": "a dog"}', 1),
    "image field": (b'{"image": "a.png", "caption": "a cat"}\n{"image": "b.png", "caption": "a d', 1),
    "ours, then not": (json.dumps(OURS).encode() + b'\n{"image": "b.png", "label": 3}\n', 2),
    "ours, then a tail not ours": (json.dumps(OURS).encode() + b"\nfree text", 2),
    "only a torn record": (b'{"image": "imgs/a.png", "text": "half a rec', 1),
    "blank lines": (b"\n\n", 1),
    "notes": (b"my notes\nnot yours", 1),
}


@pytest.mark.parametrize("case", list(FOREIGN_FILES))
def test_a_file_we_did_not_write_is_refused_before_it_is_touched(case, tmp_path, run):
    images(tmp_path)
    data, line = FOREIGN_FILES[case]
    other = tmp_path / "other.jsonl"
    other.write_bytes(data)
    os.utime(other, ns=(1_000_000_000, 1_000_000_000))
    before = tree(tmp_path)
    code, out, err = run("imgs", "-o", "other.jsonl", "--model", str(tmp_path / "no-model-needed"), cwd=tmp_path)
    assert (code, out, err) == (
        2,
        "",
        [
            f"error: other.jsonl is not a captions JSONL file (line {line} is not a caption record); "
            "choose another --output or add --overwrite to replace it."
        ],
    )
    assert tree(tmp_path) == before  # nothing cut, nothing created
    assert other.stat().st_mtime_ns == 1_000_000_000


def test_a_torn_record_of_ours_is_cut_then_the_run_goes_on(tmp_path, mlx_dir, run):
    images(tmp_path)
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps(OURS) + '\n{"image": "imgs/a.png", "text": "half a rec')
    code, _, err = run("imgs", "-o", "c.jsonl", *model_args(mlx_dir), cwd=tmp_path)
    assert code == 0
    assert err == ["note: dropped the incomplete last line of c.jsonl (a run was stopped while writing it)."]
    got = records(out)
    assert got[0] == OURS and sorted(r["image"] for r in got[1:]) == ["imgs/a.png", "imgs/b.png"]
    assert all(r["generation_tokens"] == 4 for r in got[1:])


# Temp files are our own --------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["ours", "not ours"])
def test_overwrite_rewrites_through_a_temp_file_of_its_own(start, tmp_path, mlx_dir, run):
    """--overwrite rewrites the JSONL file (ours: without the redone records; not ours: from nothing) through
    a new temp file: the user's files named like the old fixed temp file stay, and the mode is kept."""
    images(tmp_path)
    out = tmp_path / "c.jsonl"
    out.write_text(json.dumps(OURS) + "\n" if start == "ours" else "id,caption\n1,a cat\n")
    out.chmod(0o640)
    for name in ("c.jsonl.partial", ".c.jsonl.partial", ".c.jsonl.tmp"):
        (tmp_path / name).write_text(f"the user's {name}\n")
    code, _, err = run("imgs", "-o", "c.jsonl", "--overwrite", *model_args(mlx_dir), cwd=tmp_path)
    assert code == 0
    if start == "ours":
        assert err == []
        code, _, err = run("imgs", "-o", "c.jsonl", "--overwrite", *model_args(mlx_dir), cwd=tmp_path)
        assert (code, err) == (0, [])
    else:
        assert err == ["note: replacing c.jsonl, which is not a captions JSONL file (--overwrite)."]
    got = records(out)
    kept = [OURS] if start == "ours" else []
    assert got[: len(kept)] == kept and sorted(r["image"] for r in got[len(kept) :]) == ["imgs/a.png", "imgs/b.png"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    for name in ("c.jsonl.partial", ".c.jsonl.partial", ".c.jsonl.tmp"):
        assert (tmp_path / name).read_text() == f"the user's {name}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        ["c.jsonl", "c.jsonl.partial", ".c.jsonl.partial", ".c.jsonl.tmp"]
    )  # no temp file left


@pytest.mark.parametrize("overwrite", [False, True])
def test_sidecars_go_through_a_temp_file_of_their_own(overwrite, tmp_path, mlx_dir, run):
    d = images(tmp_path)
    (d / ".a.txt.partial").write_text("the user's\n")  # the old fixed temp name
    if overwrite:
        (d / "a.txt").write_text("an old caption\n")
    flags = ["--overwrite"] if overwrite else []
    code, _, err = run("imgs", "--sidecar", *flags, *model_args(mlx_dir), cwd=tmp_path)
    assert (code, err) == (0, [])
    assert (d / ".a.txt.partial").read_text() == "the user's\n"
    assert sorted(p.name for p in d.iterdir()) == [".a.txt.partial", "a.png", "a.txt", "b.png", "b.txt"]
    for name in ("a.txt", "b.txt"):
        assert (d / name).read_text() not in ("", "an old caption\n")
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o666 & ~umask()


def test_a_sidecar_that_appears_meanwhile_is_left_as_it_is(tmp_path, mlx_dir, run, monkeypatch):
    d = images(tmp_path)
    write = cap.SidecarOutput.write

    def user_saves_first(self, record):
        if record["image"] == "imgs/a.png":
            (d / "a.txt").write_text("the user's own\n")
        write(self, record)

    monkeypatch.setattr(cap.SidecarOutput, "write", user_saves_first)
    code, _, err = run("imgs", "--sidecar", *model_args(mlx_dir), cwd=tmp_path)
    assert code == 1
    assert err == [
        "error: imgs/a.txt appeared while imgs/a.png was being captioned; it was left as it is.",
        "1 of 2 images failed.",
    ]
    assert (d / "a.txt").read_text() == "the user's own\n"
    assert sorted(p.name for p in d.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt"]


@pytest.mark.parametrize("there", [False, True])
def test_without_hard_links_a_sidecar_is_still_never_written_over_a_file(there, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "a.txt"
    if there:
        target.write_text("the user's own\n")
    output = cap.SidecarOutput(".txt")
    record = {"image": str(tmp_path / "a.png"), "text": "a caption"}
    if there:
        with pytest.raises(cap.RecordError, match=r"a\.txt appeared while .*a\.png was being captioned"):
            output.write(record)
    else:
        output.write(record)
    assert target.read_text() == ("the user's own\n" if there else "a caption\n")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# Every input that cannot be used is reported, and fails the run ----------------------------------
def test_an_unreadable_folder_is_reported_and_fails_the_run(tmp_path, mlx_dir, run, monkeypatch):
    images(tmp_path, ["a.png", "sub/b.png", "sub/deeper/c.png"])
    locked = (tmp_path / "imgs" / "sub").resolve()
    scandir = os.scandir

    def scandir_as_if_chmod_000(path="."):
        if Path(os.fsdecode(path)).resolve() == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_as_if_chmod_000)
    skipped = ["skipped: imgs/sub: the folder cannot be read (Permission denied).", "1 input was skipped (see above)."]
    code, _, err = run("imgs", "-o", "c.jsonl", *model_args(mlx_dir), cwd=tmp_path)
    assert (code, err) == (1, skipped)
    assert [r["image"] for r in records(tmp_path / "c.jsonl")] == ["imgs/a.png"]
    # Nothing left to do but the folder: still reported, still a failure.
    assert run("imgs", "-o", "c.jsonl", *model_args(mlx_dir), cwd=tmp_path)[::2] == (1, skipped)
    # Only that folder: nothing to caption.
    code, _, err = run("imgs/sub", "-o", "d.jsonl", *model_args(mlx_dir), cwd=tmp_path)
    assert (code, err) == (2, [skipped[0], "error: no image files found in imgs/sub."])


@pytest.mark.parametrize("kind", ["dir", "fifo", "link"])
def test_a_sidecar_path_that_is_not_a_file_is_not_a_caption(kind, tmp_path, mlx_dir, run):
    d = images(tmp_path)
    side = d / "a.txt"
    {"dir": side.mkdir, "fifo": lambda: os.mkfifo(side), "link": lambda: side.symlink_to("nowhere.txt")}[kind]()
    skipped = [
        "skipped: imgs/a.png: its sidecar imgs/a.txt is there but is not a regular file.",
        "1 input was skipped (see above).",
    ]
    for flags in ([], ["--overwrite"]):
        code, _, err = run("imgs", "--sidecar", *flags, *model_args(mlx_dir), cwd=tmp_path)
        assert (code, err) == (1, skipped)
        assert _kind(side) == kind and not (d / "nowhere.txt").exists()
        assert (d / "b.txt").read_text().strip()
        assert sorted(p.name for p in d.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt"]


def test_a_nul_byte_in_a_list_refuses_the_run_naming_the_line(tmp_path, run):
    images(tmp_path)
    (tmp_path / "list.txt").write_bytes(b"imgs/a.png\n# a comment\nimgs/b\0.png\nimgs/b.png\n")
    code, out, err = run("--files-from", "list.txt", "-o", "c.jsonl", "--model", "no-model-needed", cwd=tmp_path)
    assert (code, out, err) == (
        2,
        "",
        ["error: line 3 of --files-from list.txt holds a NUL byte; give one path a line."],
    )
    assert not (tmp_path / "c.jsonl").exists()


# Batches follow the memory plan -----------------------------------------------------------------
def spy(monkeypatch, cls, name: str) -> list:
    """Record the first argument of every call of cls.name (then call it)."""
    calls = []
    original = getattr(cls, name)

    def wrapper(self, first, *args, **kwargs):
        calls.append(first)
        return original(self, first, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)
    return calls


def decoded_batches(monkeypatch) -> list:
    """The rows of every batched decode the library runs (its groups of rows that fit together)."""
    from pixtral_mlx import pipeline

    calls, original = [], pipeline.stream_batch

    def wrapper(model, detokenizers, prompts, *args, **kwargs):
        calls.append(prompts)
        return original(model, detokenizers, prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline, "stream_batch", wrapper)
    return calls


SIZES = ("a.png", "b.png", "sub/c.png", "sub/d.png")


def test_a_batch_that_would_not_fit_is_decoded_in_smaller_groups(tmp_path, mlx_dir, run, monkeypatch):
    images(tmp_path, SIZES)
    plans = []
    plan = cap._memory_plan

    def kept_plan(*args):
        plans.append(plan(*args))
        return plans[-1]

    monkeypatch.setattr(cap, "_memory_plan", kept_plan)
    batches = decoded_batches(monkeypatch)
    common = ["imgs", *model_args(mlx_dir), "--batch-size", "4"]
    assert run(*common, "-o", "whole.jsonl", cwd=tmp_path)[::2] == (0, [])
    assert [len(b) for b in batches] == [4]
    # A limit each image fits under alone, but no two together.
    alone = max(p.total for p in plans)
    pairs = min(batch_bytes([p, q], 0) for i, p in enumerate(plans) for q in plans[i + 1 :])
    assert alone < pairs
    monkeypatch.setenv("PIXTRAL_MLX_MEMORY_LIMIT", repr((alone + pairs) / 2 / 1e9))
    batches.clear()
    code, _, err = run(*common, "-o", "split.jsonl", cwd=tmp_path)
    assert (code, err) == (
        0,
        ["note: a batch would not fit in memory as a whole; its images are decoded in smaller groups."],
    )
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    whole, split = records(tmp_path / "whole.jsonl"), records(tmp_path / "split.jsonl")
    assert sorted(split, key=lambda r: r["image"]) == sorted(whole, key=lambda r: r["image"])
    # Room for two at a time (a, b then c, d), never three: groups of two.
    two = max(batch_bytes(plans[:2], 0), batch_bytes(plans[2:4], 0))
    three = min(batch_bytes(plans[i : i + 3], 0) for i in (0, 1))
    assert two < three
    monkeypatch.setenv("PIXTRAL_MLX_MEMORY_LIMIT", repr((two + three) / 2 / 1e9))
    batches.clear()
    assert run(*common, "-o", "pairs.jsonl", cwd=tmp_path)[0] == 0
    assert [len(b) for b in batches] == [2, 2]
    assert sorted(records(tmp_path / "pairs.jsonl"), key=lambda r: r["image"]) == sorted(
        whole, key=lambda r: r["image"]
    )


@pytest.mark.parametrize("path", ["batched", "one by one"])
def test_an_image_that_does_not_fit_alone_fails_with_the_plans_sentence(path, tmp_path, mlx_dir, run, pixtral,
                                                                       monkeypatch):  # fmt: skip
    from pixtral_mlx.errors import MemoryPlanError

    images(tmp_path)
    kv = ["--kv-bits", "8", "--kv-group-size", "32"] if path == "one by one" else []
    monkeypatch.setenv("PIXTRAL_MLX_MEMORY_LIMIT", "0.001")  # 1 MB: less than the weights
    batches, singles = spy(monkeypatch, Pixtral, "stream_batch"), spy(monkeypatch, Pixtral, "stream")
    code, _, err = run("imgs", "-o", "c.jsonl", *model_args(mlx_dir), *kv, cwd=tmp_path)
    assert code == 1 and batches == [] and singles == []
    got = records(tmp_path / "c.jsonl")
    assert [r["image"] for r in got] == ["imgs/a.png", "imgs/b.png"]
    for r in got:
        # The sentence the library's turn path gives for the same image and options.
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / r["image"])}},
                                             {"type": "text", "text": cap.DEFAULT_PROMPT}]}]  # fmt: skip
        options = {"kv_bits": 8, "kv_group_size": 32} if kv else {}
        with pytest.raises(MemoryPlanError) as e:
            pixtral.generate(msgs, max_tokens=4, temperature=0, **options)
        assert r == {"image": r["image"], "error": f"{r['image']}: {flag_message(e.value)}"}
        assert "PIXTRAL_MLX_MEMORY_LIMIT" in r["error"]
    assert err == [f"error: {r['error']}" for r in got] + ["2 of 2 images failed."]
