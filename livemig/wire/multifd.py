"""Multifd channels: initial packet, RAM packets, device-state packets, compression.

Theory of operation
-------------------
A multifd channel is one extra connection per ``multifd-channels``. It starts
with a 64-byte initial packet (:class:`InitPacket`) and then carries packets
until the peer closes it. Every packet starts with the same 12-byte common
header (magic, version, flags); the ``DEVICE_STATE`` flag (QEMU 10.0) selects a
276-byte device-state header, otherwise the rest of a 1344-byte RAM header
follows. The I/O layer therefore reads a channel like this::

    init = decode_init_packet(read(INIT_PACKET_SIZE), expected_uuid=..., channels=n)
    while (common := read(COMMON_HEADER_SIZE)):          # EOF here is a clean end
        header = common + read(packet_header_size(common) - COMMON_HEADER_SIZE)
        if is_device_state(peek_common_header(header)[2]):
            dev = decode_device_state_header(header)     # dev.payload_size bytes follow
        else:
            pkt = decode_ram_packet(header, compression=..., block_sizes=...)
            # pkt.payload_size bytes follow; nocomp: one iovec per page_runs() run,
            # otherwise decompressor.decompress(payload, normal_pages * PAGE_SIZE)

Headers have fixed sizes, so "not enough bytes yet" is simple here: every
decoder needs a buffer holding at least its header (from ``offset``) and raises
:class:`~livemig.errors.TruncatedStream` otherwise, without looking at the
bytes. Bytes after the header are ignored (they are the payload or the next
packet). Nothing is consumed, so a caller may simply retry with more bytes.

Page offsets are decoded with one numpy call per packet and checked
vectorized; nothing in this module runs Python code per page. Payloads never
pass through the decoders: a RAM packet says which offsets its payload fills
and the I/O layer moves the bytes.

Compressed channels (zlib, zstd) are one continuous stream per channel for the
whole migration: packets are not independently decodable, so each channel owns
one :class:`ChannelDecompressor` from its first packet to its last. Both
libraries release the GIL while they work, which is why channel threads can
call them in parallel.

Errors are :class:`~livemig.errors.StreamFormatError` (limits:
:class:`~livemig.errors.LimitExceeded`) with ``offset`` set to the start of the
offending packet in the given buffer; the I/O layer adds the channel name and
stream position with :meth:`~livemig.errors.StreamFormatError.locate`. Bad
arguments from our own side (encoders) raise :class:`~livemig.errors.ConfigError`.

Mirrors QEMU ``migration/multifd.h``, ``migration/multifd.c``,
``migration/multifd-zlib.c``, ``migration/multifd-zstd.c`` (7.2 and 10.0);
the facts are collected in ``spec/multifd.md``.
"""

from __future__ import annotations

import struct
import uuid as _uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, NoReturn, Protocol, cast

import numpy as np
import numpy.typing as npt
import zstandard

from livemig.errors import ConfigError, LimitExceeded, StreamFormatError, TruncatedStream
from livemig.limits import (
    MAX_MULTIFD_CHANNELS,
    MAX_MULTIFD_COMPRESSED_PAYLOAD,
    MULTIFD_PACKET_BYTES,
    MULTIFD_PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
)
from livemig.wire.constants import (
    MULTIFD_COMPRESSION_MASK,
    MULTIFD_DEVICE_STATE_HEADER_SIZE,
    MULTIFD_INIT_PACKET_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_RAMBLOCK_FIELD,
    MULTIFD_VERSION,
    QEMU_VM_FILE_MAGIC,
    MultifdCompression,
    MultifdFlag,
)

__all__ = [
    "COMMON_HEADER_SIZE",
    "DEVICE_STATE_HEADER_SIZE",
    "INIT_PACKET_SIZE",
    "KNOWN_FLAGS",
    "MAX_DEVICE_STATE_PACKET",
    "PAGE_SIZE",
    "RAM_HEADER_SIZE",
    "ChannelCompressor",
    "ChannelDecompressor",
    "DeviceStatePacket",
    "InitPacket",
    "NoCompression",
    "RamPacket",
    "ZlibChannelCompressor",
    "ZlibChannelDecompressor",
    "ZstdChannelCompressor",
    "ZstdChannelDecompressor",
    "decode_device_state_header",
    "decode_init_packet",
    "decode_ram_packet",
    "encode_device_state_header",
    "encode_ram_packet",
    "encode_sync_packet",
    "is_device_state",
    "make_compressor",
    "make_decompressor",
    "packet_header_size",
    "page_runs",
    "peek_common_header",
]

Buffer = bytes | bytearray | memoryview
OffsetArray = npt.NDArray[np.uint64]

