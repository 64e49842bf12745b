"""The destination of a live migration into a livemig machine.

The accepting side is the one ``livemig receive`` uses (listener, main
channel loader, multifd receiver, return path); only the sink differs:
pages land in the machine's guest RAM instead of a snapshot file, and
device sections go to the machine's device handlers, which split their
own sections (so iterable devices work) and load them as they arrive.

QEMU's destination order is kept: sections are loaded as they come, every
device's ``load_finish`` runs after EOF, and only then the source gets its
SHUT 0 and the machine runs (if it was started to run, QEMU's autostart).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.engine.handlers import DeviceHandler
from livemig.engine.machine import Machine
from livemig.engine.migration_run import EventSink, MigrationRun
from livemig.engine.params import MigrationSettings
from livemig.engine.states import MigrationStatus, RunState
from livemig.errors import ConfigError, MigrationError, StreamFormatError
from livemig.io.guest_ram import PAGE_SIZE
from livemig.io.uri import Uri
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.destination.device_state_reassembly import DeviceStateReassembler
from livemig.migration.destination.incoming_stream import IncomingMigration
from livemig.wire.constants import Command
from livemig.wire.events import CommandRecord, Configuration, DeviceSection, RamBlockInfo
from livemig.wire.multifd import page_runs
from livemig.wire.stream import LengthFn

PS = PAGE_SIZE
#: Seconds the devices may take to load their multifd state after the stream ended.
DEVICE_STATE_TIMEOUT = 120.0
#: Seconds a destination waits for its source to connect.
ACCEPT_TIMEOUT = 3600.0


class MachineSink:
    """The loader's page sink, writing into guest RAM."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        #: Pages written at least once: a zero page for a page never written
        #: needs no work (fresh guest RAM reads as zeros), as in QEMU.
        self.received = {n: np.zeros(b.page_count, dtype=bool) for n, b in machine.blocks.items()}

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None:
        mine = {n: b.size for n, b in self.machine.blocks.items()}
        theirs = {b.name: b.length for b in blocks}
        for name, size in theirs.items():
            if name not in mine:
                raise ConfigError(f"the source has RAM block {name} ({size} bytes), which this "
                                  "machine does not have")
            if mine[name] != size:
                raise ConfigError(f"RAM block {name}: the source has {size} bytes, this machine "
                                  f"{mine[name]}")
        missing = set(mine) - set(theirs)
        if missing:
            raise ConfigError(f"the source has no RAM block {min(missing)}")

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        blk = self.machine.blocks[block]
        n = len(offsets)
        if not n:
            return
        first = int(offsets[0]) // PS
        if int(offsets[-1]) - int(offsets[0]) == (n - 1) * PS:
            blk.pages[first:first + n] = data
            self.received[block][first:first + n] = True
        else:
            idx = (offsets // PS).astype(np.int64)
            blk.pages[idx] = data
            self.received[block][idx] = True

    def page_views(self, block: str, offsets: np.ndarray) -> list[memoryview]:
        """Where the pages at ``offsets`` (checked against the block by the packet
        decoder) go, as memoryviews of guest RAM, one per run: the multifd
        receiver reads them straight into place."""
        blk = self.machine.blocks[block]
        rec = self.received[block]
        views = []
        for start, length in page_runs(offsets):
            views.append(blk.view[start:start + length])
            rec[start // PS:(start + length) // PS] = True
        return views

    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None:
        blk = self.machine.blocks[block]
        blk.bytes[offset:offset + PS] = np.frombuffer(page, dtype=np.uint8)
        self.received[block][offset // PS] = True

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        blk = self.machine.blocks[block]
        idx = (offsets // PS).astype(np.int64)
        rec = self.received[block]
        if fill:
            blk.pages[idx] = fill
        else:
            again = idx[rec[idx]]
            if again.size:
                blk.pages[again] = 0
        rec[idx] = True

    def read_page(self, block: str, offset: int) -> bytearray:
        return bytearray(self.machine.blocks[block].view[offset:offset + PS])

    def copy_mapped_ram_block(self, src_fd: int, info: RamBlockInfo) -> int:
        raise ConfigError("a livemig machine cannot load a mapped-ram file as a migration")


class IncomingMachineMigration(MigrationRun):
    """``migrate-incoming`` for a machine: runs in its own thread."""

    def __init__(self, machine: Machine, uri: str | Uri, settings: MigrationSettings, *,
                 emit: EventSink | None = None, autostart: bool = True,
                 on_listening: Callable[[str], None] | None = None) -> None:
        super().__init__(machine, uri, settings, "migrate-incoming", emit)
        self.autostart = autostart
        self.on_listening = on_listening
        self.address: str | None = None
        self.listening = threading.Event()
        self.reassembler: DeviceStateReassembler | None = None
        self.incoming: IncomingMigration | None = None
        #: ``main`` (the migration) and ``prefault``; a failure of either fails the latch.
        self.threads = ThreadGroup("incoming-migration", self.latch)

    def start(self) -> None:
        self.machine.set_state(RunState.INMIGRATE)
        self._prefault = self.threads.start(self._populate, name="prefault")
        self.thread = self.threads.start(self._run, name="main")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the migration's threads (the incoming thread joins ``prefault``
        itself); True once they have all ended. :meth:`cancel` ends them promptly."""
        if timeout is None:
            self.threads.join()
            return True
        return super().join(timeout)

    def _populate(self) -> None:
        """Fault guest RAM in while the source is not there yet (the kernel does
        the work; pages that arrive meanwhile are simply written)."""
        for b in self.machine.blocks.values():
            if self.latch.failed:
                return
            b.populate()

    def cancel(self) -> None:
        """End the incoming migration, also while it still waits for its source (the
        latch shuts the listening socket and every channel down)."""
        self.latch.fail(MigrationError("incoming migration cancelled"))

    def _listening(self, address: str) -> None:
        self.address = address
        self.listening.set()
        if self.on_listening is not None:
            self.on_listening(address)

    def _device_state(self, idstr: str, instance_id: int, payload: memoryview,
                      channel: int) -> None:
        """A multifd device-state packet, from a channel thread (only with a reassembler)."""
        assert self.reassembler is not None
        self.reassembler.on_packet(idstr, instance_id, payload, channel, owned=True)

    def _run(self) -> None:
        sink = MachineSink(self.machine)
        reassembler: DeviceStateReassembler | None = None
        inc: IncomingMigration | None = None
        try:
            for d in self.machine.devices:
                d.configure_migration(self.channels)
                d.load_setup()
            targets = {(d.idstr, d.instance_id): t for d in self.machine.devices
                       if (t := d.load_target()) is not None}
            if targets:
                reassembler = DeviceStateReassembler(targets)
                self.reassembler = reassembler
            inc = IncomingMigration(self.uri, self.channels, self.compression, sink,
                                    self.latch, self.stats,
                                    on_device_state=self._device_state if targets else None)
            self.incoming = inc
            self._set_status(MigrationStatus.SETUP)
            inc.connect(accept_timeout=ACCEPT_TIMEOUT, on_listening=self._listening)
            self.start_time = time.monotonic()
            self._set_status(MigrationStatus.ACTIVE)
            inc.load(observer=self._observe, section_lengths=self._section_lengths)
            if reassembler is not None:
                # a livemig source syncs the channels after its device-state packets:
                # past the main stream's end, none is still in flight
                reassembler.no_more_packets()
                reassembler.finish(DEVICE_STATE_TIMEOUT)
            for d in self.machine.devices:
                d.load_finish()
            inc.confirm()
            self._set_status(MigrationStatus.COMPLETED)
            if self.autostart:
                self.machine.cont()
                self.emit_event("RESUME", None)
            else:
                self.machine.set_state(RunState.PAUSED)
        except BaseException as e:
            if inc is not None:
                inc.refuse()  # first: the latch shuts the main channel down
            self.latch.fail(e)
            first = self.latch.error
            self.error_desc = str(first) or repr(first)  # a bug's bare exception too
            if inc is not None:
                inc.abort()
                inc.close()  # the listener is gone once the status says failed
            if reassembler is not None:
                reassembler.abort()
            self._set_status(MigrationStatus.FAILED)
            # QEMU's destination exits after a failed incoming migration; a livemig
            # machine stays, paused, so that its owner can see what happened.
            self.machine.set_state(RunState.PAUSED)
            if not isinstance(e, Exception):
                raise
        finally:
            self.listening.set()
            self.end_time = time.monotonic()
            self._prefault.join()
            if inc is not None:
                inc.close()
            for d in self.machine.devices:
                with contextlib.suppress(Exception):  # one device must not hide the cause
                    d.load_cleanup()

    # -- devices -------------------------------------------------------------
    def _section_lengths(self, idstr: str, instance_id: int) -> LengthFn | None:
        d = self.machine.device(idstr, instance_id)
        return d.section_length if d is not None else None

    def _observe(self, ev: object) -> None:
        if type(ev) is CommandRecord and ev.cmd == Command.SWITCHOVER_START:
            if self.reassembler is not None:
                self.reassembler.main_stream_complete()
            return
        if type(ev) is not DeviceSection:
            return
        hdr = ev.header
        d: DeviceHandler | None = self.machine.device(hdr.idstr, hdr.instance_id)
        if d is None:
            raise StreamFormatError(f"device section {hdr.idstr!r} instance {hdr.instance_id}: "
                                    "this machine has no such device (start the destination "
                                    "with the same devices as the source)")
        if hdr.version_id > d.version_id:
            raise StreamFormatError(f"device {hdr.idstr}: section version {hdr.version_id} is "
                                    f"newer than this machine's {d.version_id}")
        body = memoryview(ev.raw)[ev.body_offset:ev.body_offset + ev.body_length]
        d.load_state(body, hdr.version_id, hdr.kind.name.removeprefix("SECTION_"))

    def query(self) -> dict[str, Any]:
        st = self.status
        out = self._query_head()
        if st is MigrationStatus.NONE:
            return out
        s = self.stats
        out["ram"] = {"transferred": s.bytes, "remaining": 0, "total": self.machine.ram_size,
                      "duplicate": s.zero_pages, "normal": s.normal_pages,
                      "normal-bytes": s.normal_pages * PS, "page-size": PS,
                      "multifd-bytes": sum(s.multifd_bytes), "mbps": 0, "dirty-sync-count": 0,
                      "dirty-pages-rate": 0, "pages-per-second": 0, "skipped": 0,
                      "postcopy-requests": 0}
        if st is MigrationStatus.FAILED and self.error_desc:
            out["error-desc"] = self.error_desc
        return out
