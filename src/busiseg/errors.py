"""One error type for everything a user can fix: printed as one line, never as a traceback."""

from __future__ import annotations


class BusisegError(Exception):
    """A problem with the user's data, params or files; the message names it and says what to do."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """A library's exception squeezed into the one line a BusisegError may carry."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
