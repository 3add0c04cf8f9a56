"""`pixtral-mlx caption PATH...`: caption a whole collection of images, resumably, in batches, on one
machine or several (under `mlx.launch`).

- Images: files, folders (recursive, image files only, hidden entries skipped) and `--files-from`, as one
  sorted list without duplicates. An image's key is its path as given or found, normalized
  (`os.path.normpath`), never resolved: it is what the records hold and what a resumed run matches.
- Output: JSONL (one object per image, appended with a single `write()` + fsync under an exclusive lock,
  so a killed run leaves only whole lines) or sidecar files. A record is written as soon as its image is
  done. The next run skips the images that have a record (error records are retried); `--overwrite`
  redoes them.
- Files we did not write are never changed: an existing JSONL file must hold only caption records (else
  the run refuses before touching it, unless `--overwrite` replaces it); only then is a torn last record
  (a run killed while writing it) cut away. Rewrites and sidecars go to a temp file of our own
  (`mkstemp`, next to the target), renamed into place; without `--overwrite` a sidecar that appeared
  meanwhile is left as it is.
- Inputs that cannot be used (an unreadable folder, a sidecar path that is not a regular file) are
  reported one line each and make the exit status 1; they are never silently passed over.
- Batches: `Pixtral.stream_batch` decodes `--batch-size` images together (at temperature 0, exactly the
  text one image at a time gives), fewer where the memory plan says the batch would not fit; an image
  whose own plan does not fit fails with the plan's sentence, as a single turn would.
- Several processes: under `mlx.launch` (MLX distributed, e.g. the ring backend), rank 0 lists the work,
  every rank takes every size-th image of it, and after each batch the records travel to rank 0 through
  `all_gather`, which writes them, in sorted order: one output, resumable as a single run is.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import stat
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .cli import add_model_args, add_structured_args, check_model_args, check_structured_args

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in one paragraph."
FIELDS = ("name", "stem", "folder", "existing")
DEFAULT_BATCH = 4


class UsageError(Exception):
    """Bad arguments or an output we must not touch: one sentence, exit 2, before any work."""


class OutputError(Exception):
    """The output cannot be opened or written: one sentence, exit 1."""


class RecordError(Exception):
    """One record could not be written (its image counts as failed); the run goes on."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx caption",
        description="Caption every image of files and folders with Pixtral-12B, in batches. Records are written "
        "as each image finishes; run the same command again to finish an interrupted run.",
        epilog="Examples:\n"
        "  pixtral-mlx caption dataset/ --sidecar --prefix 'photo of sks, '    # name.txt next to each image\n"
        "  pixtral-mlx caption ~/Pictures -o library.jsonl                     # one JSON line per image\n"
        "  pixtral-mlx caption scans/ -o ocr.jsonl --max-edge 1024 \\\n"
        "      --prompt 'Transcribe all the text in this image.' --max-tokens 1024\n"
        "  mlx.launch -n 2 -- pixtral-mlx caption photos/ -o captions.jsonl       # two processes, one output\n\n"
        "Prompt templates may use {name} (file name), {stem} (name without extension), {folder} (the folder's\n"
        "name) and {existing} (the text of the image's existing .txt sidecar, e.g. tags; empty if none).\n"
        "Exit status: 0 when every image was captioned, 1 when any failed, 130/143 when interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders (searched recursively)")
    p.add_argument("--files-from", metavar="LIST", help="read more paths from LIST, one a line ('-' is stdin)")
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--output", "-o", metavar="FILE", help="append one JSON line per image to FILE (default: stdout, no resume)"
    )
    out.add_argument("--sidecar", action="store_true", help="write each caption to a text file next to its image")
    p.add_argument("--ext", default=".txt", help="the sidecar files' extension (default .txt)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", "-p", help=f"prompt template (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", metavar="F", help="read the prompt template from file F")
    p.add_argument("--prefix", default="", help="text put before every caption (e.g. a trigger word)")
    p.add_argument("--suffix", default="", help="text put after every caption")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"images decoded together (default {DEFAULT_BATCH}); greedy captions do not depend on it",
    )
    p.add_argument("--overwrite", action="store_true", help="caption again the images that already have a caption")
    add_model_args(p)
    add_structured_args(p)
    return p


# Images -------------------------------------------------------------------------------------------
def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("data:")


