"""The one exception type forethought raises for bad input.

The CLI prints a ``ForethoughtError`` as a one-line message with no traceback; anything else is a bug.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable


class ForethoughtError(ValueError):
    """Bad input or state, described in one line that names the problem."""


def as_flags(message: str, settings: Collection[str]) -> str:
    """A message as the command line shows it: each of the command's ``settings`` named as a field in backticks
    (`` `max_sequences` ``, how Python users meet it) becomes its flag (``--max-sequences``); other backticked
    words (a library's, quoted) stay as they are."""
    def flag(match: re.Match) -> str:
        name = match.group(1)
        return "--" + name.replace("_", "-") if name in settings else match.group(0)
    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (whitespace runs squashed), at most ``limit`` characters: how a library's
    multi-line message is quoted inside a :class:`ForethoughtError`."""
    return " ".join(str(error).split())[:limit]


def did_you_mean(text: str, known: Iterable[str]) -> str:
    """``"; did you mean X? (choices: …)"`` where ``text`` is a near miss of one of ``known`` (a typo), else ``""``."""
    known = list(known)
    close = difflib.get_close_matches(text, known, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}? (choices: {', '.join(known)})" if close else ""


def looks_like_a_path(text: str) -> bool:
    """``text`` names a local path (``/…``, ``./…``, ``../…``, ``~…``), not a hub id: a missing one is not looked
    for on the hub."""
    return text.startswith(("/", "./", "../", "~"))
