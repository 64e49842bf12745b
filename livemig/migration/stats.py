"""Counters a migration updates as it goes, read by progress displays.

Plain integer attributes: each is written by one thread only (or under the
GIL in single increments), and readers only need a recent value.
"""

from __future__ import annotations

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

    @property
    def bytes(self) -> int:
        return self.main_bytes + sum(self.multifd_bytes)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started