PAGE_SIZE = TARGET_PAGE_SIZE
_PAGE_MASK = PAGE_SIZE - 1

#: ``MultiFDInit_t``: magic, version, uuid[16], id, 7 + 32 unused bytes.
INIT_PACKET_SIZE = MULTIFD_INIT_PACKET_SIZE
#: ``MultiFDPacketHdr_t``: magic, version, flags; shared by RAM and device-state packets.
COMMON_HEADER_SIZE = 12
#: ``MultiFDPacket_t`` with its offset array: 320 fixed bytes + one be64 per page slot.
_RAM_OFFSETS_AT = 320
RAM_HEADER_SIZE = _RAM_OFFSETS_AT + 8 * MULTIFD_PAGES_PER_PACKET
#: ``MultiFDPacketDeviceState_t`` (QEMU 10.0).
DEVICE_STATE_HEADER_SIZE = MULTIFD_DEVICE_STATE_HEADER_SIZE

#: One device-state packet's payload. QEMU 10.0's VFIO sender puts one read of
#: the device's data fd in each packet, at most its data buffer size (1 MiB by
#: default, spec/device-state.md) plus a small header; 16 MiB leaves room for
#: other devices and larger buffers while bounding what one length field from
#: the wire can make us allocate.
MAX_DEVICE_STATE_PACKET = 16 << 20

#: Every flag bit QEMU 7.2 .. 10.0 defines; anything else is refused.
KNOWN_FLAGS = int(MultifdFlag.SYNC) | MULTIFD_COMPRESSION_MASK | int(MultifdFlag.DEVICE_STATE)

#: Largest zstd window we accept. It is libzstd's own default limit for
#: decompression; QEMU's ``multifd-zstd-level`` (1-20) stays below it.
ZSTD_MAX_WINDOW = 1 << 27

#: Output chunk size handed to libzstd. It is larger than any packet's page
#: data (512 KiB), so for a valid stream libzstd never stops because its
#: output buffer is full (which could leave decoded bytes pending inside it);
#: a full chunk always means "more than the packet announced".
_ZSTD_OUT_CHUNK = 2 * MULTIFD_PACKET_BYTES

#: Compressed bytes handed to libzstd per call. Output past a packet's
#: announced length is dropped, not refused from inside libzstd (see
#: ``_BoundedSink``), so a bomb is only noticed between calls: 16 KiB of
#: RLE blocks (4 bytes each for 128 KiB) decode to at most 512 MiB of
#: discarded output, a fraction of a second of CPU, before the refusal.
_ZSTD_IN_CHUNK = 16 << 10

_INIT = struct.Struct(">II16sB7x32x")
_COMMON = struct.Struct(">III")
# magic, version, flags, pages_alloc, normal_pages, next_packet_size,
# packet_num, zero_pages (offset 32; always 0 from 7.2 senders)
_RAM_FIXED = struct.Struct(">IIIIIIQI")
_RAMBLOCK_AT = 64
_DEV = struct.Struct(">III256sII")

assert _INIT.size == INIT_PACKET_SIZE
assert _DEV.size == DEVICE_STATE_HEADER_SIZE
assert RAM_HEADER_SIZE == 1344

_METHOD_NAMES = {
    0: "none",
    int(MultifdFlag.ZLIB): "zlib",
    int(MultifdFlag.ZSTD): "zstd",
    int(MultifdFlag.QPL): "qpl",
    int(MultifdFlag.UADK): "uadk",
    int(MultifdFlag.QATZIP): "qatzip",
}

_SYNC = int(MultifdFlag.SYNC)
_DEVICE_STATE = int(MultifdFlag.DEVICE_STATE)
#: Flag bits a RAM packet may not carry.
_NOT_RAM_FLAGS = ~KNOWN_FLAGS | _DEVICE_STATE
_NOCOMP, _ZLIB, _ZSTD = MultifdCompression.NONE, MultifdCompression.ZLIB, MultifdCompression.ZSTD
_ZLIB_FLAG, _ZSTD_FLAG = int(MultifdFlag.ZLIB), int(MultifdFlag.ZSTD)

_U64_MAX = (1 << 64) - 1

_EMPTY_OFFSETS: OffsetArray = np.empty(0, dtype=np.uint64)
_EMPTY_OFFSETS.setflags(write=False)


# --------------------------------------------------------------------------
# helpers


def _prefix(packet_index: int | None) -> str:
    return "multifd packet" if packet_index is None else f"packet {packet_index}"


def _method_name(bits: int) -> str:
    return _METHOD_NAMES.get(bits, "unknown")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def _need(buf: Buffer, offset: int, size: int, what: str) -> None:
    if offset < 0:
        raise ConfigError(f"negative buffer offset {offset}")
    have = len(buf) - offset
    if have < size:
        raise TruncatedStream(
            f"{what} needs {size} bytes, only {max(have, 0)} present",
            offset=offset,
            raw=bytes(buf[offset:offset + 16]),
        )


