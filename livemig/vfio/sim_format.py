"""The byte stream ``vfio-sim`` writes into its data fd (and reads back when resuming).

For VFIO the data fd stream is opaque: only the device model reads it. This is
``vfio-sim``'s own format, chosen to be simple, self-delimiting and checked, so a
destination can tell a complete, intact stream from anything else. A stream is a
sequence of records, each a 24-byte big-endian header and a payload::

    4s   magic   b"VSIM"
    u16  type    1 HEADER, 2 CHUNK, 3 END
    u16  flags   0
    u64  arg     HEADER: device memory size; CHUNK: byte offset; END: CHUNK records sent
    u32  length  payload bytes
    u32  crc     CRC-32 of the 20 header bytes before it, continued over the payload

    HEADER payload  u32 format version (1), u32 chunk size
    CHUNK payload   device memory at ``arg`` (at most one chunk, within the memory)
    END payload     32-byte memory digest: SHA-256 over the CRCs of the CHUNK
                    records that would carry the memory now (one be32 per chunk:
                    what a destination checks while the machine is stopped, from
                    the CRCs it verified anyway); 32-byte state digest: SHA-256
                    over the chunks' SHA-256, then the config state (the full
                    check, done after the migration). The device is stopped, so
                    both are final.

A stream is HEADER, any number of CHUNKs (a chunk may repeat: later wins, as
precopy re-sends dirtied chunks), END, and nothing after. Precopy data and
stop-copy data are one stream (the saving group shares one fd).

Pure code, no I/O: :class:`SimStreamDecoder` parses ``buf[start:end]`` and returns
records plus the position reached (a record cut by the end is left unconsumed);
chunk payloads are views of the caller's buffer. Errors are
:class:`~livemig.errors.StreamFormatError` with the stream offset of the record;
the decoder is poisoned after one.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from livemig.errors import ConfigError, LimitExceeded, StreamFormatError

__all__ = [
    "MAX_SIM_CHUNK",
    "RECORD_HEADER_SIZE",
    "SIM_FORMAT_VERSION",
    "SimChunk",
    "SimEnd",
    "SimHeader",
    "SimRecordType",
    "SimStreamDecoder",
    "chunk_crc",
    "encode_chunk",
    "encode_end",
    "encode_header",
    "record_size",
]

MAGIC = b"VSIM"
SIM_FORMAT_VERSION = 1
RECORD_HEADER_SIZE = 24
#: Largest chunk a stream may declare: chunk payloads are parsed from the
#: consumer's read buffer, so this bounds that buffer. 16 MiB is far above the
#: 64 KiB-1 MiB chunks a device uses.
MAX_SIM_CHUNK = 16 << 20
_DIGEST = 32

_REC = struct.Struct(">4sHHQI")  # the 20 bytes the CRC covers first
_CRC = struct.Struct(">I")
_HDR_PAYLOAD = struct.Struct(">II")


class SimRecordType(enum.IntEnum):
    HEADER = 1
    CHUNK = 2
    END = 3


@dataclass(frozen=True, slots=True)
class SimHeader:
    mem_size: int
    chunk_size: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class SimChunk:
    """``data`` belongs at byte ``address`` of device memory (a view; copy it out);
    ``crc`` is the record's (checked) CRC."""

    address: int
    data: memoryview
    offset: int = 0
    crc: int = 0


@dataclass(frozen=True, slots=True)
class SimEnd:
    """The two digests of the END payload (see the module doc)."""

    chunks: int
    memory_digest: bytes
    state_digest: bytes
    offset: int = 0


SimRecord = SimHeader | SimChunk | SimEnd


