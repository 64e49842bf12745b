"""What an outgoing and an incoming migration of a machine have in common.

Both run in a thread of their own, keep QEMU's MigrationStatus (moved only
along :data:`~livemig.engine.states.STATUS_ARCS`, with a MIGRATION event per
change when the ``events`` capability is on), count what moved, and end
through a :class:`~livemig.migration.common.failure.FailureLatch`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from livemig.engine.machine import Machine
from livemig.engine.params import MigrationSettings
from livemig.engine.states import FINISHED, MigrationStatus, next_status
from livemig.errors import ConfigError
from livemig.io.uri import TcpUri, UnixUri, Uri, parse_uri
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import MultifdCompression

EventSink = Callable[[str, "dict[str, Any] | None"], None]


class MigrationRun:
    def __init__(self, machine: Machine, uri: str | Uri, settings: MigrationSettings,
                 command: str, emit: EventSink | None) -> None:
        self.machine = machine
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        if not isinstance(self.uri, (TcpUri, UnixUri)):
            raise ConfigError(f"{command} needs a tcp: or unix: URI, not {self.uri}")
        self.caps = dict(settings.capabilities)
        self.channels = settings.channels
        self.compression = MultifdCompression(settings.compression)
        self.emit_event: EventSink = emit or (lambda name, data: None)
        self.latch = FailureLatch()
        self.stats = TransferStats()
        self.status: MigrationStatus = MigrationStatus.NONE
        self.error_desc: str | None = None
        self.thread: threading.Thread | None = None
        self.start_time = time.monotonic()
        self.end_time: float | None = None
        self._lock = threading.Lock()

    def join(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def _query_head(self) -> dict[str, Any]:
        """The start of ``query-migrate``: the status and, once started, its total time."""
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is not MigrationStatus.NONE:
            now = self.end_time or time.monotonic()
            out["total-time"] = int((now - self.start_time) * 1000)
        return out

    def _set_status(self, new: MigrationStatus | str) -> None:
        with self._lock:
            self._set_status_locked(new)

    def _set_status_locked(self, new: MigrationStatus | str) -> None:
        """Move along an arc of :data:`~livemig.engine.states.STATUS_ARCS` (the
        current status again is nothing to do); any other pair raises
        :class:`~livemig.engine.states.TransitionError` and changes nothing. A
        string is read as its :class:`MigrationStatus`."""
        if self.status == new:
            return
        self.status = next_status(self.status, new)
        if self.caps.get("events"):
            self.emit_event("MIGRATION", {"status": self.status.value})
