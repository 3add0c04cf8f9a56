"""The conversion's output folder: refused unless new or a previous conversion, locked, replaced atomically.

`atomic_folder` yields a temporary sibling folder that is renamed to the output only when the conversion
completes: while it runs the output is locked against other conversions (a lock file beside it), SIGTERM
cleans up like Ctrl-C (`Terminated`), and the folders a killed run left behind are removed or put back first.
`--force` replaces only a folder that holds a previous conversion's files and nothing else.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pixtral_mlx.errors import ConversionError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

# What a conversion writes: --force may replace a folder holding these and nothing else.
OUTPUT_FILES = {"config.json", "model.safetensors.index.json", "tekken.json", "SYSTEM_PROMPT.txt"}
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|.+\.model\.v\d+(m\d+)?")  # or a SentencePiece tokenizer
IGNORED_FILES = {".DS_Store"}  # Finder adds it to any folder it shows


class Terminated(KeyboardInterrupt):
    """SIGTERM during a conversion: cleaned up exactly like Ctrl-C."""


def not_a_conversion(output: Path) -> str | None:
    """Why `output` (which exists) is not a previous conversion that --force may replace; None if it is one."""
    if output.is_symlink():
        return "is a symbolic link"
    if not output.is_dir():
        return "is a file, not a folder"
    names = {p.name for p in output.iterdir()} - IGNORED_FILES
    if not names:
        return None  # an empty folder: nothing to lose
    foreign = sorted(n for n in names if not ((n in OUTPUT_FILES or SHARD_RE.fullmatch(n)) and (output / n).is_file()))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"is not a model conversion (it holds {foreign[0]}{more})"
    missing = sorted({"config.json", "model.safetensors.index.json"} - names)
    if missing:
        return f"is not a complete model conversion (it has no {missing[0]})"
    return None


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing `output` unless `force` is set and it is a previous conversion."""
    if not os.path.lexists(output):
        return
    why = not_a_conversion(output)
    if why:
        hint = "--force replaces only a previous conversion, so " if force else ""
        raise FileExistsError(f"output {output} {why}: {hint}choose another folder")
    if not force:
        raise FileExistsError(f"output {output} already exists: pass --force (force=True) to replace it")


@contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on `output` (a lock file beside it) or fail at once, naming the holder."""
    if fcntl is None:  # no flock (Windows): conversions are not serialized there
        yield
        return
    lock = output.parent / f"{output.name}.convert-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConversionError(f"another conversion is writing {output}{pid}: wait for it or stop it") from None
        try:  # the previous holder unlinks the file before unlocking: retry if we locked an unlinked one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked, so a waiting run cannot lock a file about to vanish
        os.close(fd)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _recover_leftovers(output: Path, log: Callable[[str], None]) -> None:
    """Deal with the folders a killed run for `output` left: called with the output's lock held.

    `OUT.partial-<pid>-<hex>` is an unfinished conversion: removed once its process is gone.
    `OUT.old-<pid>-<hex>` is a previous conversion that --force was replacing: removed if the new
    one is in place, else put back as OUT.
    """
    pattern = re.compile(re.escape(output.name) + r"\.(partial|old)-(\d+)-[0-9a-f]{8}")
    removed, kept = [], []
    for p in sorted(output.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        if _alive(int(m[2])):
            kept.append(f"{p.name} (pid {m[2]} is running)")
        elif m[1] == "old" and not os.path.lexists(output):
            os.replace(p, output)
            log(f"[INFO] Restored {output} from {p.name}, which a killed --force conversion left")
        else:
            shutil.rmtree(p)
            removed.append(p.name)
    if removed:
        log(f"[INFO] Removed {', '.join(removed)}, left in {output.parent} by a killed conversion")
    if kept:
        log(f"[WARNING] Not removing {', '.join(kept)}: delete it yourself if no conversion is running")


@contextmanager
def _signal_handlers(handlers: dict[int, Any]) -> Iterator[None]:
    """Install signal handlers (main thread only: elsewhere Python cannot) and restore the previous ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in handlers}
    try:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _sigterm_as_ctrl_c() -> dict[int, Any]:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt), unless the program has its own handler."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGTERM: _terminate} if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) else {}


@contextmanager
def atomic_folder(output: Path, force: bool, log: Callable[[str], None] = lambda line: None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `output` only if the block completes.

    While it runs, `output` is locked against other conversions, SIGTERM cleans up like Ctrl-C, and
    the folders a killed run for the same output left behind are removed first (and said so via `log`).
    With `force`, an existing `output` is replaced only if it is a previous conversion.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with _output_lock(output), _signal_handlers(_sigterm_as_ctrl_c()):
        _recover_leftovers(output, log)
        check_output(output, force)
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        tmp = output.parent / f"{output.name}.partial-{tag}"
        tmp.mkdir()
        try:
            yield tmp
            check_output(output, force)  # again: the user may have put files into it meanwhile
            # Ctrl-C or SIGTERM from here on comes too late to stop the conversion: ignored until it is in place.
            ignore = dict.fromkeys((signal.SIGINT, signal.SIGTERM), signal.SIG_IGN)
            with _signal_handlers(ignore):
                if os.path.lexists(output):  # a previous conversion: set aside first so a failure keeps it
                    old = output.parent / f"{output.name}.old-{tag}"
                    os.replace(output, old)
                    os.replace(tmp, output)
                    shutil.rmtree(old)
                else:
                    os.replace(tmp, output)
        finally:  # runs on errors, Ctrl-C and SIGTERM too
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