def _record(kind: SimRecordType, arg: int, payload: bytes | memoryview) -> list[bytes | memoryview]:
    head = _REC.pack(MAGIC, kind, 0, arg, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return [head + _CRC.pack(crc), payload]


def encode_header(mem_size: int, chunk_size: int) -> bytes:
    if not 0 < chunk_size <= MAX_SIM_CHUNK:
        raise ConfigError(f"chunk size {chunk_size} outside 1..{MAX_SIM_CHUNK}")
    return b"".join(_record(SimRecordType.HEADER, mem_size,
                            _HDR_PAYLOAD.pack(SIM_FORMAT_VERSION, chunk_size)))


def encode_chunk(address: int, data: bytes | memoryview) -> list[bytes | memoryview]:
    """The record for one chunk: [header, data] (the data is not copied)."""
    return _record(SimRecordType.CHUNK, address, data)


def chunk_crc(address: int, data: bytes | memoryview) -> int:
    """The CRC the CHUNK record for ``data`` at ``address`` carries."""
    return zlib.crc32(data, zlib.crc32(_REC.pack(MAGIC, SimRecordType.CHUNK, 0, address,
                                                 len(data))))


def encode_end(chunks: int, memory_digest: bytes, state_digest: bytes) -> bytes:
    if len(memory_digest) != _DIGEST or len(state_digest) != _DIGEST:
        raise ConfigError("END needs two 32-byte SHA-256 digests")
    return b"".join(_record(SimRecordType.END, chunks, memory_digest + state_digest))


def record_size(payload: int) -> int:
    """Bytes on the stream for a record with ``payload`` bytes."""
    return RECORD_HEADER_SIZE + payload


class SimStreamDecoder:
    """Parses one ``vfio-sim`` stream for a device of ``mem_size`` bytes."""

    def __init__(self, mem_size: int, chunk_size: int, *, where: str = "vfio-sim stream") -> None:
        self.mem_size = mem_size
        self.chunk_size = chunk_size
        self.where = where
        self.header: SimHeader | None = None
        self.end: SimEnd | None = None
        self.chunks = 0
        self._error: StreamFormatError | None = None

    @property
    def complete(self) -> bool:
        """The END record was read."""
        return self.end is not None

    def parse(self, buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None,
              base: int = 0) -> tuple[list[SimRecord], int]:
        """Records from ``buf[start:end]``; ``base`` is the stream offset of ``buf[0]``."""
        if self._error is not None:
            raise self._error
        view = memoryview(buf).cast("B")
        end = len(view) if end is None else end
        out: list[SimRecord] = []
        pos = start
        try:
            while end - pos >= RECORD_HEADER_SIZE:
                magic, kind, flags, arg, length = _REC.unpack_from(view, pos)
                (crc,) = _CRC.unpack_from(view, pos + 20)
                at = base + pos
                if self.end is not None:
                    raise self._fail("bytes after the END record", at, view, pos)
                if magic != MAGIC:
                    raise self._fail(f"bad record magic {bytes(magic)!r}", at, view, pos)
                if flags:
                    raise self._fail(f"unknown record flags {flags:#x}", at, view, pos)
                limit = {SimRecordType.HEADER: _HDR_PAYLOAD.size, SimRecordType.END: 2 * _DIGEST,
                         SimRecordType.CHUNK: min(self.chunk_size, MAX_SIM_CHUNK)}.get(kind)
                if limit is None:
                    raise self._fail(f"unknown record type {kind}", at, view, pos)
                if length > limit or (kind != SimRecordType.CHUNK and length != limit):
                    raise self._fail(f"{SimRecordType(kind).name} record length {length} "
                                     f"(expected {'at most ' if kind == 2 else ''}{limit})",
                                     at, view, pos, LimitExceeded if length > limit else None)
                if end - pos < RECORD_HEADER_SIZE + length:
                    break
                payload = view[pos + RECORD_HEADER_SIZE:pos + RECORD_HEADER_SIZE + length]
                if zlib.crc32(payload, zlib.crc32(view[pos:pos + 20])) != crc:
                    raise self._fail(f"{SimRecordType(kind).name} record fails its CRC", at,
                                     view, pos)
                out.append(self._check(SimRecordType(kind), arg, payload, at, view, pos, crc))
                pos += RECORD_HEADER_SIZE + length
        except StreamFormatError as e:
            self._error = e
            raise
        return out, pos

    def _check(self, kind: SimRecordType, arg: int, payload: memoryview, at: int,
               view: memoryview, pos: int, crc: int) -> SimRecord:
        if kind == SimRecordType.HEADER:
            if self.header is not None:
                raise self._fail("second HEADER record", at, view, pos)
            version, chunk = _HDR_PAYLOAD.unpack(payload)
            if version != SIM_FORMAT_VERSION:
                raise self._fail(f"stream format version {version}, this device reads "
                                 f"{SIM_FORMAT_VERSION}", at, view, pos)
            if (arg, chunk) != (self.mem_size, self.chunk_size):
                raise self._fail(f"stream is for a device with {arg} bytes of memory in "
                                 f"{chunk}-byte chunks; this one has {self.mem_size} in "
                                 f"{self.chunk_size}-byte chunks", at, view, pos)
            self.header = SimHeader(arg, chunk, at)
            return self.header
        if self.header is None:
            raise self._fail(f"{kind.name} record before the HEADER", at, view, pos)
        if kind == SimRecordType.CHUNK:
            if arg % self.chunk_size or arg + len(payload) > self.mem_size:
                raise self._fail(f"chunk of {len(payload)} bytes at {arg:#x} does not fit the "
                                 f"device's {self.mem_size:#x} bytes of "
                                 f"{self.chunk_size:#x}-byte chunks", at, view, pos)
            self.chunks += 1
            return SimChunk(arg, payload, at, crc)
        if arg != self.chunks:
            raise self._fail(f"END counts {arg} chunks, the stream had {self.chunks}", at,
                             view, pos)
        self.end = SimEnd(arg, bytes(payload[:_DIGEST]), bytes(payload[_DIGEST:]), at)
        return self.end

    def _fail(self, message: str, at: int, view: memoryview, pos: int,
              cls: type[StreamFormatError] | None = None) -> StreamFormatError:
        err = (cls or StreamFormatError)(message, offset=at, where=self.where,
                                         raw=bytes(view[pos:pos + 24]))
        self._error = err
        return err
