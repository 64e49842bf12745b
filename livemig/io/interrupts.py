"""SIGTERM and Ctrl-C wait while a child process is started and recorded.

The command line turns SIGTERM into an exception that unwinds the command, so that
half-written output is removed and every child is ended. Such an exception can land
between any two bytecodes of the main thread: if it lands after ``fork`` but before the
line that keeps the new process (an ``exec:`` command), nobody knows the child any more,
and it outlives livemig holding its stderr. Code that starts a child and records it runs
inside :func:`deferred`; a signal that arrives meanwhile is raised when the section ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["deferred", "interrupt"]


class _Sections:
    """The main thread's deferred sections (signal handlers run in the main thread)."""

    depth = 0
    pending: BaseException | None = None


@contextmanager
def deferred() -> Iterator[None]:
    """A section of the main thread that a signal's exception does not interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Sections.depth += 1
    try:
        yield
    finally:
        _Sections.depth -= 1
        if _Sections.depth == 0 and _Sections.pending is not None:
            exc, _Sections.pending = _Sections.pending, None
            raise exc


def interrupt(exc: BaseException) -> None:
    """What a signal handler calls: raise ``exc`` now, or when the deferred section ends."""
    if _Sections.depth:
        _Sections.pending = _Sections.pending or exc
        return
    raise exc
