"""Owned threads: a group does not end until every thread in it has ended.

A migration runs many threads (one per multifd channel, a return path, device
savers and loaders, a relay's two sides). Left to themselves such threads
outlive the failure that should have stopped them, hide their errors in
stderr, or keep a descriptor open after the command returned. A
:class:`ThreadGroup` gives every thread an owner, in the spirit of a trio
nursery:

* a thread is started *in* a group and the group's ``with`` block does not
  exit until every thread of it has returned;
* the first exception of any thread (or of the body of the ``with`` block)
  fails the group's :class:`~livemig.migration.common.failure.FailureLatch`,
  which shuts the sockets registered with it and runs its wake-up callbacks,
  so the siblings blocked in ``recv``/``send``/``queue.get`` return at once;
* the owner re-raises that first error once everything has been joined.

Nothing here is a daemon thread and no join has a timeout whose result
nobody checks: a thread that does not end when its sockets are shut is a bug
that the test suite's ``faulthandler_timeout`` shows with every stack.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from livemig.migration.common.failure import FailureLatch

__all__ = ["ThreadGroup"]


class ThreadGroup:
    """Threads with one owner; see the module docstring.

    ``latch`` is shared with whatever else takes part in the same migration
    (sockets, queues, other groups); by default the group has its own.
    """

    def __init__(self, name: str, latch: FailureLatch | None = None) -> None:
        self.name = name
        self.latch = latch if latch is not None else FailureLatch()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.latch.fail(exc)
        self.join(close=True)
        if exc is None:
            self.latch.raise_if_failed()

    def start(self, target: Callable[..., Any], *args: Any, name: str) -> threading.Thread:
        """Run ``target(*args)`` in a new thread of this group.

        Its exception fails the latch (the first one is kept); its return value
        is dropped: results travel through the objects the thread was given.
        """
        t = threading.Thread(target=self._run, args=(target, args), name=f"{self.name}/{name}")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"thread group {self.name} has already been joined")
            # A long-lived group (a server's, one thread per client) forgets the threads
            # that have ended: a thread that is no longer alive needs no join.
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _run(self, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            target(*args)
        except BaseException as e:  # noqa: BLE001 - the owner re-raises the first one
            self.latch.fail(e)

    def cancel(self, exc: BaseException) -> None:
        """Fail the group with ``exc`` unless it already failed: every thread is woken."""
        self.latch.fail(exc)

    def join(self, *, close: bool = False) -> None:
        """Wait for every thread of the group, including those started while waiting.

        With ``close`` the group takes no new threads afterwards (the end of the
        ``with`` block closes it).
        """
        while True:
            with self._lock:
                pending = [t for t in self._threads if t.is_alive()]
                if not pending:
                    self._closed = self._closed or close
                    self._threads.clear()
                    return
            for t in pending:
                t.join()

    def raise_if_failed(self) -> None:
        self.latch.raise_if_failed()

    @property
    def alive(self) -> int:
        """Threads of the group still running."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads)
