"""The built-in ``dirty-pages`` workload: the guest of QEMU's migration tests.

Like the tiny guest of ``tests/qtest/migration-test``, it sweeps over its
RAM again and again, incrementing the first byte of every page. That makes
any lost or stale page visible: after a migration, every page before the
sweep position must hold ``sweeps + 1`` and every page after it ``sweeps``
(mod 256). Unlike QEMU's guest, livemig knows the exact position, because
the workload is itself a (non-iterable) device whose state travels at
switchover; the destination checks every page against it before it runs.

Workers own disjoint page ranges, increment a chunk of pages with one numpy
operation, mark the chunk dirty after writing it (so a page is never sent
stale, see :mod:`livemig.io.guest_ram`), and pass the machine's gate between
chunks, which is where stop and throttle take effect.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from livemig.engine.handlers import DeviceHandler, SectionOut, blob_payload
from livemig.engine.machine import Machine
from livemig.errors import ConfigError, StreamFormatError
from livemig.io.guest_ram import PAGE_SIZE
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.thread_group import ThreadGroup

#: Pages incremented between two gate checks: small enough that a stop is
#: obeyed within about a millisecond, large enough that numpy, not Python,
#: dominates the time.
CHUNK_PAGES = 512

STATE_VERSION = 1


class _Range:
    __slots__ = ("end", "pos", "start", "sweeps")

    def __init__(self, start: int, end: int, pos: int | None = None, sweeps: int = 0) -> None:
        self.start, self.end = start, end
        self.pos = start if pos is None else pos
        self.sweeps = sweeps


class DirtyPagesWorkload(DeviceHandler):
    idstr = "livemig-workload"
    kind = "workload"

    def __init__(self, machine: Machine, *, block: str = "pc.ram", workers: int = 1,
                 rate: float | None = None, mark_dirty: bool = True) -> None:
        """``rate``: bytes of pages dirtied per second over all workers (None = as fast
        as the CPU goes). ``mark_dirty=False`` leaves dirty tracking to the kernel."""
        if block not in machine.blocks:
            raise ConfigError(f"workload: no RAM block {block!r}")
        if workers < 1:
            raise ConfigError("workload: at least one worker")
        self.machine = machine
        self.block = machine.blocks[block]
        self.rate = rate
        self.mark = mark_dirty
        n = self.block.page_count
        bounds = [n * i // workers for i in range(workers + 1)]
        self.ranges = [_Range(bounds[i], bounds[i + 1]) for i in range(workers)
                       if bounds[i + 1] > bounds[i]]
        self.block.pages[:, 0] = 0
        self.block.mark_dirty(0, self.block.size)
        self.passes = 0
        self.verified: bool | None = None
        self.errors = 0
        self.first_error: str | None = None
        self._stop = threading.Event()
        # The workers: the first one to fail stops the others (x-query-workload reports
        # it as ``failure``); stop() joins them.
        self._latch = FailureLatch()
        self._latch.on_failure(self._stop_workers)
        self._group = ThreadGroup("workload", self._latch)
        self._running = 0
        self._lock = threading.Lock()

    # -- running -------------------------------------------------------------
    @property
    def failure(self) -> BaseException | None:
        """The first error of a worker (the workers stop at the first one)."""
        return self._latch.error

    def start(self) -> None:
        if self._running or self._latch.failed:
            return
        self._stop.clear()
        for i, r in enumerate(self.ranges):
            self.machine.register_worker()
            self._running += 1
            self._group.start(self._run, r, name=str(i))

    def _stop_workers(self) -> None:
        self._stop.set()
        self.machine.wake_workers()

    def stop(self) -> None:
        """Stop the workers and join them."""
        self._stop_workers()
        self._group.join()
        self._running = 0

    @property
    def running(self) -> bool:
        return bool(self._running) and self.machine.running

    def _run(self, r: _Range) -> None:
        pages = self.block.pages
        per_worker = self.rate / len(self.ranges) if self.rate else None
        worked = idle = 0.0
        try:
            while self.machine.gate(worked, self._stop, idle):
                t0 = time.monotonic()
                a = r.pos
                b = min(a + CHUNK_PAGES, r.end)
                pages[a:b, 0] += 1
                if self.mark:
                    self.block.mark_dirty(a * PAGE_SIZE, (b - a) * PAGE_SIZE)
                if b == r.end:
                    r.pos, r.sweeps = r.start, r.sweeps + 1
                    with self._lock:
                        self.passes += 1
                else:
                    r.pos = b
                worked = time.monotonic() - t0
                idle = max(0.0, (b - a) * PAGE_SIZE / per_worker - worked) if per_worker else 0.0
        finally:
            self.machine.unregister_worker()

    def on_run_state(self, running: bool) -> None:
        if running:
            self.start()

    # -- checking ------------------------------------------------------------
    def expected(self) -> np.ndarray:
        exp = np.empty(self.block.page_count, dtype=np.uint8)
        for r in self.ranges:
            exp[r.start:r.pos] = (r.sweeps + 1) & 0xFF
            exp[r.pos:r.end] = r.sweeps & 0xFF
        return exp

    def verify(self) -> bool:
        """Every counter byte holds what the sweep positions say (machine stopped)."""
        got = self.block.pages[:, 0]
        bad = np.flatnonzero(got != self.expected())
        self.errors = int(bad.size)
        self.verified = not bad.size
        if bad.size:
            p = int(bad[0])
            self.first_error = (f"page {p} of {self.block.name} (offset {p * PAGE_SIZE:#x}) "
                                f"holds {int(got[p])}, expected {int(self.expected()[p])}; "
                                f"{bad.size} bad page(s)")
        return self.verified

    # -- migration -----------------------------------------------------------
    def _state(self) -> bytes:
        return json.dumps({
            "version": STATE_VERSION, "block": self.block.name, "rate": self.rate,
            "passes": self.passes,
            "ranges": [[r.start, r.end, r.pos, r.sweeps] for r in self.ranges],
        }).encode()

    def save_state(self, out: SectionOut) -> None:
        out.write_blob(self._state())

    def load_state(self, body: memoryview, version_id: int, kind: str) -> None:
        try:
            doc = json.loads(bytes(blob_payload(body)))
            if doc["version"] != STATE_VERSION or doc["block"] != self.block.name:
                raise ValueError(f"version {doc['version']} block {doc['block']}")
            ranges = [_Range(int(s), int(e), int(p), int(w)) for s, e, p, w in doc["ranges"]]
            n = self.block.page_count
            if not all(0 <= r.start <= r.pos < r.end <= n for r in ranges):
                raise ValueError("page ranges outside the block")
        except (ValueError, KeyError, TypeError) as e:
            raise StreamFormatError(f"workload state is not valid: {e}") from None
        self.ranges = ranges
        self.passes = int(doc["passes"])
        self.rate = doc["rate"]

    def load_finish(self) -> None:
        self.verify()

    def summary(self) -> dict[str, Any]:
        return {"name": self.idstr, "kind": self.kind, "state_bytes": len(self._state()),
                "verified": self.verified}

    def query(self) -> dict[str, Any]:
        """What QMP's ``x-query-workload`` reports."""
        out: dict[str, Any] = {"running": self.running, "passes": self.passes,
                               "verified": self.verified, "errors": self.errors}
        if self.first_error:
            out["first-error"] = self.first_error
        if self.failure is not None:
            out["failure"] = str(self.failure)
        return out
