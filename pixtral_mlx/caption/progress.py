"""What a caption run shows and how it stops: `Progress` (a line of counts, rate and ETA on a terminal's
stderr) and `Stop` (SIGINT/SIGTERM: finish the records in progress, then exit 130/143)."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any


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