def _raw(buf: Buffer, start: int, length: int = 16) -> bytes:
    return bytes(buf[start:start + length])


def _check_magic_version(buf: Buffer, offset: int, magic: int, version: int,
                         what: str) -> None:
    if magic != MULTIFD_MAGIC:
        hint = ""
        if magic == QEMU_VM_FILE_MAGIC:
            hint = " ('QEVM': this looks like the main migration channel)"
        raise StreamFormatError(
            f"{what}: magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}{hint}",
            offset=offset, raw=_raw(buf, offset),
        )
    if version != MULTIFD_VERSION:
        raise StreamFormatError(
            f"{what}: version {version}, expected {MULTIFD_VERSION}",
            offset=offset, raw=_raw(buf, offset),
        )


def _format_uuid(raw: bytes) -> str:
    return str(_uuid.UUID(bytes=raw))


# --------------------------------------------------------------------------
# initial packet


@dataclass(frozen=True)
class InitPacket:
    """The first 64 bytes of a multifd connection (``MultiFDInit_t``).

    ``uuid`` is the source's ``-uuid`` (16 raw bytes, all zero without one);
    the destination requires it to equal its own.
    """

    uuid: bytes
    channel_id: int

    def encode(self) -> bytes:
        if len(self.uuid) != 16:
            raise ConfigError(f"multifd uuid must be 16 bytes, got {len(self.uuid)}")
        if not 0 <= self.channel_id < MAX_MULTIFD_CHANNELS:
            raise ConfigError(
                f"multifd channel id {self.channel_id} outside 0..{MAX_MULTIFD_CHANNELS - 1}"
            )
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel_id)


def decode_init_packet(buf: Buffer, offset: int = 0, *, expected_uuid: bytes | None = None,
                       channels: int | None = None) -> InitPacket:
    """Decode and check a channel's initial packet.

    ``channels`` is this side's ``multifd-channels``: ids must be ``0 .. n-1``
    (QEMU lets ``id == n`` through; we do not). ``expected_uuid`` is this side's
    uuid. Duplicate ids can only be seen across channels and are the caller's
    check.
    """
    what = "multifd initial packet"
    _need(buf, offset, INIT_PACKET_SIZE, what)
    magic, version, uuid_raw, channel_id = _INIT.unpack_from(buf, offset)
    _check_magic_version(buf, offset, magic, version, what)
    if channels is not None and channel_id >= channels:
        raise StreamFormatError(
            f"{what}: channel id {channel_id}, but multifd-channels is {channels} "
            f"(ids 0..{channels - 1})",
            offset=offset, raw=_raw(buf, offset + 24, 1),
        )
    if expected_uuid is not None and uuid_raw != expected_uuid:
        mine = (_format_uuid(expected_uuid) if len(expected_uuid) == 16
                else expected_uuid.hex())
        raise StreamFormatError(
            f"{what} for channel {channel_id}: uuid {_format_uuid(uuid_raw)}, "
            f"expected {mine} (-uuid must be the same on both sides)",
            offset=offset, raw=bytes(uuid_raw),
        )
    return InitPacket(uuid=bytes(uuid_raw), channel_id=channel_id)


# --------------------------------------------------------------------------
# common header


def peek_common_header(buf: Buffer, offset: int = 0) -> tuple[int, int, int]:
    """``(magic, version, flags)`` of the packet at ``offset``, unchecked."""
    _need(buf, offset, COMMON_HEADER_SIZE, "multifd packet header")
    magic, version, flags = _COMMON.unpack_from(buf, offset)
    return int(magic), int(version), int(flags)


def is_device_state(flags: int) -> bool:
    """Whether a packet with these flags has a device-state header (QEMU 10.0)."""
    return bool(flags & _DEVICE_STATE)


def packet_header_size(buf: Buffer, offset: int = 0, *,
                       packet_index: int | None = None) -> int:
    """Check the common header and say how long the whole header is.

    Called on the first 12 bytes so that a wrong magic fails at once instead of
    waiting for 1332 more bytes that may never come.
    """
    magic, version, flags = peek_common_header(buf, offset)
    _check_magic_version(buf, offset, magic, version, _prefix(packet_index))
    return DEVICE_STATE_HEADER_SIZE if is_device_state(flags) else RAM_HEADER_SIZE


# --------------------------------------------------------------------------
# RAM packets


