"""Issue 12, the engine's share: operator mistakes and hostile peers get QEMU's answer.

Every wait is on an event (a connection accepted, a status reached, a process
ended) with a deadline; nothing here measures elapsed time.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.engine.controller import CommandError, MachineController
from livemig.engine.handlers import BlobDevice
from livemig.engine.machine import Machine

MIB = 1 << 20
DEADLINE = 60.0


class Recorder:
    """A controller's events, with a condition to wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, data: Any) -> None:
        with self._cond:
            self.events.append((name, data))
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [n for n, _ in self.events]


@pytest.fixture
def machines() -> Iterator[list[tuple[MachineController, Machine]]]:
    made: list[tuple[MachineController, Machine]] = []
    yield made
    for ctl, m in made:
        ctl.close()
        m.close()


def _machine(made: list[tuple[MachineController, Machine]], rec: Recorder, *,
             incoming: str | None = None, devices: tuple[BlobDevice, ...] = (),
             ) -> tuple[MachineController, Machine]:
    m = Machine(8 * MIB)
    for d in devices:
        m.add_device(d)
    ctl = MachineController(m, incoming=incoming, emit=rec)
    made.append((ctl, m))
    ctl.start()
    ctl.migrate_set_capabilities([{"capability": "events", "state": True}])
    return ctl, m


# -- item 13: a failed migration leaves a machine the user paused paused -------------------


@pytest.mark.parametrize("when", ["before", "during-setup"])
def test_failed_migration_keeps_user_pause(machines: list[tuple[MachineController, Machine]],
                                           workdir: Path, when: str) -> None:
    """QEMU resumes after a failure only a machine the migration itself stopped
    (``vm_old_state``); a ``stop`` by the user, before or during the migration, stays."""
    rec = Recorder()
    ctl, m = _machine(machines, rec)
    assert m.state == "running"
    path = str(workdir / "silent.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(DEADLINE)
    try:
        if when == "before":
            ctl.stop()
        ctl.migrate(f"unix:{path}")
        conn, _ = lsock.accept()  # the migration is under way: its main channel is here
        if when == "during-setup":
            ctl.stop()
        assert m.state == "paused"
        conn.close()  # the destination goes away: the migration fails
    finally:
        lsock.close()
    assert ctl.wait_migration(DEADLINE) == "failed"
    assert m.state == "paused"
    assert "RESUME" not in rec.names(), rec.events
    assert ctl.query_status() == {"status": "paused", "running": False}


# -- item 4: a machine whose incoming migration failed cannot be migrated on ---------------


def test_failed_incoming_refuses_migrate(machines: list[tuple[MachineController, Machine]],
                                         workdir: Path) -> None:
    src_rec, dst_rec = Recorder(), Recorder()
    src, _ = _machine(machines, src_rec, devices=(BlobDevice("only-on-source", b"abc"),))
    dst, dst_m = _machine(machines, dst_rec, incoming="defer")
    with pytest.raises(CommandError, match=r"^Guest is waiting for an incoming migration$"):
        dst.migrate(f"unix:{workdir}/never.sock")  # not loaded yet
    uri = f"unix:{workdir}/mig.sock"
    dst.migrate_incoming(uri)
    src.migrate(uri)
    assert src.wait_migration(DEADLINE) == "failed"
    assert dst.wait_migration(DEADLINE) == "failed"
    with pytest.raises(CommandError, match=r"^Guest is waiting for an incoming migration$"):
        dst.migrate(f"unix:{workdir}/third.sock")
    assert dst.outgoing is None
    with pytest.raises(CommandError):
        dst.cont()
    assert dst_m.state == "paused"
    assert "RESUME" not in dst_rec.names()
