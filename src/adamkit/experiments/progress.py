"""A dependency-free progress bar for the command line, drawn on stderr.

On a terminal it redraws one line in place (``[#######.....] 7/12  0:14 left  label``);
into a file or pipe it writes at most ``lines`` plain lines, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Counts ``total`` units of work; call ``tick(label)`` after each, ``close()`` at the end."""

    def __init__(self, total: int, title: str, *, stream: TextIO | None = None, width: int = 30, lines: int = 10):
        self.total, self.title, self.width = max(total, 1), title, width
        self.stream = sys.stderr if stream is None else stream
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(self.total // lines, 1)
        self.done = 0
        self.start = time.perf_counter()

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return f"{int(left) // 60}:{int(left) % 60:02d} left"

    def tick(self, label: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        if self.live:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            line = f"\r{self.title} [{bar}] {self.done}/{self.total} {self._eta()}  {label}"
            self.stream.write(line[:120].ljust(120))
            self.stream.flush()
        elif self.done % self.every == 0 or self.done == self.total:
            self.stream.write(f"{self.title}: {self.done}/{self.total} {label}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            seconds = time.perf_counter() - self.start
            self.stream.write(f"\r{self.title}: {self.done}/{self.total} in {seconds:.0f} s".ljust(120) + "\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ProgressBar"]
