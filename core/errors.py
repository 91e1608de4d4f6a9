"""The one exception type forethought raises for bad input.

The CLI prints a ``ForethoughtError`` as a one-line message with no traceback; anything else is a bug.
"""


class ForethoughtError(ValueError):
    """Bad input or state, described in one line that names the problem."""