def find_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """Every image under `paths` (folders recursively, image suffixes only, hidden entries skipped), sorted,
    each once, and a sentence for each folder that could not be read. Paths that are not folders are kept
    as given: a missing or unreadable one becomes an error record, not a failed run."""
    found: set[str] = set()
    unreadable: list[str] = []

    def skip(e: OSError) -> None:
        folder = os.path.normpath(e.filename) if e.filename else "a folder"
        unreadable.append(f"{folder}: the folder cannot be read ({_os_message(e)}).")

    for given in paths:
        if not _is_url(given) and os.path.isdir(given):
            for root, dirs, files in os.walk(given, onerror=skip):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in files:
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                        found.add(os.path.normpath(os.path.join(root, f)))
        else:
            found.add(given if _is_url(given) else os.path.normpath(given))
    return sorted(found), unreadable


def read_list(source: str) -> list[str]:
    """The paths of a list, one a line (blank lines and # comments skipped); a NUL byte refuses the list."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--files-from {source} cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    paths = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise UsageError(f"line {n} of --files-from {source} holds a NUL byte; give one path a line.")
        paths.append(line)
    return paths


def sidecar_path(image: str, ext: str) -> Path:
    p = Path(image)
    return p.with_name(p.stem + ext)


# Prompt templates ---------------------------------------------------------------------------------
class Template:
    """A prompt with `{name}`, `{stem}`, `{folder}`, `{existing}` fields, checked when made."""

    def __init__(self, text: str, existing_ext: str = ".txt"):
        self.text, self.existing_ext = text, existing_ext
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise UsageError(
                f"the prompt template is malformed ({e}); write {{{{ and }}}} for literal braces."
            ) from None
        self.fields = set()
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field not in FIELDS or spec or conversion:
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                raise UsageError(
                    f"the prompt template uses {shown}; the fields are "
                    + ", ".join("{" + f + "}" for f in FIELDS)
                    + " (write {{ and }} for literal braces)."
                )
            self.fields.add(field)
        if not text.strip():
            raise UsageError("the prompt is empty.")

    def render(self, image: str) -> str:
        if not self.fields:
            return self.text
        p = Path(image)
        values = {"name": p.name, "stem": p.stem, "folder": p.resolve().parent.name, "existing": ""}
        if "existing" in self.fields:
            existing = sidecar_path(image, self.existing_ext)
            if existing.is_file():
                values["existing"] = existing.read_text(encoding="utf-8", errors="replace").strip()
        return self.text.format(**values)


# Outputs ------------------------------------------------------------------------------------------
RECORD_START = b'{"image": "'  # how every line caption writes begins (json.dumps of a record, "image" first)


def _os_message(e: OSError) -> str:
    return e.strerror or str(e)


def _is_record(line: bytes) -> bool:
    """A line caption writes: a caption (image, text, token counts) or an error (image, error)."""
    try:
        r = json.loads(line)
    except ValueError:
        return False
    if not isinstance(r, dict) or not isinstance(r.get("image"), str):
        return False
    counts = all(isinstance(r.get(k), int) for k in ("prompt_tokens", "generation_tokens"))
    return isinstance(r.get("error"), str) or (isinstance(r.get("text"), str) and counts)


def _temp_next_to(target: str | Path) -> tuple[int, str]:
    """A new file of our own next to `target` (created exclusively: never an existing path), and its fd."""
    folder, name = os.path.split(os.path.abspath(target))
    return tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class JsonlOutput:
    """Append-only JSONL: one whole line per `write()` + fsync, under an exclusive lock held for the run.

    A file that is there already must be ours (every line a caption record) before anything is changed in
    it; else the run refuses, or with `overwrite` replaces it."""

    def __init__(self, path: str, overwrite: bool = False):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if os.path.lexists(path) and not os.path.isfile(path):
            raise OutputError(f"{path} is not a regular file; choose another --output.")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise OutputError(f"cannot open {path} ({_os_message(e)}).") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise OutputError(
                f"another caption run is writing {path}; wait for it or choose another --output."
            ) from None
        try:
            self._load(overwrite)
        except BaseException:
            os.close(self.fd)
            raise

    def _read(self) -> bytes:
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            return f.read()

    def _load(self, overwrite: bool) -> None:
        data = self._read()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        bad = next((n for n, line in enumerate(lines, 1) if not _is_record(line)), None)
        if bad is None and tail and not (lines and tail.startswith(RECORD_START)):
            bad = len(lines) + 1  # a last line that is not a record of ours cut short
        if bad is not None:
            if not overwrite:
                raise UsageError(
                    f"{self.path} is not a captions JSONL file (line {bad} is not a caption record); "
                    "choose another --output or add --overwrite to replace it."
                )
            print(f"note: replacing {self.path}, which is not a captions JSONL file (--overwrite).", file=sys.stderr)
            self._rewrite(b"")
            return
        if tail:
            try:
                os.ftruncate(self.fd, len(data) - len(tail))
                os.fsync(self.fd)
            except OSError as e:
                raise OutputError(f"cannot repair {self.path} ({_os_message(e)}).") from None
            print(f"note: dropped the incomplete last line of {self.path} (a run was stopped while writing it).",
                  file=sys.stderr)  # fmt: skip
        for line in lines:
            record = json.loads(line)
            if "error" not in record or record["image"] not in self.records:
                self.records[record["image"]] = record

    def _rewrite(self, data: bytes) -> None:
        """Replace the file with `data`: a temp file of our own, locked, then renamed over it."""
        fd, tmp = None, None
        try:
            fd, tmp = _temp_next_to(self.path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            os.fchmod(fd, stat.S_IMODE(os.fstat(self.fd).st_mode))
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            _remove(tmp)
            if fd is not None:
                os.close(fd)
            raise OutputError(f"cannot rewrite {self.path} ({_os_message(e)}).") from None
        os.close(self.fd)
        self.fd = fd

    def done(self, image: str) -> bool:
        record = self.records.get(image)
        return record is not None and "error" not in record

    def forget(self, images: set[str]) -> None:
        """Drop these images' records (to redo them): the file is rewritten without them."""
        if not images & self.records.keys():
            return
        lines = self._read().splitlines(keepends=True)
        self._rewrite(b"".join(line for line in lines if json.loads(line)["image"] not in images))
        for image in images:
            self.records.pop(image, None)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # never leave part of a line
            except OSError:
                pass
            raise OutputError(f"cannot write to {self.path} ({_os_message(e)}).") from None
        self.records[record["image"]] = record

    def close(self) -> None:
        os.close(self.fd)


