"""One place where the first failure of any thread is kept.

Every thread of a migration reports its exception here; the first one wins,
all channels are shut down so blocked reads return, and the owner re-raises
that first cause once it has joined its threads. Later errors (channels
failing *because* we shut them down) are dropped: the user sees the cause,
not the consequences.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class FailureLatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._sockets: list[socket.socket] = []
        self._callbacks: list[Callable[[], None]] = []

    @property
    def failed(self) -> bool:
        return self.error is not None

    def add_socket(self, sock: socket.socket) -> None:
        """Shut ``sock`` down on failure (at once, if the failure already happened)."""
        with self._lock:
            self._sockets.append(sock)
            failed = self.error is not None
        if failed:
            _shutdown(sock)

    def on_failure(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` on failure (at once, if the failure already happened)."""
        with self._lock:
            self._callbacks.append(cb)
            failed = self.error is not None
        if failed:
            cb()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = exc
            socks = list(self._sockets)
            cbs = list(self._callbacks)
        for s in socks:
            _shutdown(s)
        for cb in cbs:
            cb()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
