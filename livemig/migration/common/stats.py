"""Counters a migration updates as it goes, read by progress displays.

Byte counters have one writer each (the main thread, or one channel's
thread for its slot in ``multifd_bytes``); page counters are shared and go
through :meth:`TransferStats.add_pages`. Readers only need a recent value.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class TransferStats:
    started: float = field(default_factory=time.monotonic)
    main_bytes: int = 0
    multifd_bytes: list[int] = field(default_factory=list)
    normal_pages: int = 0
    zero_pages: int = 0
    total_ram: int = 0
    phase: str = "waiting for the source"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_pages(self, normal: int, zero: int = 0) -> None:
        """Count pages from any thread (multifd channels count concurrently)."""
        with self._lock:
            self.normal_pages += normal
            self.zero_pages += zero

    @property
    def bytes(self) -> int:
        return self.main_bytes + sum(self.multifd_bytes)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