class StdoutOutput:
    """JSON lines on stdout: nothing to resume from."""

    def done(self, image: str) -> bool:
        return False

    def forget(self, images: set[str]) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        print(json.dumps(record, ensure_ascii=False), flush=True)

    def close(self) -> None:
        pass


class SidecarOutput:
    """A text file next to each image: written to a temp file of our own, then moved into place. Without
    `overwrite` it is linked there, which fails rather than replace a file that appeared meanwhile."""

    def __init__(self, ext: str, overwrite: bool = False):
        self.ext, self.overwrite = ext, overwrite
        umask = os.umask(0)
        os.umask(umask)
        self.mode = 0o666 & ~umask  # what open() would have given the file

    def done(self, image: str) -> bool:
        return sidecar_path(image, self.ext).is_file()

    def forget(self, images: set[str]) -> None:
        pass  # a sidecar is replaced when its new caption is written

    def write(self, record: dict[str, Any]) -> None:
        if "error" in record:
            return
        target = sidecar_path(record["image"], self.ext)
        tmp = None
        try:
            fd, tmp = _temp_next_to(target)
            with open(fd, "w", encoding="utf-8") as f:
                os.fchmod(fd, self.mode)
                f.write(record["text"] + "\n")
                f.flush()
                os.fsync(fd)
            self._place(tmp, target)
            tmp = None
        except FileExistsError:
            raise RecordError(
                f"{target} appeared while {record['image']} was being captioned; it was left as it is."
            ) from None
        except OSError as e:
            raise OutputError(f"cannot write {target} ({_os_message(e)}).") from None
        finally:
            _remove(tmp)

    def _place(self, tmp: str, target: Path) -> None:
        """Move our temp file to `target`; without --overwrite, never over a file that appeared meanwhile."""
        if not self.overwrite:
            try:
                os.link(tmp, target)  # unlike a rename, fails when `target` exists
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if os.path.lexists(target):  # a file system without hard links: a last check, then a rename
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
            else:
                os.unlink(tmp)
                return
        os.replace(tmp, target)

    def close(self) -> None:
        pass


