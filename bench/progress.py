"""The progress display of a benchmark run, on stderr (results go to files, not the terminal).

On a terminal one status line is redrawn in place; in a log (CI, ``| tee``) each finished
sample is a line of its own. Either way a QA engineer sees what runs, how far it is, and each
number as it comes in.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total = max(1, total_steps)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self._status = ""

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _prefix(self) -> str:
        return f"[{self.done:>3}/{self.total} {_clock(time.monotonic() - self.t0)}]"

    def status(self, text: str) -> None:
        """What is running now (redrawn on a terminal, not logged)."""
        self._status = text
        self._write(f"{self._prefix()} {text} ...", final=False)

    def sample(self, what: str, value: float, unit: str) -> None:
        """A measured sample: one step done."""
        self.done += 1
        self._write(f"{self._prefix()} {what}: {value:.4g} {unit}", final=True)

    def note(self, text: str) -> None:
        self._write(f"{self._prefix()} {text}", final=True)

    def finish(self) -> None:
        self._write(f"[{self.total:>3}/{self.total} {_clock(time.monotonic() - self.t0)}] done", final=True)
