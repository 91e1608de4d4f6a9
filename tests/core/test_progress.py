"""Progress bars in a log: plain lines, no carriage returns or terminal control codes."""

from __future__ import annotations

import io
import sys

import pytest

from forethought.core.progress import LogLines, progress_bar


def test_a_bar_in_a_log_is_written_as_plain_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress_bar(range(3), desc="outer", mininterval=0):
        for _ in progress_bar(range(2), desc="inner", mininterval=0, leave=False, position=1):
            pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert all(line.strip() == line and line for line in lines)
    assert lines[-1].startswith("outer: 100%") and "3/3" in lines[-1]
    assert any(line.startswith("inner:") and "2/2" in line for line in lines)


@pytest.mark.parametrize("written, shown", [("\rstep 1\rstep 2   \n", "step 1\nstep 2\n"),
                                             ("\x1b[A\rbar\x1b[B", "bar\n"), ("\r   \r", "")])
def test_redraws_become_lines_and_padding_goes(written, shown):
    log = io.StringIO()
    assert LogLines(log).write(written) == len(written)
    assert log.getvalue() == shown
