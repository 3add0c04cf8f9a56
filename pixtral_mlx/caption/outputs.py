"""Where the captions go, and what a resumed run finds there: `JsonlOutput` (one JSON line per image),
`StdoutOutput` (JSON lines, nothing to resume from) and `SidecarOutput` (a text file next to each image).

Each has `done(image)` (a record is there: the image is skipped), `forget(images)` (to redo them), `write(record)`
(as soon as its image is done) and `close()`. Error records are retried: they are not `done`.

- JSONL is appended with a single `write()` + fsync under an exclusive lock held for the run, so a killed run
  leaves only whole lines.
- Files we did not write are never changed: an existing JSONL file must hold only caption records (else the
  run refuses before touching it, unless `--overwrite` replaces it); only then is a torn last record (a run
  killed while writing it) cut away. Rewrites and sidecars go to a temp file of our own (`mkstemp`, next to
  the target), renamed into place; without `--overwrite` a sidecar that appeared meanwhile is left as it is.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from pixtral_mlx.caption.errors import OutputError, RecordError, UsageError, os_message
from pixtral_mlx.caption.sources import sidecar_path

RECORD_START = b'{"image": "'  # how every line caption writes begins (json.dumps of a record, "image" first)


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
            raise OutputError(f"cannot open {path} ({os_message(e)}).") from None
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
                raise OutputError(f"cannot repair {self.path} ({os_message(e)}).") from None
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
            raise OutputError(f"cannot rewrite {self.path} ({os_message(e)}).") from None
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
            raise OutputError(f"cannot write to {self.path} ({os_message(e)}).") from None
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
            raise OutputError(f"cannot write {target} ({os_message(e)}).") from None
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
