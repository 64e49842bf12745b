"""Destination: reassemble multifd device-state packets and load them into devices.

Theory of operation
-------------------
With QEMU 10.0's multifd device-state transfer, a VFIO device's stop-copy data
arrives as VFIO packets (``{version, idx, flags}`` + data,
:mod:`livemig.wire.vfio_packet`) inside multifd device-state packets, on any
channel and in any order. The rules (``spec/device-state.md`` (c.4), QEMU
``hw/vfio/migration-multifd.c``):

* each device's packets are numbered ``idx = 0, 1, 2, ...``; the packet with the
  ``CONFIG_STATE`` flag comes last (highest idx) and carries
  ``DEV_CONFIG_STATE <config> END_OF_STATE``;
* data is written to the device strictly in idx order, and only after the main
  stream has delivered everything that precedes it (``MIG_CMD_SWITCHOVER_START``:
  the precopy data that came through PART sections must reach the data fd first);
* one load thread per device does the writing; the config is loaded last;
* the migration fails if a load thread fails, and does not complete before every
  load thread has finished.

:class:`DeviceStateReassembler` does this for a set of devices. Multifd channel
threads call :meth:`~DeviceStateReassembler.on_packet` with the payload of each
device-state packet (the 276-byte multifd header already decoded by
:func:`livemig.wire.multifd.decode_device_state_header`); the main-stream loader
calls :meth:`~DeviceStateReassembler.main_stream_complete` on ``SWITCHOVER_START``;
at the end of the stream the loader calls
:meth:`~DeviceStateReassembler.finish`, which waits for the load threads and
raises the first error. :meth:`~DeviceStateReassembler.abort` ends everything
early (cancel, or a failure elsewhere).

Stricter than QEMU, because the stream is not trusted: a packet for an idx that
was already loaded is an error (QEMU asserts), so is a second config packet,
a data packet numbered after the config packet, unknown flag bits, and more
buffered data than :data:`DEFAULT_MAX_BUFFERED` while no device makes progress
(QEMU 10.0 has no limit; below it channels are held back instead). Every
error names the device, the packet's idx and the channel. After the first error
the reassembler is poisoned: later packets raise that error, load threads stop.

Threads: the load threads run in a
:class:`~livemig.migration.common.thread_group.ThreadGroup` of the reassembler,
started by :meth:`main_stream_complete` and joined by :meth:`finish` or
:meth:`abort`. Nothing waits by polling: a load thread waits for its next packet
on a condition, a channel held for room waits on one until the deadline of its
rule, and a load thread stuck in a device write is woken by the target's
``cancel()``, which :meth:`abort` (and a failing :meth:`finish`) calls at once for
every device still writing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from livemig.errors import LimitExceeded, MigrationError, StreamFormatError, TransportError
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.thread_group import ThreadGroup
from livemig.wire.vfio_packet import (
    VFIO_DEVICE_STATE_PACKET_HEADER_SIZE,
    decode_vfio_packet_header,
    idx_ranges,
    placement_error,
)
from livemig.wire.vfio_section import decode_config_blob

__all__ = [
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_STALL_TIMEOUT",
    "CancellableLoadTarget",
    "DeviceKey",
    "DeviceLoadStats",
    "DeviceLoadTarget",
    "DeviceStateReassembler",
    "FdLoadTarget",
]

#: Device-state bytes held in memory, all devices together, waiting for their turn.
#: Packets queue up before SWITCHOVER_START is read from the main channel (the
#: source starts sending device state right after writing it, and the main
#: channel may still be draining RAM here), behind a missing idx, and whenever
#: the devices load slower than the channels deliver. At the bound a channel is
#: held until the devices have taken enough (a device's next packet always gets
#: in); only a bound that holds with no device progress is an error, so a
#: hostile source cannot make the destination hold more.
DEFAULT_MAX_BUFFERED = 512 << 20

#: Seconds in which no device has its next packet before a held channel's packet is
#: taken past the bound (a packet a device needs may be queued behind it).
STUCK_GRACE = 0.05

#: A channel held back because the buffer is full fails after this many seconds in
#: which no device took any buffered data.
DEFAULT_STALL_TIMEOUT = 10.0

_E = TypeVar("_E", bound=MigrationError)

#: ``(idstr, instance_id)`` as the multifd device-state header names the handler.
DeviceKey = tuple[str, int]


class DeviceLoadTarget(Protocol):
    """Where one device's state goes on the destination.

    ``write_data`` writes all of a chunk to the device's data fd (blocking);
    ``load_config`` loads the config state (the bytes between ``DEV_CONFIG_STATE``
    and ``END_OF_STATE``). Both run on the device's load thread and raise to fail
    the load. A target that can also unblock a stuck ``write_data`` is a
    :class:`CancellableLoadTarget`: :meth:`DeviceStateReassembler.abort` cancels a
    device that is writing. A target whose write can block indefinitely must be one
    (the reassembler joins its load threads without a time limit).
    """

    def write_data(self, data: memoryview) -> None: ...

    def load_config(self, config: memoryview) -> None: ...


@runtime_checkable
class CancellableLoadTarget(Protocol):
    """A :class:`DeviceLoadTarget` whose ``write_data`` can be unblocked.

    ``cancel()`` makes a ``write_data`` stuck on a device that stopped reading
    return (or raise), from another thread. :meth:`DeviceStateReassembler.abort`
    calls it at once for a device that is writing, then joins its thread without a
    time limit; an exception from it is ignored, as the load is being abandoned
    anyway.
    """

    def cancel(self) -> None: ...


class FdLoadTarget:
    """A :class:`CancellableLoadTarget` that writes to a data fd (e.g. VFIO's RESUMING
    fd); ``cancel`` calls the ``cancel`` given, if any."""

    def __init__(self, fd: int, load_config: Callable[[memoryview], None],
                 cancel: Callable[[], None] | None = None) -> None:
        self.fd = fd
        self._load_config = load_config
        self._cancel = cancel

    def write_data(self, data: memoryview) -> None:
        view = data
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def load_config(self, config: memoryview) -> None:
        self._load_config(config)

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()


@dataclass
class DeviceLoadStats:
    """What one device received and loaded."""

    packets: int = 0
    data_bytes: int = 0
    config_bytes: int = 0
    loaded: bool = False


class _Device:
    def __init__(self, key: DeviceKey, target: DeviceLoadTarget, lock: threading.Lock) -> None:
        self.key = key
        self.target = target
        self.label = f"device {key[0]} instance {key[1]}"
        self.bufs: dict[int, bytes | memoryview] = {}
        self.next_idx = 0  # the next idx to hand to the device
        self.config_idx: int | None = None
        self.max_data_idx = -1
        self.done = False
        self.loading = False  # the load thread is writing a packet to the device
        self.ready = threading.Condition(lock)
        self.stats = DeviceLoadStats()


class DeviceStateReassembler:
    """Reassembles and loads the multifd device state of ``devices`` (see the module doc).

    ``devices`` maps ``(idstr, instance_id)`` -- as the multifd device-state header
    names them -- to the device's :class:`DeviceLoadTarget`. Every listed device
    must receive its config packet before :meth:`finish` succeeds.
    """

    def __init__(self, devices: Mapping[DeviceKey, DeviceLoadTarget], *,
                 max_buffered: int = DEFAULT_MAX_BUFFERED,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        self._lock = threading.Lock()
        self._devices = {k: _Device(k, t, self._lock) for k, t in devices.items()}
        self.max_buffered = max_buffered
        #: Past the bound, packets are still taken while every channel waits on the
        #: devices and none can move; this is where even that stops.
        self.hard_limit = 2 * max_buffered
        self.stall_timeout = stall_timeout
        self._buffered = 0
        self._started = False
        self._stopping = False
        self._error: MigrationError | None = None
        self._changed = threading.Condition(self._lock)
        # The load threads catch their own errors (:meth:`_fail`): the group only owns
        # and joins them.
        self._threads = ThreadGroup("vfio-load", FailureLatch())

    # ------------------------------------------------------------------ properties

    @property
    def buffered(self) -> int:
        """Bytes held in memory right now."""
        return self._buffered

    @property
    def error(self) -> MigrationError | None:
        """The first error, if any."""
        return self._error

    def stats(self) -> dict[DeviceKey, DeviceLoadStats]:
        return {k: d.stats for k, d in self._devices.items()}

    # ------------------------------------------------------------------ channel threads

    def on_packet(self, idstr: str, instance_id: int, payload: bytes | bytearray | memoryview,
                  channel: int | None = None, *, owned: bool = False) -> None:
        """Take one device-state packet's payload (VFIO header + data).

        Called from any multifd channel thread. The payload is copied unless
        ``owned`` says the caller hands it over (it will not reuse the buffer).
        Raises :class:`~livemig.errors.StreamFormatError` for a malformed or
        misplaced packet, :class:`~livemig.errors.LimitExceeded` past
        ``max_buffered``, or the first error if the reassembler already failed.
        """
        view = memoryview(payload).cast("B")
        # Copy before taking the lock that every channel thread shares.
        keep = view[VFIO_DEVICE_STATE_PACKET_HEADER_SIZE:]
        if not owned:
            keep = memoryview(bytes(keep))
        with self._lock:
            if self._error is not None:
                raise self._error
            dev = self._devices.get((idstr, instance_id))
            if dev is None:
                known = ", ".join(f"{i}/{n}" for i, n in sorted(self._devices)) or "none"
                raise self._fail(StreamFormatError(
                    f"device-state packet for {idstr} instance {instance_id}, which is not a "
                    f"device loading its state over multifd (those are: {known})",
                    where=_where(channel, None, None)))
            try:
                hdr = decode_vfio_packet_header(view)
            except StreamFormatError as e:
                raise self._fail(StreamFormatError(
                    e.message, where=_where(channel, dev, None), raw=e.raw)) from None
            idx = hdr.idx
            data = view[VFIO_DEVICE_STATE_PACKET_HEADER_SIZE:]

            def bad(message: str) -> StreamFormatError:
                return self._fail(StreamFormatError(message, where=_where(channel, dev, idx),
                                                    raw=bytes(view[:16])))

            if idx < dev.next_idx or dev.done:
                raise bad(f"idx {idx} was already loaded (the device is at idx {dev.next_idx}"
                          + (", finished)" if dev.done else ")"))
            if idx in dev.bufs:
                raise bad(f"duplicate idx {idx}")
            why = placement_error(idx, hdr.is_config, config_idx=dev.config_idx,
                                  max_data_idx=dev.max_data_idx)
            if why is not None:
                raise bad(why)
            if hdr.is_config:
                try:
                    decode_config_blob(data, where=f"{dev.label} config packet")
                except StreamFormatError as e:
                    raise bad(f"config packet: {e.message}") from None
            size = len(data)
            if self._buffered + size > self.max_buffered and idx != dev.next_idx:
                self._wait_for_room(size, channel, dev, idx)
            dev.bufs[idx] = keep
            self._buffered += size
            if hdr.is_config:
                dev.config_idx = idx
                dev.stats.config_bytes = size
            else:
                dev.max_data_idx = max(dev.max_data_idx, idx)
                dev.stats.data_bytes += size
            dev.stats.packets += 1
            dev.ready.notify()
            if idx == dev.next_idx:
                self._changed.notify_all()  # a held channel's "no device can move" ends

    # ------------------------------------------------------------------ main stream

    def main_stream_complete(self) -> None:
        """``SWITCHOVER_START`` was read: everything before it reached the devices.

        Starts one load thread per device. A second call does nothing.
        """
        with self._lock:
            if self._started or self._error is not None:
                return
            self._started = True
            self._changed.notify_all()  # held channels: the "no device can move" rule applies
            for dev in self._devices.values():
                self._threads.start(self._load, dev, name=dev.key[0])

    def no_more_packets(self) -> None:
        """Every multifd channel has ended: a device still missing packets fails now."""
        with self._lock:
            if self._error is None:
                for dev in self._devices.values():
                    missing = self._missing(dev)
                    if missing:
                        raise self._fail(StreamFormatError(
                            f"{dev.label}: the multifd channels ended but {missing}"))

    def finish(self, timeout: float) -> dict[DeviceKey, DeviceLoadStats]:
        """Wait until every device has loaded its data and config; raise the first error.

        Called at the end of the main stream. On error or after ``timeout`` seconds
        the load threads are stopped and joined and the error is raised (a timeout
        names what each unfinished device is missing). Returns per-device stats.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._started and self._error is None and self._devices:
                got = [d.label for d in self._devices.values() if d.stats.packets]
                why = ("device-state packets arrived for " + ", ".join(got) if got
                       else "devices wait for multifd device state")
                self._fail(StreamFormatError(f"the main stream ended without SWITCHOVER_START "
                                             f"but {why}"))
            while self._error is None and not all(d.done for d in self._devices.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    parts = [f"{d.label}: {self._missing(d) or 'still loading'}"
                             for d in self._devices.values() if not d.done]
                    self._fail(StreamFormatError(
                        f"device state not loaded after {timeout:g} s: " + "; ".join(parts)))
                    break
                self._changed.wait(left)
            error = self._error
        self._join()
        if error is not None:
            raise error
        return self.stats()

    def abort(self) -> None:
        """Stop the load threads and drop buffered data; never raises."""
        with self._lock:
            self._fail(MigrationError("device-state loading was aborted"))
        self._join()

    # ------------------------------------------------------------------ internals

    def _fail(self, error: _E) -> _E:
        """Record the first error and stop the load threads (lock held)."""
        if self._error is None:
            self._error = error
        self._stopping = True
        for dev in self._devices.values():
            dev.ready.notify_all()
        self._changed.notify_all()
        return error

    def _wait_for_room(self, size: int, channel: int | None, dev: _Device, idx: int) -> None:
        """Hold the calling channel until the devices have taken enough (lock held).

        Back-pressure, not a failure: devices that load slower than the network
        delivers would otherwise need the whole stop-copy state in memory. A
        device's next packet never waits (its load thread needs it to make room).
        When no device has its next packet for :data:`STUCK_GRACE` seconds, the
        packets they need are queued behind held ones (or not sent yet): then the
        held packet is taken anyway, up to twice the bound (:attr:`hard_limit`).
        Past that, or when nothing is taken for :attr:`stall_timeout` seconds
        (no load thread runs), the migration fails.
        """
        last = self._buffered
        since = time.monotonic()
        stuck_since: float | None = None
        while self._buffered + size > self.max_buffered and idx != dev.next_idx:
            if self._error is not None:
                raise self._error
            if self._stopping:
                raise MigrationError("device-state loading was aborted")
            now = time.monotonic()
            if self._buffered != last:  # (a device that moves on takes some)
                last, since = self._buffered, now
            elif now - since >= self.stall_timeout:
                raise self._fail(LimitExceeded(
                    f"{size} more bytes would make {self._buffered + size} bytes of "
                    f"device state waiting to be loaded, above the limit "
                    f"{self.max_buffered}, and the devices took none of it for "
                    f"{self.stall_timeout:g} s", where=_where(channel, dev, idx)))
            wake_at = since + self.stall_timeout
            if self._started and not any(d.loading or d.next_idx in d.bufs
                                         for d in self._devices.values() if not d.done):
                stuck_since = now if stuck_since is None else stuck_since
                if now - stuck_since >= STUCK_GRACE:
                    if self._buffered + size <= self.hard_limit:
                        return  # the packets the devices need are behind this one
                    raise self._fail(LimitExceeded(
                        f"{size} more bytes would make {self._buffered + size} bytes of "
                        f"device state waiting to be loaded, above the limit "
                        f"{self.hard_limit}, and no device has the packet it needs next",
                        where=_where(channel, dev, idx)))
                wake_at = min(wake_at, stuck_since + STUCK_GRACE)
            else:
                stuck_since = None
            # Woken when a device takes data or gets its next packet, or at the
            # deadline of the rule that applies.
            self._changed.wait(max(0.0, wake_at - now))
        if self._error is not None:
            raise self._error

    def _missing(self, dev: _Device) -> str:
        """What ``dev`` still lacks to finish, or "" (lock held)."""
        if dev.done:
            return ""
        if dev.config_idx is None:
            return f"no config packet arrived (loaded up to idx {dev.next_idx})"
        gaps = [i for i in range(dev.next_idx, dev.config_idx) if i not in dev.bufs]
        if not gaps:
            return ""
        return f"idx {idx_ranges(gaps)} never arrived (config packet idx {dev.config_idx})"

    def _join(self) -> None:
        """Stop the load threads and join them; drop what is still buffered.

        A thread that is writing to its device may wait there forever (a device
        that stopped reading): the target's ``cancel()`` is its wake-up, called at
        once, as the latch shuts a socket down.
        """
        with self._lock:
            self._stopping = True
            for dev in self._devices.values():
                dev.ready.notify_all()
            self._changed.notify_all()  # channels held for room leave
            writing = [d for d in self._devices.values() if d.loading]
        for dev in writing:
            if isinstance(dev.target, CancellableLoadTarget):
                with contextlib.suppress(Exception):  # best effort on the way out
                    dev.target.cancel()
        self._threads.join()
        with self._lock:
            for dev in self._devices.values():
                for buf in dev.bufs.values():
                    self._buffered -= len(buf)
                dev.bufs.clear()

    def _load(self, dev: _Device) -> None:
        idx = -1
        try:
            while True:
                with self._lock:
                    while not self._stopping and dev.next_idx not in dev.bufs:
                        dev.ready.wait()
                    if self._stopping:
                        return
                    idx = dev.next_idx
                    data = memoryview(dev.bufs.pop(idx))
                    is_config = idx == dev.config_idx
                    dev.next_idx += 1
                    dev.loading = True
                try:
                    if is_config:
                        dev.target.load_config(decode_config_blob(
                            data, where=f"{dev.label} config packet"))
                    else:
                        dev.target.write_data(data)
                finally:
                    with self._lock:
                        dev.loading = False
                        self._buffered -= len(data)
                        self._changed.notify_all()  # channels held for room go on
                if is_config:
                    with self._lock:
                        dev.done = dev.stats.loaded = True
                        self._changed.notify_all()
                    return
        except MigrationError as e:
            with self._lock:
                if isinstance(e, StreamFormatError) and e.where is None:
                    e.where = _where(None, dev, idx)
                self._fail(e)
        except OSError as e:
            with self._lock:
                err = TransportError(f"{_where(None, dev, idx)}: loading into the device "
                                     f"failed: {e}")
                err.__cause__ = e
                self._fail(err)
        except BaseException as e:  # noqa: BLE001 - a bug must fail the migration too
            with self._lock:
                err2 = MigrationError(f"{_where(None, dev, idx)}: load thread failed: {e!r}")
                err2.__cause__ = e
                self._fail(err2)


def _where(channel: int | None, dev: _Device | None, idx: int | None) -> str:
    parts = []
    if channel is not None:
        parts.append(f"multifd channel {channel}")
    if dev is not None:
        parts.append(dev.label)
    if idx is not None:
        parts.append(f"VFIO packet idx {idx}")
    return ", ".join(parts) or "device state"

