"""The device-state trailer of a livemig snapshot.

Why it exists: with multifd device-state transfer (QEMU 10's
``x-migration-multifd-transfer``), a VFIO device's stop-copy data and config
never pass through the main stream: they arrive as multifd device-state
packets. A mapped-ram file has no place for them (QEMU 10 refuses the
combination), so ``livemig receive`` keeps them after the end of the stream:

============  =====================================================================
offset        content
============  =====================================================================
0             magic ``LMDSTATE`` (8 bytes)
8             be32 trailer version (1)
12            be32 flags (0)
16            be64 number of packets
24            be64 bytes of packets that follow
32            the packets, each exactly as on a multifd channel: the 276-byte
              device-state header (idstr, instance id, payload size) and its
              payload (12-byte VFIO packet header ``{version, idx, flags}`` + data)
end - 16      footer: magic ``LMDSTEND`` and be64 file offset of the trailer
============  =====================================================================

The trailer starts right after the stream's vmstate description (the
``QEMU_VM_VMDESCRIPTION`` record), the last thing QEMU reads from a file; QEMU
never looks past it, so the snapshot stays loadable by QEMU. The footer lets a
reader find where the stream ends without searching for the description's end
backwards through device data. Packets are kept in arrival order; the VFIO
header's idx orders them per device.

:func:`scan_trailer` reads one from any positional reader and checks every
length against the file before trusting it (a hostile trailer cannot make it
allocate more than one packet header at a time).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.wire.multifd import DEVICE_STATE_HEADER_SIZE, decode_device_state_header
from livemig.wire.vfio_packet import (
    VFIO_DEVICE_STATE_PACKET_HEADER_SIZE,
    VfioPacketHeader,
    decode_vfio_packet_header,
)

__all__ = [
    "FOOTER_SIZE",
    "TRAILER_HEADER_SIZE",
    "TRAILER_MAGIC",
    "TRAILER_VERSION",
    "TrailerPacket",
    "encode_trailer_footer",
    "encode_trailer_header",
    "scan_trailer",
    "trailer_from_footer",
]

TRAILER_MAGIC = b"LMDSTATE"
FOOTER_MAGIC = b"LMDSTEND"
TRAILER_VERSION = 1
_HEAD = struct.Struct(">8sIIQQ")
_FOOT = struct.Struct(">8sQ")
TRAILER_HEADER_SIZE = _HEAD.size
FOOTER_SIZE = _FOOT.size
_SMALLEST_PACKET = DEVICE_STATE_HEADER_SIZE + VFIO_DEVICE_STATE_PACKET_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class TrailerPacket:
    """One stored device-state packet; ``offset`` is where its multifd header starts."""

    idstr: str
    instance_id: int
    vfio: VfioPacketHeader
    offset: int
    payload_size: int

    @property
    def data_offset(self) -> int:
        """Where the device data (after both headers) starts."""
        return self.offset + DEVICE_STATE_HEADER_SIZE + VFIO_DEVICE_STATE_PACKET_HEADER_SIZE

    @property
    def data_size(self) -> int:
        return self.payload_size - VFIO_DEVICE_STATE_PACKET_HEADER_SIZE


def encode_trailer_header(packets: int, nbytes: int) -> bytes:
    return _HEAD.pack(TRAILER_MAGIC, TRAILER_VERSION, 0, packets, nbytes)


def encode_trailer_footer(trailer_offset: int) -> bytes:
    return _FOOT.pack(FOOTER_MAGIC, trailer_offset)


def trailer_from_footer(last: bytes, size: int) -> int | None:
    """The trailer's offset, from a file's last :data:`FOOTER_SIZE` bytes (None: no trailer).

    ``size`` is the file's size; an offset that cannot hold a trailer header
    before the footer is an error, not "no trailer".
    """
    if len(last) < FOOTER_SIZE:
        return None
    magic, offset = _FOOT.unpack_from(last, len(last) - FOOTER_SIZE)
    if magic != FOOTER_MAGIC:
        return None
    if offset + TRAILER_HEADER_SIZE > size - FOOTER_SIZE:
        raise StreamFormatError(f"the device-state trailer footer points at offset "
                                f"{offset:#x}, past what the {size}-byte file holds",
                                offset=size - FOOTER_SIZE)
    return int(offset)


def scan_trailer(read_at: Callable[[int, int], bytes], start: int,
                 end: int) -> list[TrailerPacket]:
    """The packets of the trailer at ``start``, whose footer starts at ``end``.

    ``read_at(offset, n)`` returns up to ``n`` bytes (``os.pread``'s contract).
    Offsets in errors are file offsets.
    """
    head = read_at(start, TRAILER_HEADER_SIZE)
    if len(head) < TRAILER_HEADER_SIZE:
        raise TruncatedStream(f"device-state trailer header cut off after {len(head)} of "
                              f"{TRAILER_HEADER_SIZE} bytes", offset=start, raw=head[:16])
    magic, version, flags, count, nbytes = _HEAD.unpack(head)
    if magic != TRAILER_MAGIC:
        raise StreamFormatError(f"bytes after the end of the stream are not a device-state "
                                f"trailer (magic {magic!r})", offset=start, raw=head[:16])
    if version != TRAILER_VERSION:
        raise StreamFormatError(f"device-state trailer version {version}; this livemig "
                                f"reads version {TRAILER_VERSION}", offset=start + 8)
    if flags:
        raise StreamFormatError(f"device-state trailer has unknown flags {flags:#x}",
                                offset=start + 12)
    body = start + TRAILER_HEADER_SIZE
    if nbytes != end - body:
        raise StreamFormatError(f"device-state trailer says {nbytes} bytes of packets, but "
                                f"{end - body} bytes lie between its header and footer",
                                offset=start + 24)
    if count > nbytes // _SMALLEST_PACKET:
        raise LimitExceeded(f"device-state trailer says {count} packets in {nbytes} bytes "
                            f"(a packet has at least {_SMALLEST_PACKET})", offset=start + 16)
    out: list[TrailerPacket] = []
    pos = body
    for i in range(count):
        what = f"device-state trailer packet {i}"
        raw = read_at(pos, DEVICE_STATE_HEADER_SIZE + VFIO_DEVICE_STATE_PACKET_HEADER_SIZE)
        if len(raw) < DEVICE_STATE_HEADER_SIZE:
            raise TruncatedStream(f"{what}: header cut off by the end of the file", offset=pos)
        try:
            hdr = decode_device_state_header(raw, packet_index=i)
            if pos + DEVICE_STATE_HEADER_SIZE + hdr.payload_size > end:
                raise TruncatedStream(f"{what}: {hdr.payload_size}-byte payload of "
                                      f"{hdr.idstr} runs past the end of the file")
            vfio = decode_vfio_packet_header(raw[DEVICE_STATE_HEADER_SIZE:])
        except StreamFormatError as e:
            raise type(e)(f"{what}: {e.message}" if not e.message.startswith("packet") else
                          f"device-state trailer {e.message}", offset=pos, raw=e.raw) from None
        out.append(TrailerPacket(hdr.idstr, hdr.instance_id, vfio, pos, hdr.payload_size))
        pos += DEVICE_STATE_HEADER_SIZE + hdr.payload_size
    if pos != end:
        raise StreamFormatError(f"{end - pos} bytes after the device-state trailer's "
                                f"{count} packets", offset=pos)
    return out
