"""Progress where the output is a log, not a terminal: a few plain lines instead of thousands of redraws."""

from __future__ import annotations

import io

from mediator_models import progress
from mediator_models.progress import LogLines, progress_bar


def test_a_log_gets_rate_limited_plain_lines_and_a_last_one(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 31.0, 32.0, 40.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    bar = progress_bar(10, "train SiT-T/2", stream=log)
    assert isinstance(bar, LogLines)  # a StringIO is no terminal
    bar.update(2)  # t = 1: too soon for a line
    bar.update(2)  # t = 2
    bar.set_postfix(loss="0.51")
    bar.update(2)  # t = 31: a line
    bar.update(2)  # t = 32
    bar.close()  # t = 40: the last line, whatever the interval
    bar.close()  # closing twice writes nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train SiT-T/2: 6/10 (60%), 0.194 it/s") and lines[0].endswith("loss=0.51")
    assert lines[1].startswith("train SiT-T/2: 8/10 (80%)")


def test_a_resumed_loop_counts_its_rate_from_where_it_resumed(monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = LogLines(100, "sample", initial=90, stream=io.StringIO(), interval=1.0)
    assert bar.line(10.0) == "sample: 90/100 (90%)"  # no step done yet: no rate, no guess of time left
    bar.n = 95
    assert bar.line(10.0) == "sample: 95/100 (95%), 0.5 it/s, 0m10s left"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_live_bar():
    bar = progress_bar(3, "record", stream=_Terminal())
    assert not isinstance(bar, LogLines)
    bar.update(3)
    bar.close()
