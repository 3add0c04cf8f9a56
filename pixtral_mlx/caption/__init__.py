"""`pixtral-mlx caption PATH...`: caption a whole collection of images, resumably, in batches, on one
machine or several (under `mlx.launch`).

- `sources`: the images of files, folders and `--files-from` lists, one sorted list without duplicates, and
  the inputs that cannot be used (reported one line each; they make the exit status 1).
- `outputs`: JSONL (one whole line per image, under a lock), stdout or sidecar files; what a resumed run
  skips; files we did not write are never changed.
- `cli`: the flags, their checks and the prompt template. `progress`: the progress line and Ctrl-C.
- `group`: several processes (MLX distributed): one output, written by rank 0.
- `run`: `main`, the work list and the batches (`Pixtral.stream_batch`, within the memory plan).

Importing this package imports neither MLX nor its modules: `main` loads `run` when called.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """`pixtral-mlx caption ARGS...`: see `pixtral_mlx.caption.run.main`."""
    from pixtral_mlx.caption.run import main

    return main(argv)
