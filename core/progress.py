"""Progress bars: tqdm's own on a terminal and in Jupyter; in a log (stderr a file or a pipe, as under
``nohup … > run.log``), one plain line at most once a minute, without the carriage returns and terminal control
codes a bar redraws itself with."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0  # seconds between a bar's lines in a log
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # ANSI sequences (tqdm moves between nested bars with them)


class LogLines:
    """A text stream over ``stream`` on which each redraw of a bar is a line of its own: carriage returns become
    line ends, control sequences and a redraw's blank padding are dropped."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")

    def write(self, text: str) -> int:
        lines = [line.rstrip() for line in _CONTROL.sub("", text).replace("\r", "\n").split("\n")]
        self.stream.write("".join(f"{line}\n" for line in lines if line))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, written as plain lines (:class:`LogLines`, every :data:`LOG_INTERVAL_S`)
    where stderr is not a terminal and the bar is not a notebook widget."""
    if not tqdm.__module__.startswith("tqdm.notebook") and not sys.stderr.isatty():
        options = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S, "file": LogLines(sys.stderr),
                   **options}  # maxinterval: tqdm's monitor would otherwise redraw every 10 s
    return tqdm(iterable, **options)
