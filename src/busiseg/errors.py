"""One error type for everything a user can fix: printed as one line, never as a traceback."""

from __future__ import annotations


class BusisegError(Exception):
    """A problem with the user's data, params or files; the message names it and says what to do."""