@dataclass(eq=False)
class RamPacket:
    """One decoded RAM packet header (``MultiFDPacket_t``).

    ``normal`` holds the offsets (inside ``ramblock``) of the pages whose data
    follows, in payload order; ``zero`` the offsets of pages to zero-fill (QEMU
    9.0+; always empty from 7.2). Both are owned copies in native byte order,
    so the receive buffer may be reused at once.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    zero_pages: int
    next_packet_size: int
    packet_num: int
    ramblock: str
    normal: OffsetArray
    zero: OffsetArray

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & _SYNC)

    @property
    def compression(self) -> int:
        """The method bits of ``flags`` (0 = none)."""
        return self.flags & MULTIFD_COMPRESSION_MASK

    @property
    def payload_size(self) -> int:
        """Bytes that follow the header on the wire.

        0 whenever there are no normal pages: QEMU 7.2 leaves a stale
        ``next_packet_size`` in empty packets and no version reads a payload
        for them.
        """
        return self.next_packet_size if self.normal_pages else 0

    @property
    def page_data_size(self) -> int:
        """Bytes of page data the payload holds once decompressed."""
        return self.normal_pages * PAGE_SIZE


def _ram_error(buf: Buffer, offset: int, packet_index: int | None, message: str,
               cls: type[StreamFormatError] = StreamFormatError,
               raw: bytes | None = None) -> StreamFormatError:
    return cls(f"{_prefix(packet_index)}: {message}", offset=offset,
               raw=_raw(buf, offset) if raw is None else raw)


def _raise_ram_header_error(buf: Buffer, offset: int, packet_index: int | None, magic: int,
                            version: int, flags: int, pages_alloc: int, normal_n: int,
                            zero_n: int) -> NoReturn:
    _check_magic_version(buf, offset, magic, version, _prefix(packet_index))
    if flags & ~KNOWN_FLAGS:
        message = f"unknown flag bits {flags & ~KNOWN_FLAGS:#x} in flags {flags:#x}"
    elif flags & _DEVICE_STATE:
        message = f"flags {flags:#x} mark a device-state packet, not a RAM packet"
    elif pages_alloc > MULTIFD_PAGES_PER_PACKET:
        raise _ram_error(buf, offset, packet_index,
                         f"pages_alloc {pages_alloc} exceeds {MULTIFD_PAGES_PER_PACKET} "
                         "pages per packet", LimitExceeded)
    elif normal_n > pages_alloc:
        message = f"normal_pages {normal_n} exceeds pages_alloc {pages_alloc}"
    else:
        message = (f"zero_pages {zero_n} exceeds pages_alloc {pages_alloc} - "
                   f"normal_pages {normal_n}")
    raise _ram_error(buf, offset, packet_index, message)


def decode_ram_packet(buf: Buffer, offset: int = 0, *, compression: MultifdCompression,
                      block_sizes: Mapping[str, int] | None = None,
                      packet_index: int | None = None) -> RamPacket:
    """Decode and check the RAM packet header at ``buf[offset:offset + 1344]``.

    ``compression`` is this side's ``multifd-compression``: every packet that
    lists pages must carry exactly its method bit; packets without pages may
    carry it or not (SYNC packets never do; 10.0 zero-only packets do).
    ``block_sizes`` maps RAM block idstrs to their used length; with it, the
    block must exist and every offset must lie inside it (looked up only when
    the packet lists pages: 7.2 leaves stale names in empty packets). Without
    it only page alignment is checked.
    """
    _need(buf, offset, RAM_HEADER_SIZE, "multifd RAM packet header")
    (magic, version, flags, pages_alloc, normal_n, next_size, packet_num,
     zero_n) = _RAM_FIXED.unpack_from(buf, offset)
    # One test for all the header faults; the slow path says which one it was.
    if (magic != MULTIFD_MAGIC or version != MULTIFD_VERSION or flags & _NOT_RAM_FLAGS
            or pages_alloc > MULTIFD_PAGES_PER_PACKET or normal_n > pages_alloc
            or zero_n > pages_alloc - normal_n):
        _raise_ram_header_error(buf, offset, packet_index, magic, version, flags,
                                pages_alloc, normal_n, zero_n)
    count = normal_n + zero_n

    method = flags & MULTIFD_COMPRESSION_MASK
    # (identity tests: hashing an Enum member costs more than the whole check)
    if compression is _NOCOMP:
        expected = 0
    elif compression is _ZLIB:
        expected = _ZLIB_FLAG
    else:
        expected = _ZSTD_FLAG
    if method != expected and (count or method):
        raise _ram_error(buf, offset, packet_index,
                         f"compression flags {method:#x} ({_method_name(method)}), but "
                         f"multifd-compression here is {compression.value}")

    if normal_n:
        if expected == 0:
            if next_size != normal_n * PAGE_SIZE:
                raise _ram_error(buf, offset, packet_index,
                                 f"payload size {next_size} for {normal_n} uncompressed "
                                 f"pages, expected {normal_n * PAGE_SIZE}")
        elif next_size > MAX_MULTIFD_COMPRESSED_PAYLOAD:
            raise _ram_error(buf, offset, packet_index,
                             f"compressed payload size {next_size} exceeds the limit "
                             f"{MAX_MULTIFD_COMPRESSED_PAYLOAD}", LimitExceeded)

    # The name field is 256 bytes; like QEMU, byte 255 is taken as NUL.
    name_at = offset + _RAMBLOCK_AT
    field = bytes(buf[name_at:name_at + MULTIFD_RAMBLOCK_FIELD - 1])
    end = field.find(b"\0")
    raw_name = field if end < 0 else field[:end]
    try:
        ramblock = raw_name.decode("ascii")
    except UnicodeDecodeError:
        raise _ram_error(buf, offset, packet_index,
                         f"ramblock name is not ASCII: {raw_name[:32]!r}",
                         raw=raw_name[:32]) from None

    if not count:
        return RamPacket(flags, pages_alloc, normal_n, zero_n, next_size, packet_num,
                         ramblock, _EMPTY_OFFSETS, _EMPTY_OFFSETS)

    offsets: OffsetArray = np.frombuffer(
        buf, dtype=">u8", count=count, offset=offset + _RAM_OFFSETS_AT
    ).astype(np.uint64)

    # Two reductions decide the common case (all offsets valid); the per-entry
    # arrays are only built to name the first bad entry.
    unaligned = int(np.bitwise_or.reduce(offsets)) & _PAGE_MASK
    block_size: int | None = None
    last_page = -1
    if block_sizes is not None:
        block_size = block_sizes.get(ramblock)
        if block_size is None:
            raise _ram_error(buf, offset, packet_index, f"unknown RAM block {ramblock!r}",
                             raw=raw_name[:32])
        last_page = block_size - PAGE_SIZE
    if unaligned or (block_size is not None and int(offsets.max()) > last_page):
        bad = (offsets & np.uint64(_PAGE_MASK)) != 0
        if block_size is not None:
            bad |= (offsets > np.uint64(last_page)) if last_page >= 0 else True
        i = int(bad.argmax())
        value = int(offsets[i])
        where = f"normal page {i}" if i < normal_n else f"zero page {i - normal_n}"
        if value & _PAGE_MASK:
            message = (f"page offset {value:#x} ({where}) in block {ramblock} is not "
                       f"{PAGE_SIZE}-byte aligned")
        else:
            assert block_size is not None
            message = (f"page offset {value:#x} ({where}) beyond block {ramblock} "
                       f"({_mib(block_size)})")
        raise _ram_error(buf, offset, packet_index, message)

    return RamPacket(flags, pages_alloc, normal_n, zero_n, next_size, packet_num,
                     ramblock, offsets[:normal_n], offsets[normal_n:])


def _offsets_bytes(offsets: Sequence[int] | npt.NDArray[np.integer] | None) -> bytes:
    if offsets is None:
        return b""
    arr = np.asarray(offsets)
    if arr.ndim != 1:
        raise ConfigError("page offsets must be a one-dimensional sequence")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0):
        raise ConfigError("page offsets must be non-negative integers")
    return arr.astype(">u8").tobytes()


def encode_ram_packet(*, flags: int, ramblock: str,
                      normal_offsets: Sequence[int] | npt.NDArray[np.integer] | None,
                      zero_offsets: Sequence[int] | npt.NDArray[np.integer] | None,
                      packet_num: int, payload_size: int,
                      pages_alloc: int = MULTIFD_PAGES_PER_PACKET) -> bytes:
    """The 1344-byte RAM packet header; the payload is sent after it separately.

    Unused fields and offset slots are zero, as QEMU 9.0+ writes them.
    """
    normal = _offsets_bytes(normal_offsets)
    zero = _offsets_bytes(zero_offsets)
    normal_n, zero_n = len(normal) // 8, len(zero) // 8
    if flags & ~KNOWN_FLAGS or flags & MultifdFlag.DEVICE_STATE:
        raise ConfigError(f"flags {flags:#x} are not valid for a RAM packet")
    if not 0 <= pages_alloc <= MULTIFD_PAGES_PER_PACKET:
        raise ConfigError(f"pages_alloc {pages_alloc} outside 0..{MULTIFD_PAGES_PER_PACKET}")
    if normal_n + zero_n > pages_alloc:
        raise ConfigError(f"{normal_n} normal + {zero_n} zero pages exceed pages_alloc "
                          f"{pages_alloc}")
    try:
        name = ramblock.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigError(f"ramblock name is not ASCII: {ramblock!r}") from None
    if len(name) >= MULTIFD_RAMBLOCK_FIELD or b"\0" in name:
        raise ConfigError(f"ramblock name {ramblock!r} does not fit the 256-byte field")
    if not 0 <= payload_size <= 0xFFFFFFFF:
        raise ConfigError(f"payload size {payload_size} does not fit 32 bits")
    if not 0 <= packet_num <= 0xFFFFFFFFFFFFFFFF:
        raise ConfigError(f"packet_num {packet_num} does not fit 64 bits")
    out = bytearray(RAM_HEADER_SIZE)
    _RAM_FIXED.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, pages_alloc,
                         normal_n, payload_size, packet_num, zero_n)
    out[_RAMBLOCK_AT:_RAMBLOCK_AT + len(name)] = name
    at = _RAM_OFFSETS_AT
    out[at:at + len(normal)] = normal
    out[at + len(normal):at + len(normal) + len(zero)] = zero
    return bytes(out)


def encode_sync_packet(packet_num: int) -> bytes:
    """A SYNC packet as QEMU 9.0+ sends it: flags SYNC, no pages, empty name."""
    return encode_ram_packet(flags=int(MultifdFlag.SYNC), ramblock="", normal_offsets=None,
                             zero_offsets=None, packet_num=packet_num, payload_size=0,
                             pages_alloc=0)


def page_runs(offsets: npt.NDArray[np.integer], page_size: int = PAGE_SIZE,
              ) -> list[tuple[int, int]]:
    """Coalesce page offsets, in packet order, into ``(start, length)`` runs.

    Consecutive entries that are consecutive pages (``next == previous +
    page_size``) form one run; the order of the input is kept (it is the
    payload order, and packets are not sorted), so the runs map one to one onto
    the payload. One iovec per run is what ``recvmsg_into`` / ``pwritev`` get.
    """
    n = len(offsets)
    if n == 0:
        return []
    arr = np.asarray(offsets, dtype=np.uint64)
    if int(arr.max()) > _U64_MAX - page_size:
        # ``previous + page_size`` could wrap around; no real offset is that large.
        ok = (arr[1:] - arr[:-1] == np.uint64(page_size)) & (arr[1:] > arr[:-1])
        ends = np.flatnonzero(~ok)
    else:
        ends = np.flatnonzero(arr[1:] - arr[:-1] != np.uint64(page_size))
    if not ends.size:
        return [(int(arr[0]), n * page_size)]
    # bounds[k] is the last index of run k-1 (bounds[0] = -1 before the first run)
    bounds = np.empty(ends.size + 2, dtype=np.int64)
    bounds[0] = -1
    bounds[1:-1] = ends
    bounds[-1] = n - 1
    lengths = (bounds[1:] - bounds[:-1]) * page_size
    starts = arr[bounds[:-1] + 1]
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


# --------------------------------------------------------------------------
# device-state packets (QEMU 10.0)


@dataclass(frozen=True)
class DeviceStatePacket:
    """A device-state packet header (``MultiFDPacketDeviceState_t``).

    ``payload_size`` bytes follow; they go unchanged to the handler registered
    as ``(idstr, instance_id)``.
    """

    idstr: str
    instance_id: int
    payload_size: int


def decode_device_state_header(buf: Buffer, offset: int = 0, *,
                               packet_index: int | None = None) -> DeviceStatePacket:
    """Decode and check the 276-byte device-state header at ``offset``."""
    p = _prefix(packet_index)
    _need(buf, offset, DEVICE_STATE_HEADER_SIZE, "multifd device-state packet header")
    magic, version, flags, field, instance_id, size = _DEV.unpack_from(buf, offset)
    _check_magic_version(buf, offset, magic, version, p)

    def fail(message: str, cls: type[StreamFormatError] = StreamFormatError,
             raw: bytes | None = None) -> StreamFormatError:
        return cls(f"{p}: {message}", offset=offset,
                   raw=_raw(buf, offset) if raw is None else raw)

    if flags != MultifdFlag.DEVICE_STATE:
        if flags & ~KNOWN_FLAGS:
            why = f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}"
        elif not flags & MultifdFlag.DEVICE_STATE:
            why = "DEVICE_STATE is not set"
        elif flags & MultifdFlag.SYNC:
            why = "SYNC is not allowed on a device-state packet"
        else:
            why = (f"compression {_method_name(flags & MULTIFD_COMPRESSION_MASK)} is not "
                   "allowed on a device-state packet")
        raise fail(f"device-state packet flags {flags:#x}: {why}")
    end = field.find(b"\0")
    if end < 0:
        raise fail("device-state idstr is not NUL-terminated within 256 bytes",
                   raw=bytes(field[:32]))
    try:
        idstr = field[:end].decode("ascii")
    except UnicodeDecodeError:
        raise fail(f"device-state idstr is not ASCII: {field[:min(end, 32)]!r}",
                   raw=bytes(field[:32])) from None
    if size == 0:
        raise fail(f"device-state packet for {idstr} instance {instance_id} has an "
                   "empty payload")
    if size > MAX_DEVICE_STATE_PACKET:
        raise fail(f"device-state payload size {size} for {idstr} exceeds the limit "
                   f"{MAX_DEVICE_STATE_PACKET}", LimitExceeded)
    return DeviceStatePacket(idstr=idstr, instance_id=int(instance_id),
                             payload_size=int(size))


def encode_device_state_header(idstr: str, instance_id: int, payload_size: int) -> bytes:
    """The 276-byte header for a device-state packet of ``payload_size`` bytes."""
    try:
        name = idstr.encode("ascii")
    except UnicodeEncodeError:
        raise ConfigError(f"device-state idstr is not ASCII: {idstr!r}") from None
    if len(name) >= MULTIFD_RAMBLOCK_FIELD or b"\0" in name:
        raise ConfigError(f"device-state idstr {idstr!r} does not fit the 256-byte field")
    if not 0 < payload_size <= MAX_DEVICE_STATE_PACKET:
        raise ConfigError(f"device-state payload size {payload_size} outside "
                          f"1..{MAX_DEVICE_STATE_PACKET}")
    if not 0 <= instance_id <= 0xFFFFFFFF:
        raise ConfigError(f"instance_id {instance_id} does not fit 32 bits")
    return _DEV.pack(MULTIFD_MAGIC, MULTIFD_VERSION, int(MultifdFlag.DEVICE_STATE), name,
                     instance_id, payload_size)


# --------------------------------------------------------------------------
# compression


class ChannelDecompressor(Protocol):
    """One channel's decompression state, kept for the whole migration."""

    def decompress(self, payload: Buffer, expected_len: int) -> bytes | memoryview:
        """The page data of one packet; exactly ``expected_len`` bytes or an error."""
        ...


