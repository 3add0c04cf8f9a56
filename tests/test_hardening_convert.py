"""The converter never loses or mixes up the user's files: --force, concurrent runs, SIGTERM, SIGKILL.

Everything runs `pixtral-mlx convert` as a real subprocess, as a user would meet it. To stop a
conversion at a known point, `paused_convert` runs the same CLI with `ShardedWriter.write` wrapped
(in the child only) so that it waits on a gate file after the third tensor.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}

PAUSED = """
import os, sys, time
from pixtral_mlx.conversion.save import ShardedWriter

write, gate, seen = ShardedWriter.write, sys.argv[1], [0]


def paused(self, name, chunks):
    write(self, name, chunks)
    seen[0] += 1
    if seen[0] == 3:
        print("paused", file=sys.stderr, flush=True)
        end = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.02)


ShardedWriter.write = paused
from pixtral_mlx.cli import main

sys.exit(main(["convert", *sys.argv[2:]]))
"""


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pixtral_mlx", "convert", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def paused_convert(gate: Path, *args: str | Path) -> subprocess.Popen:
    """The convert CLI, stopped after writing three tensors until `gate` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(gate), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    line = proc.stderr.readline()
    assert line == "paused\n", line + proc.stderr.read()
    return proc


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` (links not followed) with its bytes, or its kind."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = f"link to {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    return stderr.strip()


@pytest.fixture(scope="module")
def reference(hf_dir, tmp_path_factory):
    """What a clean conversion of the tiny checkpoint (default options) writes, file by file."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run = cli(hf_dir, "-o", out, "--quiet")
    assert run.returncode == 0, run.stderr
    return tree(out)


# --- --force replaces a previous conversion, never anything else ---------------------------------------


def _thesis(root: Path, out: Path, reference) -> None:
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")


def _thesis_among_model_files(root: Path, out: Path, reference) -> None:
    out.mkdir()
    for name, data in reference.items():
        (out / name).write_bytes(data)
    (out / "thesis.txt").write_text("notes kept next to the model")


def _subfolder(root: Path, out: Path, reference) -> None:
    _thesis_among_model_files(root, out, reference)
    (out / "thesis.txt").unlink()
    (out / "runs").mkdir()
    (out / "runs" / "results.csv").write_text("a,b\n1,2\n")


def _file(root: Path, out: Path, reference) -> None:
    out.write_text("the output name is a file")


def _symlink(root: Path, out: Path, reference) -> None:
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "thesis.txt").write_text("four years of work")
    out.symlink_to(root / "elsewhere")


def _config_only(root: Path, out: Path, reference) -> None:
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')


NOT_A_CONVERSION = {
    "thesis": (_thesis, "is not a model conversion (it holds thesis.txt)"),
    "thesis_among_model_files": (_thesis_among_model_files, "is not a model conversion (it holds thesis.txt)"),
    "subfolder": (_subfolder, "is not a model conversion (it holds runs)"),
    "file": (_file, "is a file, not a folder"),
    "symlink": (_symlink, "is a symbolic link"),
    "config_only": (_config_only, "is not a complete model conversion (it has no model.safetensors.index.json)"),
}


@pytest.mark.parametrize("case", list(NOT_A_CONVERSION))
def test_force_onto_a_folder_that_is_not_a_conversion_touches_nothing(case, hf_dir, reference, tmp_path):
    make, why = NOT_A_CONVERSION[case]
    root = tmp_path / "work"
    root.mkdir()
    out = root / "out"
    make(root, out, reference)
    before = tree(root)
    run = cli(hf_dir, "-o", out, "--force")
    assert run.returncode == 1
    assert one_error_line(run.stderr) == (
        f"error: output {out} {why}: --force replaces only a previous conversion, so choose another folder"
    )
    assert tree(root) == before  # the user's files, byte for byte, and nothing added beside them


def test_force_replaces_a_previous_conversion(hf_dir, reference, tmp_path):
    out = tmp_path / "out"
    assert cli(hf_dir, "-o", out, "--quiet", "--dtype", "float32").returncode == 0
    (out / ".DS_Store").write_bytes(b"Finder")  # Finder's file does not make it someone's folder
    assert tree(out) != reference
    run = cli(hf_dir, "-o", out, "--force")
    assert run.returncode == 0, run.stderr
    assert tree(out) == reference and os.listdir(tmp_path) == ["out"]


# --- two conversions into the same output ------------------------------------------------------------


def test_second_conversion_into_the_same_output_is_refused(hf_dir, reference, tmp_path):
    out, gate = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    first = paused_convert(gate, hf_dir, "-o", out, "--quiet")
    try:
        for flags in ([], ["--force"]):
            tic = time.monotonic()
            second = cli(hf_dir, "-o", out, "--quiet", *flags)
            took = time.monotonic() - tic
            assert second.returncode == 1
            assert one_error_line(second.stderr) == (
                f"error: another conversion is writing {out} (pid {first.pid}): wait for it or stop it"
            )
            assert took < 30, took  # fails fast: no waiting for the first one
    finally:
        gate.touch()
        _, err = first.communicate(timeout=120)
        gate.unlink()
    assert first.returncode == 0, err
    assert tree(out) == reference and os.listdir(tmp_path) == ["out"]


def test_two_conversions_started_at_once(hf_dir, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pixtral_mlx", "convert", str(hf_dir), "-o", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 1], results
    assert results[0][1] == ""
    loser = one_error_line(results[1][1])  # which one depends on when the loser reached the output
    # The holder writes its pid just after it takes the lock: a loser that comes in between names no pid.
    busy = re.fullmatch(
        rf"error: another conversion is writing {re.escape(str(out))}( \(pid \d+\))?: wait for it or stop it", loser
    )
    assert busy or loser == f"error: output {out} already exists: pass --force (force=True) to replace it", loser
    assert tree(out) == reference and os.listdir(tmp_path) == ["out"]


# --- SIGTERM and Ctrl-C clean up; a SIGKILLed run's leftovers are removed by the next run -----------------


@pytest.mark.parametrize(
    "sig, code, message",
    [
        (signal.SIGTERM, 143, "terminated: nothing was written"),
        (signal.SIGINT, 130, "interrupted: nothing was written"),
    ],
)
@pytest.mark.parametrize("force", [False, True])
def test_signal_mid_conversion_leaves_everything_as_it_was(sig, code, message, force, hf_dir, tmp_path):
    out, gate = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    if force:  # a previous conversion, which must survive the interrupted --force untouched
        assert cli(hf_dir, "-o", out, "--quiet", "--dtype", "float32").returncode == 0
    before = tree(tmp_path)
    proc = paused_convert(gate, hf_dir, "-o", out, "--quiet", *(["--force"] if force else []))
    assert any(p.name.startswith(f"out.partial-{proc.pid}-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err == message + "\n"
    assert tree(tmp_path) == before  # no partial folder, no lock file; the old conversion byte for byte


def test_killed_conversion_is_cleaned_up_by_the_next_run(hf_dir, reference, tmp_path):
    out, gate = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    proc = paused_convert(gate, hf_dir, "-o", out, "--quiet")
    proc.kill()
    proc.communicate(timeout=60)
    (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.partial-")]
    assert partial.name.startswith(f"out.partial-{proc.pid}-")
    assert sum(f.stat().st_size for f in partial.iterdir()) > 1 << 20  # three tensors' worth of shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.convert-lock", partial.name]
    run = cli(hf_dir, "-o", out)
    assert run.returncode == 0, run.stderr
    lines = [x for x in run.stderr.splitlines() if x.startswith("[")]
    assert lines[0].startswith("[INFO] Converting") and "Traceback" not in run.stderr
    assert lines[1] == f"[INFO] Removed {partial.name}, left in {tmp_path} by a killed conversion"
    assert tree(out) == reference and os.listdir(tmp_path) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_force_leftovers(hf_dir, reference, tmp_path):
    """A --force killed between setting the old conversion aside and removing it loses nothing."""
    out = tmp_path / "out"
    assert cli(hf_dir, "-o", out, "--quiet", "--dtype", "float32").returncode == 0
    previous = tree(out)
    # Killed after the set-aside, before the new one was in place: the old one is put back.
    old = tmp_path / f"out.old-{_dead_pid()}-0123abcd"
    out.rename(old)
    run = cli(hf_dir, "-o", out)
    assert run.returncode == 1
    assert run.stderr.splitlines()[1:] == [
        f"[INFO] Restored {out} from {old.name}, which a killed --force conversion left",
        f"error: output {out} already exists: pass --force (force=True) to replace it",
    ]
    assert tree(out) == previous and os.listdir(tmp_path) == ["out"]
    # Killed while removing the old one, the new one in place: the next run removes the rest.
    shutil.copytree(out, old)
    run = cli(hf_dir, "-o", out, "--force")
    assert run.returncode == 0, run.stderr
    assert f"[INFO] Removed {old.name}, left in {tmp_path} by a killed conversion" in run.stderr.splitlines()
    assert tree(out) == reference and os.listdir(tmp_path) == ["out"]


def test_partial_folder_of_a_running_process_is_reported_not_removed(hf_dir, reference, tmp_path):
    out = tmp_path / "out"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        other = tmp_path / f"out.partial-{alive.pid}-89abcdef"
        other.mkdir()
        (other / "model-00001-of-00001.safetensors").write_bytes(b"x" * 100)
        run = cli(hf_dir, "-o", out)
    finally:
        alive.kill()
        alive.wait()
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[1] == (
        f"[WARNING] Not removing {other.name} (pid {alive.pid} is running): "
        "delete it yourself if no conversion is running"
    )
    assert sorted(os.listdir(tmp_path)) == ["out", other.name] and tree(out) == reference
