"""Progress of the command line's long runs, on stderr: a tqdm bar on a terminal; into a
file or pipe, at most ``lines`` plain lines, so logs stay short and free of
carriage returns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm


@contextmanager
def progress(total: int, title: str, *, stream: TextIO | None = None, lines: int = 10) -> Iterator[Callable[..., None]]:
    """Yield ``tick(label="")``, to be called after each of ``total`` units of work."""
    stream = sys.stderr if stream is None else stream
    total = max(total, 1)
    if getattr(stream, "isatty", lambda: False)():
        with tqdm(total=total, desc=title, file=stream, dynamic_ncols=True) as bar:

            def tick(label: str = "") -> None:
                bar.set_postfix_str(label, refresh=False)
                bar.update()

            yield tick
        return

    every, done = max(total // lines, 1), 0

    def tick(label: str = "") -> None:
        nonlocal done
        done = min(done + 1, total)
        if done % every == 0 or done == total:
            stream.write(f"{title}: {done}/{total} {label}\n")
            stream.flush()

    yield tick


__all__ = ["progress"]
