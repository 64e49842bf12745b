"""The source of a live migration of a livemig machine: QEMU's migration thread.

Phases, as QEMU names them in ``query-migrate``:

* **setup** — channels connected, stream header, configuration, the return
  path opened, the RAM section START (block list) and every iterable
  device's START section, a multifd sync.
* **active** — passes. A pass takes the pages dirtied since the previous one
  (the first pass takes all of them: the bulk pass), sends them inside one
  RAM PART section, lets iterable devices send a PART of their own, and
  ends with a multifd sync and ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (QEMU 10's
  per-round sync). After each pass the bandwidth of that pass says how long
  the pages dirty now would take; once that fits ``downtime-limit`` the
  machine stops. With ``auto-converge``, a machine that dirties faster
  than the link carries is throttled harder after each such pass.
* **completion** — machine stopped, the last dirty pages in the RAM END
  section, iterable devices' END sections, non-iterable devices' FULL
  sections, EOF and the JSON description; then the destination's verdict on
  the return path. ``downtime`` runs from the stop to that verdict.

Any failure or ``migrate_cancel`` ends every thread through the
:class:`~livemig.migration.common.failure.FailureLatch`; the machine runs again if
it was running before, exactly as a QEMU source keeps the guest after a
failed migration.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from livemig.engine.handlers import DeviceHandler, SectionOut
from livemig.engine.machine import Machine
from livemig.engine.migration_run import EventSink, MigrationRun
from livemig.engine.params import MigrationSettings
from livemig.engine.states import FINISHED, MigrationStatus, RunState
from livemig.errors import ConfigError, MigrationError
from livemig.io.guest_ram import PAGE_SIZE
from livemig.io.uri import Uri
from livemig.limits import MULTIFD_PAGES_PER_PACKET
from livemig.migration.common.sync import SyncMode
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.source.device_state_packets import OutgoingDeviceStatePacket
from livemig.migration.source.outgoing_stream import OutgoingStream
from livemig.migration.source.payloads import GuestPages
from livemig.migration.source.rate_limit import RateLimiter
from livemig.wire.constants import Command, SectionType
from livemig.wire.events import RamBlockInfo
from livemig.wire.ram import encode_block_list
from livemig.wire.stream import (
    encode_configuration,
    encode_file_header,
    encode_footer,
    encode_section_header,
    encode_vmdescription,
)

#: Device save threads reading their data fds at the same time. Each device's
#: packets already spread over every multifd channel; more Python threads
#: reading at once only contend for the GIL (4 vfio-sim devices x 128 MiB on
#: 2 CPUs: downtime 1.45 s with one at a time, 1.73 s with all four at once).
DEVICE_STATE_SAVERS_AT_ONCE = max(1, (os.cpu_count() or 2) // 2)


#: Pages per main-channel batch (one staging buffer, one send).
MAIN_BATCH_PAGES = 256
#: QEMU: the throttle grows after this many passes in a row dirtied too fast.
THROTTLE_TRIGGER_PASSES = 2
RAM_SECTION_VERSION = 4


def _iterate(d: DeviceHandler, budget: int, body: SectionOut) -> bool:
    return d.save_live_iterate(body, budget)


class MigrationCancelled(MigrationError):
    """``migrate_cancel`` was asked for."""


class OutgoingMigration(MigrationRun):
    def __init__(self, machine: Machine, uri: str | Uri, settings: MigrationSettings, *,
                 emit: EventSink | None = None, dirty_tracking: str = "software") -> None:
        super().__init__(machine, uri, settings, "migrate", emit)
        if dirty_tracking not in ("software", "kernel"):
            raise ConfigError(f"dirty tracking {dirty_tracking!r}: software or kernel")
        # parameters changed during the migration are read live from ``settings``
        # only where QEMU reads them live (bandwidth, downtime)
        self.settings = settings
        self.tracking = dirty_tracking
        for d in machine.devices:
            d.configure_migration(self.channels)
        # QEMU's ``vm_old_state``: the run state the migration itself stopped the machine
        # in (at completion), None while it has not stopped it. Only a machine the
        # migration stopped while running is resumed after a failure; one the user
        # paused (before or during the migration) stays paused.
        self._vm_old_state: RunState | None = None
        self._trackers: dict[str, Any] = {}
        self.setup_time_ms: int | None = None
        self.downtime_ms: int | None = None
        self.expected_downtime_ms: int | None = None
        self.passes = 0
        self.dirty_sync_count = 0
        self.remaining = machine.ram_size
        self.mbps = 0.0
        self.dirty_pages_rate = 0
        self.pages_per_second = 0
        self.throttle_pct = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self._high_count = 0
        self._last_sent = 0
        self._stopped_at: float | None = None
        self.out: OutgoingStream | None = None

    # -- control -------------------------------------------------------------
    def start(self) -> None:
        self._set_status(MigrationStatus.SETUP)
        self.thread = threading.Thread(target=self._run, name="migration")
        self.thread.start()

    def cancel(self) -> None:
        with self._lock:
            if self.status in FINISHED or self.status is MigrationStatus.CANCELLING:
                return
            self._set_status_locked(MigrationStatus.CANCELLING)
        self.latch.fail(MigrationCancelled("migration cancelled"))

    # -- the migration thread ------------------------------------------------
    def _run(self) -> None:
        try:
            self._migrate()
            self._set_status(MigrationStatus.COMPLETED)
            self.machine.set_state(RunState.POSTMIGRATE)
        except BaseException as e:
            # _migrate raises the first cause of the whole group (or the destination's
            # refusal, when a write failed only because of it)
            self.latch.fail(e)
            first = e
            cancelled = isinstance(self.latch.error, MigrationCancelled)
            if not cancelled:
                self.error_desc = str(first) or repr(first)  # a bug's bare exception too
            self._resume_source()
            with self._lock:
                if cancelled or self.status is MigrationStatus.CANCELLING:
                    self._set_status_locked(MigrationStatus.CANCELLED)
                else:
                    self._set_status_locked(MigrationStatus.FAILED)
            if not isinstance(e, Exception):
                raise
        finally:
            self.end_time = time.monotonic()
            self._cleanup()

    def _resume_source(self) -> None:
        """After a failure or a cancel, give the machine back the run state it had when the
        migration stopped it (QEMU's ``migration_iteration_finish`` with ``vm_old_state``).

        A migration that failed before completion never stopped the machine: whatever
        the user made of it meanwhile (``stop`` during setup) is left alone."""
        self.machine.throttle_pct = 0
        old = self._vm_old_state
        if old is RunState.RUNNING:
            if not self.machine.running:
                self.machine.cont()
                self.emit_event("RESUME", None)
        elif old is not None and self.machine.state is RunState.FINISH_MIGRATE:
            self.machine.set_state(old)

    def _cleanup(self) -> None:
        for t in self._trackers.values():
            t.close()
        for d in self.machine.devices:
            with contextlib.suppress(Exception):  # one device must not hide the cause
                d.save_cleanup()

    def _migrate(self) -> None:
        m = self.machine
        blockers = m.migration_blockers()
        if blockers:
            raise ConfigError("; ".join(blockers))
        with OutgoingStream(self.uri, sync_mode=SyncMode.for_machine(m.machine_type),
                            stats=self.stats, channels=self.channels,
                            compression=self.compression, latch=self.latch) as out:
            self.out = out
            try:
                out.connect()
                self.stats.started = time.monotonic()
                out.put(encode_file_header())
                out.put(encode_configuration(m.machine_type, (), m.uuid))
                out.open_return_path()
                out.connect_multifd(m.uuid)
                self.limiter = RateLimiter(int(self.settings.parameters["max-bandwidth"]),
                                           self.latch)
                self._setup_sections(out)
                self.setup_time_ms = int((time.monotonic() - self.start_time) * 1000)
                self._set_status(MigrationStatus.ACTIVE)
                self._start_tracking()
                while True:
                    self.latch.raise_if_failed()
                    if self._pass(out):
                        break
                self._complete(out)
            except BaseException as e:
                first = out.failure(e)
                if first is e:
                    raise
                raise first from None

    # -- setup ---------------------------------------------------------------
    def _ram_sid(self) -> int:
        return 0

    def _device_sid(self, i: int) -> int:
        return i + 1

    def _setup_sections(self, out: OutgoingStream) -> None:
        m = self.machine
        blocks = [RamBlockInfo(b.name, b.size) for b in m.blocks.values()]
        sid = self._ram_sid()
        out.ram_section_id = sid
        out.section_header(SectionType.SECTION_START, sid, "ram", 0, RAM_SECTION_VERSION)
        out.put(encode_block_list(blocks))
        out.round_done()
        out.end_ram_section()
        for i, d in enumerate(m.devices):
            if d.iterable:
                self._device_section(out, SectionType.SECTION_START, i, d, d.save_setup)
        out.flush()

    def _device_section(self, out: OutgoingStream, kind: SectionType, i: int, d: DeviceHandler,
                        fill: Callable[[SectionOut], object], *, sid: int | None = None) -> int:
        body = SectionOut()
        fill(body)
        if sid is None:
            sid = self._device_sid(i)
        if kind in (SectionType.SECTION_START, SectionType.SECTION_FULL):
            out.put(encode_section_header(kind, sid, d.idstr, d.instance_id, d.version_id))
        else:
            out.put(encode_section_header(kind, sid))
        for part in body.parts:
            out.put(part)
        out.put(encode_footer(sid))
        return body.size

    # -- dirty tracking ------------------------------------------------------
    def _start_tracking(self) -> None:
        m = self.machine
        if self.tracking == "kernel":
            from livemig.io.dirty_kernel import KernelDirtyTracker, address_of
            for b in m.blocks.values():
                t = KernelDirtyTracker(address_of(b.mm), b.size)
                t.start()
                self._trackers[b.name] = t
        for b in m.blocks.values():
            b.mark_all_dirty()  # the bulk pass: every page once

    def _collect(self) -> dict[str, np.ndarray]:
        out = {}
        for name, b in self.machine.blocks.items():
            t = self._trackers.get(name)
            if t is not None:
                b.dirty |= t.collect()
            out[name] = b.take_dirty()
        return out

    def _dirty_now(self) -> int:
        n = 0
        for name, b in self.machine.blocks.items():
            t = self._trackers.get(name)
            if t is not None:
                b.dirty |= t.collect()
            n += int(np.count_nonzero(b.dirty))
        return n

    # -- passes --------------------------------------------------------------
    def _send_pages(self, out: OutgoingStream, dirty: dict[str, np.ndarray]) -> None:
        m = self.machine
        per_job = MULTIFD_PAGES_PER_PACKET if out.sender is not None else MAIN_BATCH_PAGES
        for name, pages in dirty.items():
            blk = m.blocks[name]
            for i in range(0, len(pages), per_job):
                self.latch.raise_if_failed()
                batch = pages[i:i + per_job]
                self.limiter.consume(len(batch) * PAGE_SIZE)
                out.send_pages(GuestPages(blk, batch, self.stats))
        out.flush()

    def _pass(self, out: OutgoingStream) -> bool:
        """One pass; True when what is left fits the downtime limit."""
        m = self.machine
        t0 = time.monotonic()
        bytes0 = self._bytes()
        dirty = self._collect()
        self.dirty_sync_count += 1
        self.passes += 1
        found = sum(len(p) for p in dirty.values())
        if self.caps.get("events"):
            self.emit_event("MIGRATION_PASS", {"pass": self.dirty_sync_count})
        out.section_header(SectionType.SECTION_PART, self._ram_sid())
        pages0 = self.stats.normal_pages + self.stats.zero_pages
        self._send_pages(out, dirty)
        out.round_done()
        out.end_ram_section()
        for i, d in enumerate(m.devices):
            if d.iterable:
                budget = max(1 << 20, int(self._bandwidth_estimate() * 0.05))
                self._device_section(out, SectionType.SECTION_PART, i, d,
                                     functools.partial(_iterate, d, budget))
        out.flush()
        elapsed = max(time.monotonic() - t0, 1e-6)
        sent = self._bytes() - bytes0
        self.precopy_bytes += sent
        if elapsed > 0.005 or not self.mbps:
            self.mbps = sent * 8 / elapsed / 1e6
        self.pages_per_second = int((self.stats.normal_pages + self.stats.zero_pages - pages0)
                                    / elapsed)
        self.dirty_pages_rate = int(found / elapsed) if self.passes > 1 else 0
        pending_pages = self._dirty_now()
        dev_pending = sum(sum(d.state_pending()) for d in m.devices if d.iterable)
        pending = pending_pages * PAGE_SIZE + dev_pending
        self.remaining = pending
        bw = self._switchover_bandwidth()
        limit_ms = int(self.settings.parameters["downtime-limit"])
        self.expected_downtime_ms = int(pending / bw * 1000) if bw else None
        if bw and pending <= bw * limit_ms / 1000:
            return True
        if self.passes > 1:
            # QEMU compares what was dirtied during a period with what was sent during
            # that same period: the pages found now were dirtied while the previous
            # pass was sending
            self._maybe_throttle(found * PAGE_SIZE, self._last_sent)
        self._last_sent = sent
        return False

    def _bytes(self) -> int:
        assert self.out is not None
        return self.out.bytes_written

    def _bandwidth_estimate(self) -> float:
        return self.mbps * 1e6 / 8

    def _switchover_bandwidth(self) -> float:
        avail = int(self.settings.parameters["avail-switchover-bandwidth"])
        if avail:
            return float(avail)
        bw = self._bandwidth_estimate()
        cap = int(self.settings.parameters["max-bandwidth"])
        return min(bw, cap) if cap else bw

    def _maybe_throttle(self, dirtied: int, transferred: int) -> None:
        """QEMU's ``migration_trigger_throttle()``: dirtying above the trigger share of
        what was sent, in consecutive passes, raises the throttle."""
        self.limiter.set_limit(int(self.settings.parameters["max-bandwidth"]))
        if not self.caps.get("auto-converge"):
            return
        p = self.settings.parameters
        if dirtied > transferred * p["throttle-trigger-threshold"] / 100:
            self._high_count += 1
            if self._high_count >= THROTTLE_TRIGGER_PASSES:
                self._high_count = 0
                if self.throttle_pct == 0:
                    pct = p["cpu-throttle-initial"]
                else:
                    pct = self.throttle_pct + p["cpu-throttle-increment"]
                self.throttle_pct = min(pct, p["max-cpu-throttle"])
                self.machine.throttle_pct = self.throttle_pct
        else:
            self._high_count = 0

    # -- completion ----------------------------------------------------------
    def _complete(self, out: OutgoingStream) -> None:
        m = self.machine
        self._stopped_at = time.monotonic()
        self._vm_old_state = m.state
        if m.running:
            m.set_state(RunState.FINISH_MIGRATE)
            self.emit_event("STOP", None)
        else:
            m.set_state(RunState.FINISH_MIGRATE)
        bytes0 = self._bytes()
        dirty = self._collect()
        self.dirty_sync_count += 1
        # QEMU 10: all main-channel precopy data is out; the destination may start
        # loading device state that comes over multifd from here on
        out.command(Command.SWITCHOVER_START, flush=True)  # now: devices load as it arrives
        with ThreadGroup("device-state savers", self.latch) as savers:
            self._start_device_state_savers(out, savers)
            out.section_header(SectionType.SECTION_END, self._ram_sid())
            self._send_pages(out, dirty)
        # The last sync comes after the device-state packets on every channel: once
        # the destination's main stream is past it, no packet is still in flight.
        out.round_done()
        out.end_ram_section()
        description = []
        budget = max(1 << 20, int(self._bandwidth_estimate() * 0.05))
        for i, d in enumerate(m.devices):
            if d.iterable:
                # what the device still holds goes in bounded PART sections first
                while True:
                    done = [False]

                    def part(body: SectionOut, d: DeviceHandler = d,
                             done: list[bool] = done) -> None:
                        done[0] = d.save_live_iterate(body, budget)
                    self._device_section(out, SectionType.SECTION_PART, i, d, part)
                    if done[0]:
                        break
                self._device_section(out, SectionType.SECTION_END, i, d,
                                     d.save_live_complete_precopy)
        for i, d in enumerate(m.devices):
            if d.full_state:
                sid = self._device_sid(i) + (len(m.devices) if d.iterable else 0)
                n = self._device_section(out, SectionType.SECTION_FULL, i, d, d.save_state,
                                         sid=sid)
                entry = d.describe(n)
                entry["section_id"] = sid
                description.append(entry)
        out.put(bytes([SectionType.EOF]))
        doc = {"page_size": PAGE_SIZE, "devices": description}
        out.put(encode_vmdescription(json.dumps(doc).encode()))
        out.finish()
        self.downtime_bytes = self._bytes() - bytes0
        out.await_verdict()
        self.downtime_ms = int((time.monotonic() - self._stopped_at) * 1000)
        self.remaining = 0

    def _start_device_state_savers(self, out: OutgoingStream, savers: ThreadGroup) -> None:
        """One thread per device whose state goes as multifd device-state packets
        (QEMU 10's per-device save threads); they run while the main channel
        carries the RAM END section, :data:`DEVICE_STATE_SAVERS_AT_ONCE` at a time
        (each one's packets go over all channels)."""
        gate = threading.BoundedSemaphore(DEVICE_STATE_SAVERS_AT_ONCE)
        for d in self.machine.devices:
            packets = d.device_state_packets()
            if packets is None:
                continue
            if out.sender is None:
                raise ConfigError(f"device {d.idstr}: device state over multifd needs multifd")

            def run(packets: Iterable[OutgoingDeviceStatePacket] = packets) -> None:
                with gate:
                    for pkt in packets:
                        self.latch.raise_if_failed()
                        out.dispatch(pkt)

            savers.start(run, name=f"save-{d.idstr}")

    # -- reporting -----------------------------------------------------------
    def query(self) -> dict[str, Any]:
        """``query-migrate`` as QEMU 10 shapes it."""
        st = self.status
        out = self._query_head()
        if st is MigrationStatus.NONE:
            return out
        if self.setup_time_ms is not None:
            out["setup-time"] = self.setup_time_ms
        if st is MigrationStatus.COMPLETED and self.downtime_ms is not None:
            out["downtime"] = self.downtime_ms
        elif st is MigrationStatus.ACTIVE and self.expected_downtime_ms is not None:
            out["expected-downtime"] = self.expected_downtime_ms
        s = self.stats
        transferred = s.bytes
        out["ram"] = {
            "transferred": transferred,
            "remaining": self.remaining,
            "total": self.machine.ram_size,
            "duplicate": s.zero_pages,
            "skipped": 0,
            "normal": s.normal_pages,
            "normal-bytes": s.normal_pages * PAGE_SIZE,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": sum(s.multifd_bytes),
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
        if self.throttle_pct:
            out["cpu-throttle-percentage"] = self.throttle_pct
        if st is MigrationStatus.FAILED and self.error_desc:
            out["error-desc"] = self.error_desc
        return out
