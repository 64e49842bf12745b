"""A machine hosted by livemig: RAM blocks, devices, a run state, workers.

What QEMU's ``MachineState`` plus its vCPUs are to a QEMU migration, this
is to livemig's engine: the thing that keeps changing memory while it is
migrated, that the migration stops at switchover and resumes on the other
side. Code that runs "inside" the machine (the built-in workload, a Python
device's worker) registers as a worker: it checks :meth:`Machine.gate`
between units of work, which parks it while the machine is stopped and
slows it down while the migration throttles the machine (auto-converge).
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections.abc import Iterable
from typing import Any

from livemig.engine.handlers import DeviceHandler
from livemig.engine.states import RunState, next_run_state
from livemig.errors import ConfigError, MigrationError
from livemig.io.guest_ram import PAGE_SIZE, RamBlock

#: Longest time a stopped machine waits for its workers to park. A worker
#: checks the gate between units of work of a few milliseconds; a worker
#: that does not come back within this is stuck, and stopping fails loudly.
PARK_TIMEOUT = 10.0


class Machine:
    """Guest RAM + devices + run state. Thread-safe for stop/cont/gate."""

    def __init__(self, memory: int, *, machine_type: str = "livemig",
                 extra_blocks: Iterable[tuple[str, int]] = (),
                 devices: Iterable[DeviceHandler] = (),
                 state: RunState | str = RunState.PAUSED) -> None:
        try:
            initial = RunState(state)
        except ValueError:
            raise ConfigError(f"unknown run state {state!r}") from None
        self.machine_type = machine_type
        self.uuid = uuidlib.uuid4().bytes
        self.blocks: dict[str, RamBlock] = {}
        self.add_block("pc.ram", memory)
        for name, size in extra_blocks:
            self.add_block(name, size)
        self.devices: list[DeviceHandler] = []
        for d in devices:
            self.add_device(d)
        self._cond = threading.Condition()
        self._state = initial
        self._workers = 0
        self._parked = 0
        #: Percentage of time the workers must sleep (QEMU's cpu-throttle-percentage).
        self.throttle_pct = 0
        #: Callables ``(old, new)`` (two :class:`RunState`) told of every run state change.
        self.listeners: list[Any] = []

    # -- composition ---------------------------------------------------------
    def add_block(self, name: str, size: int) -> RamBlock:
        if name in self.blocks:
            raise ConfigError(f"RAM block {name} exists already")
        b = RamBlock(name, size)
        self.blocks[name] = b
        return b

    def add_device(self, dev: DeviceHandler) -> None:
        key = (dev.idstr, dev.instance_id)
        if any((d.idstr, d.instance_id) == key for d in self.devices) or dev.idstr == "ram":
            raise ConfigError(f"device section {dev.idstr!r} instance {dev.instance_id} "
                              "exists already")
        self.devices.append(dev)

    def device(self, idstr: str, instance_id: int) -> DeviceHandler | None:
        for d in self.devices:
            if d.idstr == idstr and d.instance_id == instance_id:
                return d
        return None

    @property
    def ram_size(self) -> int:
        return sum(b.size for b in self.blocks.values())

    @property
    def page_count(self) -> int:
        return self.ram_size // PAGE_SIZE

    # -- run state -----------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def set_state(self, new: RunState | str) -> None:
        """Change the run state along :data:`~livemig.engine.states.RUN_STATE_ARCS`.

        The current state again is nothing to do. Any other pair not in the table
        raises :class:`~livemig.engine.states.TransitionError` (a ``StateError``
        naming both states) and changes nothing; so does a string that names no
        run state. Leaving ``running`` waits until every worker parked.
        """
        with self._cond:
            old = self._state
            if old == new:
                return
            new = next_run_state(old, new)
            self._state = new
            self._cond.notify_all()
            if old is RunState.RUNNING:
                deadline = time.monotonic() + PARK_TIMEOUT
                while self._parked < self._workers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise MigrationError(f"{self._workers - self._parked} machine worker(s) did "
                                         f"not stop within {PARK_TIMEOUT:.0f} s")
                    self._cond.wait(left)
        running = new is RunState.RUNNING
        if (old is RunState.RUNNING) != running:
            for d in self.devices:
                d.on_run_state(running)
        for cb in list(self.listeners):
            cb(old, new)

    def stop(self, state: RunState | str = RunState.PAUSED) -> None:
        self.set_state(state)

    def cont(self) -> None:
        self.set_state(RunState.RUNNING)

    # -- workers -------------------------------------------------------------
    def register_worker(self) -> None:
        """A worker counts from here on: a stop waits until it parks at the gate, so it
        must call :meth:`gate` before it touches guest memory."""
        with self._cond:
            self._workers += 1

    def unregister_worker(self) -> None:
        with self._cond:
            self._workers -= 1
            self._cond.notify_all()

    def gate(self, worked: float, stop: threading.Event, idle: float = 0.0) -> bool:
        """Called by a worker between units of work.

        ``worked`` is the time the last unit took, ``idle`` a pause the worker
        wants anyway (its own rate limit). Sleeps for ``idle`` plus the
        throttle's share, parks while the machine is stopped, and returns
        False once ``stop`` is set (the worker must end). Every sleep here is
        cut short by a run state change, so a stop never waits for a sleeping
        worker. Whoever sets ``stop`` calls :meth:`wake_workers` afterwards:
        nothing here polls it.
        """
        pct = self.throttle_pct
        pause = idle
        if pct and worked > 0:
            # QEMU's throttle: the vCPU sleeps pct% of each time slice.
            pause += (worked + idle) * pct / (100 - pct)
        with self._cond:
            if pause > 0:
                deadline = time.monotonic() + pause
                while self._state is RunState.RUNNING and not stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._state is RunState.RUNNING and not stop.is_set():
                return True
            self._parked += 1
            self._cond.notify_all()
            try:
                while self._state is not RunState.RUNNING and not stop.is_set():
                    self._cond.wait()  # set_state() and wake_workers() notify
            finally:
                self._parked -= 1
        return not stop.is_set()

    def wake_workers(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Close every device (each joins its threads) and free guest RAM; then raise
        the first error a device's close raised."""
        first: BaseException | None = None
        for d in self.devices:
            try:
                d.close()
            except Exception as e:  # noqa: BLE001 - the others still close; raised below
                first = first or e
        for b in self.blocks.values():
            b.close()
        if first is not None:
            raise first

    def migration_blockers(self) -> list[str]:
        out = []
        for d in self.devices:
            why = d.migration_blocker()
            if why:
                out.append(f"device {d.idstr}: {why}")
        return out

    def summary(self) -> dict[str, Any]:
        return {"machine": self.machine_type, "status": self._state.value,
                "ram": {b.name: b.size for b in self.blocks.values()},
                "devices": [d.summary() for d in self.devices]}
