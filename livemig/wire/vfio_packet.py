"""The VFIO device-state packet inside a multifd device-state packet (QEMU 10.0).

QEMU's ``hw/vfio/migration-multifd.c`` moves a VFIO device's final (stop-copy)
data over the multifd channels. Each multifd device-state packet
(:func:`livemig.wire.multifd.decode_device_state_header`, 276 bytes naming
``idstr`` and ``instance_id``) carries one ``VFIODeviceStatePacket``: a 12-byte
big-endian header and the data::

    be32 version   0 (VFIO_DEVICE_STATE_PACKET_VER_CURRENT); anything else is refused
    be32 idx       0, 1, 2, ... per device; 0xFFFFFFFF is invalid
    be32 flags     bit 0 CONFIG_STATE: data is DEV_CONFIG_STATE <config> END_OF_STATE
    data           a chunk of the device's data fd stream, or the config state

The source sends the data chunks with idx 0..n-1 and then the config packet with
idx n; the destination loads them in idx order whatever the arrival order
(:mod:`livemig.migration.destination.device_state_reassembly`). Unknown flag bits are refused here
(QEMU ignores them; no QEMU writes one).

Pure code: errors are :class:`~livemig.errors.StreamFormatError` with offset 0
(the start of the packet's payload); the caller adds the channel and device.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from livemig.errors import ConfigError, StreamFormatError

__all__ = [
    "VFIO_DEVICE_STATE_PACKET_HEADER_SIZE",
    "VFIO_DEVICE_STATE_PACKET_VER_CURRENT",
    "VFIO_INVALID_IDX",
    "VfioPacketFlag",
    "VfioPacketHeader",
    "decode_vfio_packet_header",
    "encode_vfio_packet_header",
]

#: ``sizeof(VFIODeviceStatePacket)``: version, idx, flags.
VFIO_DEVICE_STATE_PACKET_HEADER_SIZE = 12
#: ``VFIO_DEVICE_STATE_PACKET_VER_CURRENT``.
VFIO_DEVICE_STATE_PACKET_VER_CURRENT = 0
#: QEMU refuses this idx ("packet index is invalid"): it is its "no last index yet" value.
VFIO_INVALID_IDX = 0xFFFFFFFF


class VfioPacketFlag(enum.IntFlag):
    """``VFIO_DEVICE_STATE_*`` packet flags (``hw/vfio/migration-multifd.c``)."""

    CONFIG_STATE = 1


_HDR = struct.Struct(">III")
assert _HDR.size == VFIO_DEVICE_STATE_PACKET_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class VfioPacketHeader:
    version: int
    idx: int
    flags: VfioPacketFlag

    @property
    def is_config(self) -> bool:
        return bool(self.flags & VfioPacketFlag.CONFIG_STATE)


def decode_vfio_packet_header(payload: bytes | bytearray | memoryview) -> VfioPacketHeader:
    """Check and decode the header at the start of one device-state payload."""
    n = len(payload)
    if n < VFIO_DEVICE_STATE_PACKET_HEADER_SIZE:
        raise StreamFormatError(f"VFIO packet of {n} bytes is shorter than its "
                                f"{VFIO_DEVICE_STATE_PACKET_HEADER_SIZE}-byte header",
                                offset=0, raw=bytes(payload[:16]))
    version, idx, flags = _HDR.unpack_from(payload, 0)
    raw = bytes(payload[:16])
    if version != VFIO_DEVICE_STATE_PACKET_VER_CURRENT:
        raise StreamFormatError(f"VFIO packet has unknown version {version} (expected "
                                f"{VFIO_DEVICE_STATE_PACKET_VER_CURRENT})", offset=0, raw=raw)
    if idx == VFIO_INVALID_IDX:
        raise StreamFormatError(f"VFIO packet idx {idx:#x} is invalid", offset=0, raw=raw)
    unknown = flags & ~int(VfioPacketFlag.CONFIG_STATE)
    if unknown:
        raise StreamFormatError(f"VFIO packet idx {idx} has unknown flag bits {unknown:#x}",
                                offset=0, raw=raw)
    return VfioPacketHeader(version=int(version), idx=int(idx), flags=VfioPacketFlag(flags))


def encode_vfio_packet_header(idx: int, *, config: bool = False) -> bytes:
    """The 12-byte header of data packet ``idx`` (or of the config packet)."""
    if not 0 <= idx < VFIO_INVALID_IDX:
        raise ConfigError(f"VFIO packet idx {idx} outside 0..{VFIO_INVALID_IDX - 1}")
    flags = int(VfioPacketFlag.CONFIG_STATE) if config else 0
    return _HDR.pack(VFIO_DEVICE_STATE_PACKET_VER_CURRENT, idx, flags)


def placement_error(idx: int, is_config: bool, *, config_idx: int | None,
                    max_data_idx: int) -> str | None:
    """Why packet ``idx`` cannot join a device's packets so far, or None.

    The numbering rules of QEMU's destination: one config packet, numbered after
    every data packet. ``config_idx``: the config packet's idx if it arrived;
    ``max_data_idx``: the highest data idx so far (-1 for none). Duplicates are
    the caller's to find (it knows which idx it holds or has loaded).
    """
    if is_config:
        if config_idx is not None:
            return f"second config packet (the first had idx {config_idx})"
        if idx <= max_data_idx:
            return (f"config packet has idx {idx} but data packet idx {max_data_idx} "
                    "arrived: data after the config packet")
    elif config_idx is not None and idx > config_idx:
        return f"data packet idx {idx} after the config packet (idx {config_idx})"
    return None


def idx_ranges(values: list[int]) -> str:
    """``0-3, 7, 9-12``: sorted idx values as ranges, at most 8 of them."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
        if len(out) == 8:
            out.append("...")
            break
    return ", ".join(out)
