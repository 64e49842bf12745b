"""QEMU's ``max-bandwidth``: a byte budget per 100 ms window."""

from __future__ import annotations

import threading
import time

from livemig.migration.common.failure import FailureLatch


class RateLimiter:
    """A source that has spent its window's budget sleeps until the window ends;
    a failure of ``latch`` (a cancel) wakes it at once."""

    #: QEMU's ``BUFFER_DELAY``: the window over which the budget is counted.
    WINDOW = 0.1

    def __init__(self, bytes_per_second: int, latch: FailureLatch) -> None:
        self.limit = bytes_per_second
        self.latch = latch
        self.window_start = time.monotonic()
        self.used = 0.0
        self._wake = threading.Event()
        latch.on_failure(self._wake.set)

    def set_limit(self, bytes_per_second: int) -> None:
        self.limit = bytes_per_second

    def consume(self, n: int) -> None:
        """Account ``n`` bytes; sleep until the window ends once its budget is spent."""
        if not self.limit:
            return
        self.used += n
        budget = self.limit * self.WINDOW
        while self.used >= budget:
            now = time.monotonic()
            end = self.window_start + self.WINDOW
            if now >= end:
                self.used -= budget
                self.window_start = max(end, now - self.WINDOW)
                continue
            self._wake.wait(end - now)
            self.latch.raise_if_failed()
