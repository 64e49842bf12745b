"""Source: cut a device's stop-copy data into multifd device-state packets.

What QEMU 10.0's ``vfio_multifd_save_complete_precopy_thread()`` does
(``spec/device-state.md`` (c.2)): read the device's data fd (in STOP_COPY) into
buffers of at most ``data_buffer_size`` bytes until ``read()`` returns 0; each
non-empty read becomes one VFIO packet ``{version 0, idx, flags 0}`` + data with
``idx = 0, 1, 2, ...``; then one more packet with the next idx and the
``CONFIG_STATE`` flag carrying ``DEV_CONFIG_STATE <config> END_OF_STATE``.

:func:`device_state_packets` yields each packet as the buffers of one complete
multifd device-state packet (276-byte multifd header, 12-byte VFIO header, data),
ready for ``socket.sendmsg``; the engine decides which channel sends which. It
runs in the caller's thread (the device's save thread) and blocks in ``read()``.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from livemig.errors import ConfigError, TransportError
from livemig.wire.multifd import MAX_DEVICE_STATE_PACKET, encode_device_state_header
from livemig.wire.vfio_packet import VFIO_DEVICE_STATE_PACKET_HEADER_SIZE, encode_vfio_packet_header
from livemig.wire.vfio_section import encode_config_blob

if TYPE_CHECKING:
    from livemig.migration.source.multifd_sender import SendChannel

__all__ = [
    "DATA_FD_STALL_TIMEOUT",
    "VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE",
    "OutgoingDeviceStatePacket",
    "device_state_packets",
]

#: QEMU's ``VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE``: one read of the data fd, one packet.
VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE = 1 << 20

#: A data fd opened non-blocking may have nothing to read for a moment while the
#: device produces more; after this many seconds without a byte the device is
#: considered hung (a real VFIO driver answers within milliseconds).
DATA_FD_STALL_TIMEOUT = 60.0

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class OutgoingDeviceStatePacket:
    """One multifd device-state packet: ``buffers`` are sent back to back."""

    idstr: str
    instance_id: int
    idx: int
    is_config: bool
    buffers: tuple[Buffer, ...]

    @property
    def size(self) -> int:
        """Bytes on the wire, multifd header included."""
        return sum(len(b) for b in self.buffers)

    def send_on(self, ch: SendChannel) -> None:
        """As a job of the multifd sender: the packet is already framed."""
        ch.send_encoded(self.buffers)


def _packet(idstr: str, instance_id: int, idx: int, data: Buffer,
            config: bool) -> OutgoingDeviceStatePacket:
    vfio = encode_vfio_packet_header(idx, config=config)
    mfd = encode_device_state_header(idstr, instance_id, len(vfio) + len(data))
    return OutgoingDeviceStatePacket(idstr, instance_id, idx, config, (mfd, vfio, data))


def _read(fd: int, n: int, what: str) -> bytes:
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            ready, _, _ = select.select([fd], [], [], DATA_FD_STALL_TIMEOUT)
            if not ready:
                raise TransportError(f"{what}: the device's data fd gave nothing for "
                                     f"{DATA_FD_STALL_TIMEOUT:g} s") from None
        except OSError as e:
            raise TransportError(f"{what}: reading the device's data fd failed: {e}") from e


def device_state_packets(idstr: str, instance_id: int, data_fd: int | Callable[[int], Buffer],
                         config: Buffer | Callable[[], Buffer], *,
                         max_data: int = VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE,
                         ) -> Iterator[OutgoingDeviceStatePacket]:
    """The packets for one device's stop-copy data, config packet last.

    ``data_fd`` is the device's data fd in STOP_COPY (read until it returns 0) or a
    ``read(n)`` callable with the same contract. ``config`` is the config state
    (the bytes between ``DEV_CONFIG_STATE`` and ``END_OF_STATE``), or a callable
    producing it once the data is read. Each data packet carries at most
    ``max_data`` bytes. Raises :class:`~livemig.errors.TransportError` if reading
    fails, :class:`~livemig.errors.ConfigError` for a bad ``max_data``.
    """
    limit = MAX_DEVICE_STATE_PACKET - VFIO_DEVICE_STATE_PACKET_HEADER_SIZE
    if not 0 < max_data <= limit:
        raise ConfigError(f"max_data {max_data} outside 1..{limit}")
    idx = 0
    while True:
        what = f"device {idstr} instance {instance_id}, VFIO packet idx {idx}"
        chunk = _read(data_fd, max_data, what) if isinstance(data_fd, int) \
            else data_fd(max_data)
        if not chunk:
            break
        if len(chunk) > max_data:
            raise ConfigError(f"{what}: the reader returned {len(chunk)} bytes, more than "
                              f"the {max_data} asked for")
        yield _packet(idstr, instance_id, idx, chunk, False)
        idx += 1
    blob = encode_config_blob(config() if callable(config) else config)
    yield _packet(idstr, instance_id, idx, blob, True)