class ChannelCompressor(Protocol):
    """One channel's compression state, kept for the whole migration."""

    def compress(self, pages: Iterable[Buffer]) -> bytes:
        """One packet's payload, ending on a flush boundary."""
        ...


def _check_expected(expected_len: int) -> None:
    if not 0 <= expected_len <= MULTIFD_PACKET_BYTES:
        raise ConfigError(f"expected page data {expected_len} bytes outside "
                          f"0..{MULTIFD_PACKET_BYTES}")


class _Poisonable:
    """After one failure a stream decoder is out of sync for good: fail fast."""

    _name = "multifd"

    def __init__(self) -> None:
        # Only the message is kept, not the error: a raised error's traceback
        # holds the frame that holds this decompressor, and that cycle would
        # keep libzstd's context and window (about 1 MiB, invisible to the
        # garbage collector's thresholds) alive after every refusal.
        self._failed: str | None = None

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise StreamFormatError(
                f"{self._name} stream of this channel already failed: {self._failed}"
            )

    def _fail(self, message: str, payload: Buffer) -> StreamFormatError:
        err = StreamFormatError(f"{self._name} payload: {message}", raw=bytes(payload[:16]))
        self._failed = err.message
        return err


class NoCompression:
    """``multifd-compression=none``: the payload is the page data itself."""

    def decompress(self, payload: Buffer, expected_len: int) -> bytes | memoryview:
        _check_expected(expected_len)
        if len(payload) != expected_len:
            raise StreamFormatError(
                f"uncompressed payload is {len(payload)} bytes, expected {expected_len}",
                raw=bytes(payload[:16]),
            )
        return memoryview(payload) if isinstance(payload, bytearray) else payload

    def compress(self, pages: Iterable[Buffer]) -> bytes:
        return b"".join(pages)


