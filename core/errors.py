"""The one exception type forethought raises for bad input.

The CLI prints a ``ForethoughtError`` as a one-line message with no traceback; anything else is a bug.
"""


class ForethoughtError(ValueError):
    """Bad input or state, described in one line that names the problem."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (whitespace runs squashed), at most ``limit`` characters: how a library's
    multi-line message is quoted inside a :class:`ForethoughtError`."""
    return " ".join(str(error).split())[:limit]
