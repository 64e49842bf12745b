"""``livemig receive``: keep multifd device-state packets for the snapshot, checked.

A capture has no device to load VFIO state into, so instead of reassembling
(:mod:`livemig.migration.destination.device_state_reassembly`) it checks each packet against the
same numbering rules as it arrives -- one config packet, numbered last, no
duplicate idx -- and hands it to a store (the snapshot's trailer, written to
disk, so memory stays bounded whatever the device size). At the end every
device that sent packets must have all of idx 0..config: a capture that would
not load is refused while the source can still resume.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from livemig import limits
from livemig.errors import LimitExceeded, StreamFormatError
from livemig.wire.constants import SectionType
from livemig.wire.events import DeviceSection
from livemig.wire.multifd import encode_device_state_header
from livemig.wire.vfio_packet import (
    VFIO_DEVICE_STATE_PACKET_HEADER_SIZE,
    VfioPacketHeader,
    decode_vfio_packet_header,
    idx_ranges,
    placement_error,
)
from livemig.wire.vfio_section import decode_config_blob, encode_end_of_state

__all__ = ["DeviceStateRecorder", "RecordedDevice", "multifd_devices"]

#: How long receive waits, after the main stream ended, for device-state packets still
#: on the channels. A livemig source fences them with its last multifd sync, so none
#: is; QEMU 10 joins its device-state threads before EOF, so what is in flight is
#: at most what the sockets hold.
DEVICE_STATE_DRAIN = 10.0


def multifd_devices(sections: Iterable[DeviceSection]) -> set[tuple[str, int]]:
    """The VFIO devices whose state travelled over multifd: their FULL section holds
    only ``END_OF_STATE`` (the config went in their last device-state packet)."""
    end = encode_end_of_state()
    return {(s.header.idstr, s.header.instance_id) for s in sections
            if s.header.kind is SectionType.SECTION_FULL and s.header.idstr.endswith("/vfio")
            and s.raw[s.body_offset:s.body_offset + s.body_length] == end}

#: ``store(multifd_header, payload)``: appends one packet; called under the recorder's lock.
Store = Callable[[bytes, memoryview], None]


@dataclass
class RecordedDevice:
    """What one device sent; ``idx`` holds every idx that arrived."""

    idstr: str
    instance_id: int
    idx: set[int] = field(default_factory=set)
    config_idx: int | None = None
    max_data_idx: int = -1
    data_bytes: int = 0
    config_bytes: int = 0

    @property
    def label(self) -> str:
        return f"device {self.idstr} instance {self.instance_id}"

    def missing(self) -> str:
        """What the device still lacks to be loadable, or ""."""
        if self.config_idx is None:
            return "no config packet arrived"
        gaps = [i for i in range(self.config_idx) if i not in self.idx]
        if gaps:
            return f"idx {idx_ranges(gaps)} never arrived (config packet idx {self.config_idx})"
        return ""


class DeviceStateRecorder:
    def __init__(self, store: Store, *,
                 max_bytes: int = limits.MAX_SNAPSHOT_DEVICE_STATE) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ended = False
        self.devices: dict[tuple[str, int], RecordedDevice] = {}
        self.max_bytes = max_bytes
        self.bytes = 0
        self.packets = 0

    def on_packet(self, idstr: str, instance_id: int, payload: memoryview,
                  channel: int | None = None) -> None:
        """One device-state packet's payload, from any multifd channel thread."""
        where = f"{'' if channel is None else f'multifd channel {channel}, '}device {idstr} " \
                f"instance {instance_id}"
        view = memoryview(payload).cast("B")
        try:
            hdr = decode_vfio_packet_header(view)
        except StreamFormatError as e:
            raise StreamFormatError(e.message, where=where, raw=e.raw) from None
        data = view[VFIO_DEVICE_STATE_PACKET_HEADER_SIZE:]
        self._admit(idstr, instance_id, hdr, len(view), data if hdr.is_config else None,
                    where, keep=view)

    def check(self, idstr: str, instance_id: int, hdr: VfioPacketHeader, payload_size: int,
              config: memoryview | None) -> None:
        """The same checks for a packet already stored (its VFIO header decoded; the
        config packet's data, else None), without keeping it: a reader of a trailer."""
        self._admit(idstr, instance_id, hdr, payload_size, config,
                    f"device {idstr} instance {instance_id}", keep=None)

    def _admit(self, idstr: str, instance_id: int, hdr: VfioPacketHeader, size: int,
               config: memoryview | None, where: str, keep: memoryview | None) -> None:
        idx = hdr.idx
        where += f", VFIO packet idx {idx}"
        if config is not None:
            try:
                decode_config_blob(config, where="config packet")
            except StreamFormatError as e:
                raise StreamFormatError(f"config packet: {e.message}", where=where,
                                        raw=e.raw) from None
        with self._lock:
            dev = self.devices.get((idstr, instance_id))
            if dev is None:
                dev = self.devices[(idstr, instance_id)] = RecordedDevice(idstr, instance_id)
            why = f"duplicate idx {idx}" if idx in dev.idx else placement_error(
                idx, hdr.is_config, config_idx=dev.config_idx, max_data_idx=dev.max_data_idx)
            if why is not None:
                raise StreamFormatError(why, where=where,
                                        raw=None if keep is None else bytes(keep[:16]))
            if self.bytes + size > self.max_bytes:
                raise LimitExceeded(f"more than {self.max_bytes} bytes of device state over "
                                    "multifd", where=where)
            if keep is not None:
                self._store(encode_device_state_header(idstr, instance_id, size), keep)
            dev.idx.add(idx)
            data_size = size - VFIO_DEVICE_STATE_PACKET_HEADER_SIZE
            if hdr.is_config:
                dev.config_idx = idx
                dev.config_bytes = data_size
            else:
                dev.max_data_idx = max(dev.max_data_idx, idx)
                dev.data_bytes += data_size
            self.bytes += size
            self.packets += 1
            self._changed.notify_all()

    def wait_complete(self, devices: set[tuple[str, int]], timeout: float,
                      failed: Callable[[], bool]) -> None:
        """Wait until each of ``devices`` has all its packets (they can still be on
        the channels when the main stream ends); raise naming what is missing after
        ``timeout`` seconds. Returns early once ``failed()`` or once the channels ended
        (:meth:`channels_ended`). Nothing here polls: whoever makes ``failed()`` true
        must call :meth:`wake` (``latch.on_failure(recorder.wake)``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not failed() and not self._ended:
                waiting = [k for k in sorted(devices)
                           if k not in self.devices or self.devices[k].missing()]
                if not waiting:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    why = "; ".join(
                        f"device {i} instance {n}: " + (self.devices[(i, n)].missing()
                                                        if (i, n) in self.devices
                                                        else "no packet arrived")
                        for i, n in waiting)
                    raise StreamFormatError(f"device state over multifd incomplete "
                                            f"{timeout:g} s after the main stream ended: {why}",
                                            where="multifd device state")
                self._changed.wait(left)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def channels_ended(self) -> None:
        """No more packets will come (:meth:`finish` then says what is missing)."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def finish(self) -> None:
        """Every device that sent packets has all of them; raise naming the first that has not."""
        with self._lock:
            for dev in self.devices.values():
                missing = dev.missing()
                if missing:
                    raise StreamFormatError(f"{dev.label}: the migration ended but {missing}",
                                            where="multifd device state")