class ZlibChannelDecompressor(_Poisonable):
    """One zlib (RFC 1950) stream per channel; each packet ends with a sync flush."""

    _name = "zlib"

    def __init__(self) -> None:
        super().__init__()
        self._d = zlib.decompressobj()

    def decompress(self, payload: Buffer, expected_len: int) -> bytes:
        self._check_alive()
        _check_expected(expected_len)
        d = self._d
        try:
            # max_length bounds what a hostile payload can make us allocate.
            out = d.decompress(payload, expected_len) if expected_len else b""
            tail = d.unconsumed_tail if expected_len else bytes(payload)
            if tail:
                # All page data is out; what is left may only be the empty
                # block of the sync flush, which yields nothing.
                extra = d.decompress(tail, 1)
                if extra or d.unconsumed_tail:
                    raise self._fail(f"decompresses to more than the {expected_len} bytes "
                                     "the packet announced", payload)
        except zlib.error as e:
            raise self._fail(f"{e} (payloads only decode in order on one stream per "
                             "channel)", payload) from e
        if d.eof:
            raise self._fail("the zlib stream ended; QEMU keeps it open for the whole "
                             "migration", payload)
        if len(out) != expected_len:
            raise self._fail(f"decompresses to {len(out)} bytes, expected {expected_len}",
                             payload)
        return out


