"""Progress bars for every long loop: a live bar on a terminal, a few plain lines in a log.

A bar redraws itself with a carriage return after each step. On a terminal that is one line updating in place;
written to a file (`make demo > log 2>&1`, a cluster job's output) it is thousands of updates glued into one
line. So where the bar's stream is not a terminal, progress is a plain line at most every `LOG_INTERVAL_S`
seconds, and one when the loop ends.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

LOG_INTERVAL_S = 30.0


def progress_bar(total: int, desc: str, *, initial: int = 0, stream: IO[str] | None = None):
    """A progress bar over `total` items of which `initial` are already done, with tqdm's `update(n)`,
    `set_postfix(**values)` and `close()`: tqdm where `stream` (default: standard error) is a terminal or a
    notebook, otherwise a `LogLines` writing one line every `LOG_INTERVAL_S` seconds and one at the end."""
    stream = sys.stderr if stream is None else stream
    if _redraws_in_place(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)
    return LogLines(total, desc, initial=initial, stream=stream)


def _redraws_in_place(stream: IO[str]) -> bool:
    # A notebook's output is no terminal, but tqdm.auto draws a widget there that updates in place.
    in_notebook = "ipykernel" in sys.modules and stream in (sys.stderr, sys.stdout)
    return in_notebook or bool(getattr(stream, "isatty", lambda: False)())


class LogLines:
    """Progress as plain lines for a log: `desc: done/total (percent), rate, time left, postfix`, at most one
    every `interval` seconds, plus one when closed."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, stream: IO[str], interval: float = LOG_INTERVAL_S):
        self.total, self.desc, self.n, self.stream, self.interval = total, desc, initial, stream, interval
        self.postfix: dict[str, Any] = {}
        self._start_n, self._start = initial, time.monotonic()
        self._last_line = self._start
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(time.monotonic())

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float) -> str:
        parts = [f"{self.desc}: {self.n}/{self.total}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        elapsed, done = now - self._start, self.n - self._start_n
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} it/s")
            if self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return ", ".join(parts)

    def _write(self, now: float) -> None:
        self._last_line = now
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
