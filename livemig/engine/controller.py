"""The operations a user of a running machine has: QEMU's monitor, as Python.

One :class:`MachineController` per machine owns its migrations (at most one
at a time, like QEMU), the migration settings, and the events. Every method
is what one QMP command does, with QEMU's name in its docstring; the QMP
socket (``livemig.control``) is a thin table over these methods, and the
Python API is these methods.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from livemig.engine.incoming_migration import IncomingMachineMigration
from livemig.engine.machine import Machine
from livemig.engine.migration_run import EventSink
from livemig.engine.outgoing_migration import OutgoingMigration
from livemig.engine.params import PARAMETERS, MigrationSettings
from livemig.engine.states import MigrationStatus, RunState
from livemig.engine.workload import DirtyPagesWorkload
from livemig.errors import ConfigError, MigrationError


class CommandError(MigrationError):
    """A monitor command cannot be done now (QEMU's GenericError)."""


class MachineController:
    def __init__(self, machine: Machine, *, dirty_tracking: str = "software",
                 incoming: str | None = None, autostart: bool = True,
                 emit: EventSink | None = None) -> None:
        self.machine = machine
        self.settings = MigrationSettings()
        self.dirty_tracking = dirty_tracking
        self.autostart = autostart
        self._emit = emit
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMachineMigration | None = None
        self.incoming_uri = incoming  # "defer", a URI, or None
        self.quit_requested = threading.Event()
        self._lock = threading.Lock()
        if dirty_tracking == "kernel":
            from livemig.io.dirty_kernel import kernel_tracking_unavailable
            why = kernel_tracking_unavailable()
            if why:
                raise ConfigError(f"kernel dirty tracking is unavailable here: {why}")
        elif dirty_tracking != "software":
            raise ConfigError(f"dirty tracking {dirty_tracking!r}: software or kernel")

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self._emit is not None:
            self._emit(event, data)

    def start(self) -> None:
        """What happens at process start: listen (``-incoming URI``) or run."""
        if self.incoming_uri and self.incoming_uri != "defer":
            self.migrate_incoming(self.incoming_uri)
        elif self.incoming_uri == "defer":
            self.machine.set_state(RunState.INMIGRATE)
        elif self.autostart:
            self.machine.cont()

    # -- run state (query-status, stop, cont, quit) --------------------------
    def query_status(self) -> dict[str, Any]:
        st = self.machine.state
        return {"status": st.value, "running": st is RunState.RUNNING}

    def stop(self) -> None:
        if self.machine.state is RunState.RUNNING:
            self.machine.stop()
            self.emit("STOP")

    def cont(self) -> None:
        st = self.machine.state
        if st is RunState.INMIGRATE:
            raise CommandError("Migration is not finalized yet")
        if st is RunState.FINISH_MIGRATE:
            raise CommandError("a migration is completing; try again")
        if self.incoming is not None and self.incoming.status is MigrationStatus.FAILED:
            raise CommandError("the incoming migration failed (guest memory and devices are "
                               "incomplete): this machine cannot run")
        if st is not RunState.RUNNING:
            self.machine.cont()
            self.emit("RESUME")

    def quit(self) -> None:
        self.quit_requested.set()

    # -- migration -----------------------------------------------------------
    def _busy(self) -> bool:
        return any(m is not None and not m.finished for m in (self.outgoing, self.incoming))

    def _refuse_unless_loaded(self) -> None:
        """QEMU's ``migrate_prepare`` check: a machine waiting for, or left incomplete by,
        an incoming migration holds no state worth sending (QEMU's runstate stays
        ``inmigrate`` until the load completes, and its destination exits on failure)."""
        inc = self.incoming
        if self.machine.state is RunState.INMIGRATE or (
                inc is not None and inc.status is not MigrationStatus.COMPLETED):
            raise CommandError("Guest is waiting for an incoming migration")

    def migrate(self, uri: str) -> None:
        """QMP ``migrate``."""
        with self._lock:
            if self._busy():
                raise CommandError("There's a migration process in progress")
            self._refuse_unless_loaded()
            if self.machine.state is RunState.POSTMIGRATE:
                raise CommandError("Can't migrate the vm that was paused due to previous "
                                   "migration")
            for d in self.machine.devices:
                d.configure_migration(self.settings.channels)
            blockers = self.machine.migration_blockers()
            if blockers:
                raise CommandError("; ".join(blockers))
            mig = OutgoingMigration(self.machine, uri, self.settings, emit=self.emit,
                                    dirty_tracking=self.dirty_tracking)
            self.outgoing = mig
            mig.start()

    def migrate_incoming(self, uri: str) -> None:
        """QMP ``migrate-incoming`` (and ``-incoming URI`` at start)."""
        with self._lock:
            if self.incoming is not None:
                raise CommandError("The incoming migration has already been started")
            if self._busy():
                raise CommandError("There's a migration process in progress")
            if self.machine.state not in (RunState.INMIGRATE, RunState.PAUSED,
                                          RunState.PRELAUNCH):
                raise CommandError("'-incoming' was not specified on the command line")
            mig = IncomingMachineMigration(self.machine, uri, self.settings, emit=self.emit,
                                           autostart=self.autostart)
            self.incoming = mig
            mig.start()
        mig.listening.wait(30)

    def migrate_cancel(self) -> None:
        """QMP ``migrate_cancel`` / ``migrate-cancel``: source resumes, channels close."""
        mig = self.outgoing
        if mig is not None and not mig.finished:
            mig.cancel()
        inc = self.incoming
        if inc is not None and not inc.finished:
            inc.cancel()

    def wait_migration(self, timeout: float | None = None) -> str:
        """Block until the current migration ends; its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for mig in (self.outgoing, self.incoming):
            if mig is None:
                continue
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            mig.join(left)
        return self.query_migrate()["status"]

    def query_migrate(self) -> dict[str, Any]:
        mig = self.outgoing if self.outgoing is not None else self.incoming
        if mig is None:
            return {}
        return mig.query()

    def migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        if self._busy():
            raise CommandError("There's a migration process in progress")
        self.settings.set_capabilities(capabilities)

    def query_migrate_capabilities(self) -> list[dict[str, Any]]:
        return self.settings.query_capabilities()

    def migrate_set_parameters(self, **params: Any) -> None:
        live = {"max-bandwidth", "downtime-limit", "avail-switchover-bandwidth",
                "cpu-throttle-increment", "max-cpu-throttle", "throttle-trigger-threshold"}
        if self._busy() and set(params) - live:
            raise CommandError(f"parameters {sorted(set(params) - live)} cannot change during "
                               "a migration")
        self.settings.set_parameters(params)

    def query_migrate_parameters(self) -> dict[str, Any]:
        return {k: self.settings.parameters[k] for k in PARAMETERS}

    # -- the workload --------------------------------------------------------
    def workload(self) -> DirtyPagesWorkload | None:
        for d in self.machine.devices:
            if isinstance(d, DirtyPagesWorkload):
                return d
        return None

    def query_workload(self) -> dict[str, Any]:
        w = self.workload()
        if w is None:
            raise CommandError("this machine runs no workload")
        return w.query()

    def close(self) -> None:
        self.migrate_cancel()
        if self.outgoing is not None:
            self.outgoing.join()  # cancelled above: the latch wakes every thread of it
        if self.incoming is not None:
            self.incoming.join()  # cancelled above: every thread of it ends now
        w = self.workload()
        if w is not None:
            w.stop()