class _BoundedSink:
    """Collects libzstd's output up to one packet's announced length.

    It never raises: python-zstandard's ``stream_writer`` leaks its output
    buffer (``write_size`` bytes, 1 MiB here) each time the writer's
    ``write`` raises, which a hostile source could repeat until memory runs
    out. Output past the limit is dropped and only counted; the caller feeds
    the payload in slices and stops at the first slice that overflowed.
    """

    __slots__ = ("buf", "limit", "overflow")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.limit = 0
        self.overflow = False

    def write(self, data: bytes) -> int:
        if not self.overflow:
            if len(self.buf) + len(data) > self.limit:
                self.overflow = True
            else:
                self.buf += data
        return len(data)


class ZstdChannelDecompressor(_Poisonable):
    """One zstd frame per channel that never ends; each packet ends with a block flush.

    Uses libzstd's streaming decoder through ``stream_writer`` rather than
    ``decompressobj``: the writer hands output over in bounded chunks, so a
    payload that expands beyond the packet's page count is refused after at
    most one input slice (``_ZSTD_IN_CHUNK``) instead of being decompressed in
    full, and never holds more than the announced length.
    """

    _name = "zstd"

    def __init__(self) -> None:
        super().__init__()
        self._sink = _BoundedSink()
        self._w = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_writer(
            cast("IO[bytes]", self._sink), write_size=_ZSTD_OUT_CHUNK)

    def decompress(self, payload: Buffer, expected_len: int) -> bytes:
        self._check_alive()
        _check_expected(expected_len)
        sink = self._sink
        sink.buf = bytearray()
        sink.limit = expected_len
        sink.overflow = False
        view = memoryview(payload).cast("B")
        try:
            for at in range(0, len(view), _ZSTD_IN_CHUNK):
                self._w.write(view[at:at + _ZSTD_IN_CHUNK])
                if sink.overflow:
                    break
        except zstandard.ZstdError as e:
            raise self._fail(f"{e} (payloads only decode in order on one stream per "
                             "channel)", payload) from e
        finally:
            view.release()
        if sink.overflow:
            raise self._fail(f"decompresses to more than the {expected_len} bytes the "
                             "packet announced", payload)
        if len(sink.buf) != expected_len:
            raise self._fail(f"decompresses to {len(sink.buf)} bytes, expected "
                             f"{expected_len}", payload)
        return bytes(sink.buf)