# Progress -----------------------------------------------------------------------------------------
class Progress:
    """`done/total · images/min · ETA` on stderr, rewritten in place; only when stderr is a terminal."""

    def __init__(self, total: int, skipped: int):
        self.total, self.skipped, self.done = total, skipped, 0
        self.enabled = sys.stderr.isatty()
        self.tic = time.perf_counter()
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.tic
        rate = self.done / elapsed * 60 if self.done and elapsed > 0 else 0.0
        left = self.total - self.skipped - self.done
        eta = f"ETA {_clock(left / rate * 60)}" if rate else "ETA --"
        line = f"{self.skipped + self.done}/{self.total} images · {rate:.1f} images/min · {eta}"
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    def add(self, n: int) -> None:
        self.done += n
        self.show()

    def say(self, message: str) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr)
        print(message, file=sys.stderr, flush=True)
        self.show()

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# Stopping -----------------------------------------------------------------------------------------
class Stop:
    """SIGINT/SIGTERM: the first one asks to stop after the records in progress are written; a second
    one stops at once (a record is one `write()`, so none is torn either way)."""

    def __init__(self) -> None:
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def code(self) -> int:
        return 128 + self.signum if self.signum else 0


# Several processes --------------------------------------------------------------------------------
class Group:
    """MLX distributed (`mlx.launch`): rank, size and an all-gather of bytes; one process: size 1."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1

    def gather(self, payload: Any) -> list[Any]:
        """Every rank's JSON-able `payload`, in rank order (a collective: every rank must call it)."""
        if self.size == 1:
            return [payload]
        import mlx.core as mx
        import numpy as np

        data = json.dumps(payload).encode()
        sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=self.group, stream=mx.cpu)
        sizes = sizes.tolist()
        buf = np.zeros(max(max(sizes), 1), dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        every = mx.distributed.all_gather(mx.array(buf), group=self.group, stream=mx.cpu)
        rows = np.array(every).reshape(self.size, -1)
        return [json.loads(rows[r, : sizes[r]].tobytes()) for r in range(self.size)]


# The run ------------------------------------------------------------------------------------------
def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _skip(message: str) -> None:
    print(f"skipped: {message}", file=sys.stderr, flush=True)


def _plan(args: argparse.Namespace) -> tuple[Any, list[tuple[str, str, str | None]], int, int, int]:
    """Rank 0's work list: the output, the (image, prompt, error) triples still to do, the total, the images
    already done and the inputs that cannot be used (each reported on stderr here)."""
    paths = list(args.paths)
    if args.files_from:
        paths += read_list(args.files_from)
    if not paths:
        raise UsageError("give image files or folders (or --files-from LIST).")
    images, unreadable = find_images(paths)
    for message in unreadable:
        _skip(message)
    if not images:
        raise UsageError("no image files found in " + ", ".join(paths) + ".")
    unusable = len(unreadable)
    template = args.template
    if args.sidecar:
        urls = [i for i in images if _is_url(i)]
        if urls:
            raise UsageError(f"--sidecar writes next to local files; {urls[0][:60]} is a URL (use --output).")
        owners: dict[Path, str] = {}
        usable = []
        for image in images:
            target = sidecar_path(image, args.ext)
            if target in owners:
                raise UsageError(
                    f"{owners[target]} and {image} would share the sidecar {target}; use --output or rename one."
                )
            owners[target] = image
            if os.path.lexists(target) and not target.is_file():
                _skip(f"{image}: its sidecar {target} is there but is not a regular file.")
                unusable += 1
            else:
                usable.append(image)
        images = usable
        output: Any = SidecarOutput(args.ext, args.overwrite)
    elif args.output and args.output != "-":
        output = JsonlOutput(args.output, args.overwrite)
    else:
        output = StdoutOutput()
    # Error records are retried; --overwrite redoes everything listed.
    output.forget({i for i in images if args.overwrite or not output.done(i)})
    todo = [i for i in images if args.overwrite or not output.done(i)]
    work = []  # (image, prompt, error)
    for image in todo:
        try:
            work.append((image, template.render(image), None))
        except OSError as e:
            work.append((image, "", f"{image}: its {template.existing_ext} sidecar cannot be read ({_os_message(e)})."))
    return output, work, len(images), len(images) - len(todo), unusable


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number of at least 1, got {args.batch_size}.")
    if not args.ext.startswith(".") or len(args.ext) < 2 or "/" in args.ext:
        raise UsageError(f"--ext must be an extension such as .txt, got {args.ext!r}.")
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"--prompt-file {args.prompt_file} cannot be read ({getattr(e, 'strerror', None) or e})."
            ) from None
    else:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
    args.template = Template(text)
    if args.sidecar and args.ext == args.template.existing_ext and "existing" in args.template.fields:
        raise UsageError(
            f"{{existing}} reads the {args.ext} sidecars that --sidecar would replace; "
            "write the captions with another --ext (e.g. --ext .caption)."
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import PixtralError

    try:
        args.options = check_model_args(args).merge(**check_structured_args(args))
        _check_args(args)
    except (PixtralError, UsageError) as e:
        _err(str(e))
        return 2

    import pixtral_mlx  # before MLX: it chooses the BLAS

    group = Group()
    output, work, total, skipped, unusable = None, [], 0, 0, 0
    status: dict[str, Any] = {}
    if group.rank == 0:
        try:
            output, work, total, skipped, unusable = _plan(args)
        except UsageError as e:
            status = {"error": str(e), "code": 2}
        except OutputError as e:
            status = {"error": str(e), "code": 1}
    plan = group.gather({"work": work, "status": status})[0] if group.size > 1 else {"work": work, "status": status}
    if plan["status"]:
        if group.rank == 0:
            _err(plan["status"]["error"])
        return plan["status"]["code"]
    work = [tuple(w) for w in plan["work"]]
    try:
        return _run(args, group, output, work, (total, skipped, unusable), pixtral_mlx)
    finally:
        if output is not None:
            output.close()


def _summary(failed: int, attempted: int, unusable: int) -> bool:
    """Rank 0's last lines: what failed and what was skipped; whether anything was."""
    if failed:
        print(f"{failed} of {attempted} images failed.", file=sys.stderr)
    if unusable:
        print(f"{unusable} {'input was' if unusable == 1 else 'inputs were'} skipped (see above).", file=sys.stderr)
    return bool(failed or unusable)


def _run(args: argparse.Namespace, group: Group, output: Any, work: list, counts: tuple[int, int, int], px: Any) -> int:
    """`counts`: (images in all, already done, inputs that cannot be used), on rank 0."""
    from .errors import PixtralError

    total, skipped, unusable = counts
    mine = list(range(group.rank, len(work), group.size))
    if not work:
        if group.rank == 0 and sys.stderr.isatty():
            print(f"all {total} images already have captions (--overwrite redoes them).", file=sys.stderr)
        bad = group.rank == 0 and _summary(0, 0, unusable)
        return 1 if bad and group.size == 1 else 0
    model, problem = None, None
    try:
        model = px.load(
            args.model,
            progress=(lambda m: print(f"[INFO] {m}", file=sys.stderr)) if group.rank == 0 else None,
            context_length=args.context_length,
        )
    except PixtralError as e:
        problem = str(e)
    except KeyboardInterrupt:
        problem = "interrupted"
    problems = [p for p in group.gather(problem) if p]
    if problems:
        if group.rank == 0 or group.size == 1:
            _err(problems[0]) if problems[0] != "interrupted" else print("interrupted", file=sys.stderr)
        return 130 if problems[0] == "interrupted" else 1

    stop = Stop()
    progress = Progress(total, skipped) if group.rank == 0 else None
    failed = 0
    notes: set[str] = set()

    def emit(record: dict[str, Any]) -> None:
        nonlocal failed
        if "error" not in record:
            try:
                output.write(record)
                return
            except RecordError as e:  # e.g. a sidecar that appeared meanwhile: this image failed
                record = {"image": record["image"], "error": str(e)}
        failed += 1
        progress.say(f"error: {record['error']}")
        output.write(record)

    def note(message: str) -> None:
        if progress and message not in notes:
            notes.add(message)
            progress.say(f"note: {message}")

    rounds = -(-len(range(0, len(work), group.size)) // args.batch_size)
    try:
        for r in range(rounds):
            batch = mine[r * args.batch_size : (r + 1) * args.batch_size]
            single = group.size == 1
            finished: list[tuple[int, dict[str, Any]]] = []
            if not stop.signum:
                for index, record in _caption(model, args, [(i, *work[i]) for i in batch], stop, note):
                    if single:
                        emit(record)
                        progress.add(1)
                    else:
                        finished.append((index, record))
            if not single:
                everyone = group.gather({"records": finished, "stop": stop.signum})
                records = sorted((tuple(x) for part in everyone for x in part["records"]), key=lambda x: x[0])
                if group.rank == 0:
                    for _, record in records:
                        emit(record)
                    progress.add(len(records))
                if any(part["stop"] for part in everyone):
                    stop.signum = stop.signum or next(part["stop"] for part in everyone if part["stop"])
            if stop.signum:
                break
    except OutputError as e:
        if progress:
            progress.close()
        _err(str(e))
        return 1
    except KeyboardInterrupt:  # a second signal: stop now (single process; a lone rank cannot wait for the others)
        stop.signum = stop.signum or signal.SIGINT
        group.size = 1
    if progress:
        progress.close()
    if group.size > 1:
        # The ranks wait here until rank 0 has written the last records; only rank 0 reports. mlx.launch
        # stops every rank as soon as one exits with an error and does not pass exit statuses on, so a
        # finished distributed run exits 0 everywhere (its failures are in the output and on stderr).
        group.gather(None)
        if group.rank != 0:
            return 0
    if stop.signum:
        print("interrupted: run the same command again to finish.", file=sys.stderr)
        return stop.code
    bad = _summary(failed, total - skipped, unusable)
    return 1 if bad and group.size == 1 else 0


def _caption(
    model: Any,
    args: argparse.Namespace,
    batch: list[tuple[int, str, str, str | None]],
    stop: Stop,
    note: Callable[[str], None],
) -> Iterator[Any]:
    """(index, record) for each image of `batch` as it finishes: failures first (an image whose own memory
    plan does not fit among them), then the batch's captions. `note(message)` tells the user."""
    from .errors import PixtralError
    from .generate import check_context
    from .images import load_image
    from .turn import Reply

    opts = args.options
    ready, prompts, plans = [], [], []
    for index, image, prompt, error in batch:
        try:
            if error:
                raise PixtralError(error)
            img, _ = load_image(image)
            content = [{"type": "image", "image": img, "name": image}, {"type": "text", "text": prompt}]
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": content}
            ]
            encoded = model.encode(messages, max_edge=opts.max_edge)
            check_context(len(encoded), opts.max_tokens, model.context_length)
            plan = _memory_plan(model, encoded, opts)
        except PixtralError as e:
            message = str(e) if image in str(e) else f"{image}: {e}"
            yield index, {"image": image, "error": message}
            continue
        ready.append((index, image))
        prompts.append(encoded)
        plans.append(plan)
    if not prompts or stop.signum:
        return
    from .memory import batch_groups

    replies = [Reply() for _ in prompts]
    if len(batch_groups(plans, model.features.nbytes)) > 1:
        note("a batch would not fit in memory as a whole; its images are decoded in smaller groups.")
    steps = model.stream_batch(prompts, opts)  # batched, in groups that fit, or one by one where it must be
    try:
        for i, chunk in steps:
            replies[i].add(chunk)
            if chunk.finish_reason is not None:
                index, image = ready[i]
                text = args.prefix + replies[i].text.strip() + args.suffix
                yield (
                    index,
                    {
                        "image": image,
                        "text": text,
                        "prompt_tokens": replies[i].prompt_tokens,
                        "generation_tokens": replies[i].generation_tokens,
                        "finish_reason": replies[i].finish_reason,
                    },
                )
            if stop.signum:
                return
    finally:
        steps.close()


def _memory_plan(model: Any, prompt: Any, opts: Any) -> Any:
    """The plan of captioning `prompt` alone, which `Pixtral.stream` checks too; over the machine's limit it
    raises the same refusal (`MemoryPlanError`, one sentence with what would fit)."""
    from .memory import suggestions

    def plan(bits: int | None) -> Any:
        return model.memory_plan(prompt, opts, kv_bits=bits)

    alone = plan(opts.kv_bits)
    if not alone.fits:
        raise alone.refusal(suggestions(alone, plan))
    return alone
