"""``vfio-sim`` as a device of a livemig machine: VFIO migration, both transfer paths.

The device core (:class:`~livemig.vfio.sim_device.VfioSimDevice`) behaves like a VFIO
device behind the kernel's uAPI v2; this handler drives it the way QEMU 10's
``hw/vfio/migration.c`` does:

* setup: the device enters PRE_COPY, the START section carries
  ``DEV_SETUP_STATE``;
* precopy passes: PART sections with what the data fd has now
  (``DEV_DATA_STATE`` chunks, ``DEV_INIT_DATA_SENT`` once the initial data
  is out);
* machine stopped: the device enters STOP_COPY, and the rest goes

  - ``main``: in more PART sections (bounded ones, so that no section outgrows a
    read buffer), then the END section (``END_OF_STATE``) and the config in a
    FULL section, all on the main channel;
  - ``multifd``: as device-state packets ``{version, idx, flags}`` over the
    multifd channels, sent by a thread of this device while the main channel
    carries the END and FULL sections (``END_OF_STATE`` only), the config in
    the last packet.

On the destination the device sits in RESUMING with its data fd open from
setup on; main-channel data is written as sections arrive, multifd packets
through the engine's reassembler, and leaving RESUMING checks the device's
content against the source's digest (``verified``).

A worker changes device memory while the machine runs (the device is live,
like a NIC receiving packets), parked by the machine's gate when it stops.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from livemig.engine.handlers import DeviceHandler, SectionOut
from livemig.engine.machine import Machine
from livemig.errors import ConfigError, StateError, StreamFormatError
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.source.device_state_packets import (
    OutgoingDeviceStatePacket,
    device_state_packets,
)
from livemig.vfio.sim_device import LoadTarget, VfioSimDevice, read_data
from livemig.vfio.state_machine import DeviceState as S
from livemig.vfio.state_machine import MigrationFlag
from livemig.wire.cursor import Incomplete
from livemig.wire.vfio_section import (
    VfioConfig,
    VfioData,
    VfioSectionDecoder,
    encode_complete,
    encode_config,
    encode_end_of_state,
    encode_iterate,
    encode_setup,
)

#: Device data per PART section: sections stay far below the destination's read
#: buffer (4 MiB) and a pass never holds the main channel for long.
SECTION_DATA = 1 << 20
#: Fraction of the device's chunks the worker changes per step, and the pause.
MUTATE_FRACTION = 0.002
MUTATE_PERIOD = 0.01

TRANSFERS = ("main", "multifd", "auto")


class VfioSimHandler(DeviceHandler):
    kind = "vfio-sim"
    iterable = True

    def __init__(self, machine: Machine, index: int, *, state_size: int = 64 << 20,
                 transfer: str = "auto", source: bool = True, mutate: bool = True,
                 precopy: bool = True) -> None:
        if transfer not in TRANSFERS:
            raise ConfigError(f"device-state transfer {transfer!r}: main, multifd or auto")
        self.idstr = f"0000:00:{index + 4:02x}.0/vfio"
        self.machine = machine
        self.transfer = transfer
        # Without VFIO_MIGRATION_PRE_COPY (many real devices) all the state moves
        # while the machine is stopped.
        features = MigrationFlag.STOP_COPY | MigrationFlag.P2P
        if precopy:
            features |= MigrationFlag.PRE_COPY
        self.precopy = precopy
        self.dev = VfioSimDevice(f"vfio-sim{index}", mem_size=state_size, features=features,
                                 seed=index if source else None)
        self.config_size = len(self.dev.save_config())
        self.fd: int | None = None
        self.mutating = mutate
        self._init_sent = False
        self._stop = threading.Event()
        # The worker (one thread); close() joins it and raises its error, if it had one.
        self._workers = ThreadGroup(f"{self.dev.name}-worker")
        self._worker: threading.Thread | None = None
        self.state_bytes = 0
        self.verified: bool | None = None
        self.channels = 0  # the engine says how many multifd channels there are

    # -- which path ----------------------------------------------------------
    def configure_migration(self, channels: int) -> None:
        self.channels = channels

    @property
    def multifd(self) -> bool:
        """QEMU's x-migration-multifd-transfer: auto = multifd when there are channels."""
        if self.transfer == "auto":
            return self.channels > 0
        return self.transfer == "multifd"

    def migration_blocker(self) -> str | None:
        if self.transfer == "multifd" and not self.channels:
            return "device state over multifd (--device-state-transfer multifd) needs multifd"
        return None

    # -- the live device -----------------------------------------------------
    def on_run_state(self, running: bool) -> None:
        if not running and self.dev.state == S.PRE_COPY:
            # QEMU's VM state change handler: a device in precopy goes to STOP_COPY
            # when the VM stops for switchover
            self._enter_stop_copy()
        if running and self.mutating and self._worker is None:
            self.machine.register_worker()
            self._worker = self._workers.start(self._mutate, name="mutate")

    def _mutate(self) -> None:
        worked = 0.0
        try:
            while self.machine.gate(worked, self._stop, MUTATE_PERIOD):
                if self.dev.state in (S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P):
                    # the device may have stopped since the check; the gate parks us next
                    with contextlib.suppress(StateError):
                        self.dev.mutate(MUTATE_FRACTION)
        finally:
            self.machine.unregister_worker()

    def close(self) -> None:
        """Stop and join the worker, release the device; then raise the worker's error."""
        self._stop.set()
        self.machine.wake_workers()
        try:
            self._workers.join(close=True)
        finally:
            self._close_fd()
            self.dev.close()
        self._workers.raise_if_failed()

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- wire framing --------------------------------------------------------
    def _decoder(self) -> VfioSectionDecoder:
        return VfioSectionDecoder(multifd_transfer=self.multifd, config_size=self.config_size,
                                  where=f"device {self.idstr}")

    def section_length(self, buf: memoryview, pos: int, end: int) -> int:
        dec = self._decoder()
        _, at = dec.parse(buf, pos, end)
        if not dec.done:
            raise Incomplete
        return at - pos

    # -- source --------------------------------------------------------------
    def save_setup(self, out: SectionOut) -> None:
        if self.precopy:
            self.fd = self.dev.set_state(S.PRE_COPY)
        out.write(encode_setup())

    def state_pending(self) -> tuple[int, int]:
        initial, dirty = self.dev.precopy_info() if self.dev.state == S.PRE_COPY else (0, 0)
        return (initial + dirty, self.dev.stop_copy_size())

    def _read(self, budget: int) -> tuple[list[bytes], bool]:
        """Up to ``budget`` bytes from the data fd; True when nothing is left now."""
        assert self.fd is not None
        chunks, n, drained = [], 0, False
        while n < budget:
            data = read_data(self.fd, min(SECTION_DATA, budget - n))
            if not data:
                drained = True
                break
            chunks.append(data)
            n += len(data)
        self.state_bytes += n
        return chunks, drained

    def save_live_iterate(self, out: SectionOut, budget: int) -> bool:
        if not self.precopy and self.dev.state in (S.RUNNING, S.RUNNING_P2P) \
                and self.machine.running:
            out.write(encode_end_of_state())  # nothing moves before the machine stops
            return True
        if self.dev.state == S.PRE_COPY:
            chunks, drained = self._read(min(budget, SECTION_DATA))
            initial, _ = self.dev.precopy_info()
            first_done = not self._init_sent and initial == 0
            if first_done:
                self._init_sent = True
            for part in encode_iterate(chunks, init_data_sent=first_done):
                out.write(part)
            return drained
        if self.dev.state != S.STOP_COPY:
            self._enter_stop_copy()
        if self.multifd:
            out.write(encode_end_of_state())
            return True
        chunks, drained = self._read(SECTION_DATA)
        for part in encode_iterate(chunks):
            out.write(part)
        return drained

    def _enter_stop_copy(self) -> None:
        fd = self.dev.set_state(S.STOP_COPY)
        if fd is not None:
            self._close_fd()
            self.fd = fd
        assert self.fd is not None
        # in STOP_COPY a read waits for data and returns b"" only at the end
        os.set_blocking(self.fd, True)

    def save_live_complete_precopy(self, out: SectionOut) -> None:
        if self.dev.state != S.STOP_COPY:
            self._enter_stop_copy()
        for part in encode_complete([]):
            out.write(part)

    @property
    def full_state(self) -> bool:
        return True

    def save_state(self, out: SectionOut) -> None:
        """The FULL section: the config (main path), or only END_OF_STATE (multifd:
        the config is the last device-state packet)."""
        if self.multifd:
            out.write(encode_end_of_state())
            return
        for part in encode_config(self.dev.save_config()):
            out.write(part)

    def device_state_packets(self) -> Iterator[OutgoingDeviceStatePacket] | None:
        """The stop-copy data as multifd device-state packets (None: main path)."""
        if not self.multifd:
            return None
        if self.dev.state != S.STOP_COPY:
            self._enter_stop_copy()
        assert self.fd is not None

        def counted(n: int) -> memoryview:
            # fill the packet: the sim's pipe hands out about one 64 KiB record per
            # read, and a packet per record would be 16 times the packets
            buf = memoryview(bytearray(n))
            got = 0
            while got < n:
                k = os.readv(self.fd, [buf[got:]])  # type: ignore[arg-type]
                if not k:
                    break
                got += k
            self.state_bytes += got
            return buf[:got]

        return device_state_packets(self.idstr, self.instance_id, counted, self.dev.save_config)

    def save_cleanup(self) -> None:
        self._close_fd()
        if self.dev.state not in (S.RUNNING, S.STOP):
            try:
                self.dev.set_state(S.STOP)
            except Exception:  # noqa: BLE001 - a device in ERROR is reset below
                self.dev.reset()
        if self.machine.running and self.dev.state == S.STOP:
            self.dev.set_state(S.RUNNING)

    # -- destination ---------------------------------------------------------
    def load_setup(self) -> None:
        self.mutating = False  # the destination's device is driven by the stream
        if self.dev.state != S.STOP:
            self.dev.set_state(S.STOP)
        self.fd = self.dev.set_state(S.RESUMING)

    def load_target(self) -> _CountingTarget | None:
        if not self.multifd:
            return None
        assert self.fd is not None
        return _CountingTarget(self, self.dev.load_target(self.fd))

    def load_state(self, body: memoryview, version_id: int, kind: str) -> None:
        events, _ = self._decoder().parse(body, 0, len(body), final=True)
        for ev in events:
            if isinstance(ev, VfioData):
                if self.fd is None:
                    # the multifd config packet, loaded by now, ended RESUMING (END and
                    # FULL sections arrive while the device state is still loading)
                    raise StreamFormatError(f"device {self.idstr}: device data in a {kind} "
                                            "section after the device left RESUMING")
                view = ev.data
                while view:
                    view = view[os.write(self.fd, view):]
                self.state_bytes += len(ev.data)
            elif isinstance(ev, VfioConfig):
                self.dev.load_config(ev.data)

    def load_finish(self) -> None:
        self._close_fd()
        try:
            if self.dev.state == S.RESUMING:
                self.dev.set_state(S.STOP)
            self.dev.set_state(S.RUNNING)
        except StreamFormatError:
            self.verified = False
            raise
        # from the chunk hashes the device keeps: no pass over its memory in the downtime
        self.verified = self.dev.matches_source()
        if not self.verified:
            raise StreamFormatError(f"device {self.idstr}: its state does not match the "
                                    "source's digest")

    def load_cleanup(self) -> None:
        self._close_fd()

    def summary(self) -> dict[str, Any]:
        # verified again from memory itself (after the migration, off the clock)
        verified = self.dev.verified if self.verified else self.verified
        return {"name": self.idstr, "kind": self.kind, "state_bytes": self.state_bytes,
                "verified": verified, "transfer": "multifd" if self.multifd else "main",
                "precopy": self.precopy}


class _CountingTarget:
    """The device's load target, counting what the reassembler writes into it."""

    def __init__(self, handler: VfioSimHandler, target: LoadTarget) -> None:
        self.handler = handler
        self.target = target

    def write_data(self, data: memoryview) -> None:
        self.target.write_data(data)
        self.handler.state_bytes += len(data)

    def load_config(self, config: memoryview) -> None:
        self.target.load_config(config)
        # the config is the last packet: leave RESUMING here, in this device's load
        # thread, so that the devices' resume checks run in parallel, not one by
        # one in load_finish after the stream ended
        self.handler._close_fd()
        self.handler.dev.set_state(S.STOP)

    def cancel(self) -> None:
        self.target.cancel()