class ZlibChannelCompressor:
    """Sender side of :class:`ZlibChannelDecompressor`.

    The caller passes stable page data: zlib reads it while compressing
    (QEMU copies each guest page first for that reason).
    """

    def __init__(self, level: int = 1) -> None:
        if not 0 <= level <= 9:
            raise ConfigError(f"multifd-zlib-level {level} outside 0..9")
        self._c = zlib.compressobj(level)

    def compress(self, pages: Iterable[Buffer]) -> bytes:
        c = self._c
        parts = [c.compress(page) for page in pages]
        parts.append(c.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(parts)


class ZstdChannelCompressor:
    """Sender side of :class:`ZstdChannelDecompressor`: one frame, flushed per packet."""

    def __init__(self, level: int = 1) -> None:
        if not 1 <= level <= 20:
            raise ConfigError(f"multifd-zstd-level {level} outside 1..20")
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, pages: Iterable[Buffer]) -> bytes:
        c = self._c
        parts = [c.compress(page) for page in pages]
        parts.append(c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return b"".join(parts)


def make_decompressor(method: MultifdCompression) -> ChannelDecompressor:
    """A fresh decompressor for one channel."""
    if method is MultifdCompression.ZLIB:
        return ZlibChannelDecompressor()
    if method is MultifdCompression.ZSTD:
        return ZstdChannelDecompressor()
    return NoCompression()


def make_compressor(method: MultifdCompression, level: int = 1) -> ChannelCompressor:
    """A fresh compressor for one channel."""
    if method is MultifdCompression.ZLIB:
        return ZlibChannelCompressor(level)
    if method is MultifdCompression.ZSTD:
        return ZstdChannelCompressor(level)
    return NoCompression()
