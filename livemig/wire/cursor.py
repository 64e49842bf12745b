"""A read position over a buffer, for decoders that parse in place.

Decoders in this package parse records from a buffer owned by the I/O layer
(usually a memoryview of a large receive buffer). A record that is only partly
in the buffer raises :class:`Incomplete`; the decoder then rolls back to the
start of that record and reports how much it consumed, so "not enough bytes
yet" never becomes a short integer. Offsets in errors are stream offsets:
``base`` is the stream position of ``buf[0]``.
"""

from __future__ import annotations

import struct

from livemig.errors import LimitExceeded, StreamFormatError

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Incomplete(Exception):
    """Internal signal: the record continues past the end of the buffer."""


class Cursor:
    """Big-endian reads from ``buf[pos:end]``; raises :class:`Incomplete` at the end."""

    __slots__ = ("base", "buf", "end", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0,
                 end: int | None = None, base: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        self.base = base

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    @property
    def offset(self) -> int:
        """Stream offset of the next byte."""
        return self.base + self.pos

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise Incomplete

    def u8(self) -> int:
        if self.pos >= self.end:
            raise Incomplete
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def peek_u8(self) -> int:
        if self.pos >= self.end:
            raise Incomplete
        return self.buf[self.pos]

    def be16(self) -> int:
        self.need(2)
        (v,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def be32(self) -> int:
        self.need(4)
        (v,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def be64(self) -> int:
        self.need(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes as a view (no copy); the caller copies if it keeps them."""
        self.need(n)
        v = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def counted_string(self, what: str) -> str:
        """u8 length + bytes (QEMU's qemu_put_counted_string); ASCII only."""
        start = self.pos
        n = self.u8()
        raw = bytes(self.take(n))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not ASCII: {raw[:32]!r}", at=start) from None

    def error(self, message: str, *, at: int | None = None,
              cls: type[StreamFormatError] = StreamFormatError) -> StreamFormatError:
        pos = self.pos if at is None else at
        raw = bytes(self.buf[pos:min(self.end, pos + 16)])
        return cls(message, offset=self.base + pos, raw=raw)

    def check_limit(self, value: int, limit: int, what: str, *, at: int | None = None) -> None:
        """Refuse a wire length above ``limit`` before anything is allocated for it."""
        if value > limit:
            raise self.error(f"{what} {value} exceeds the limit {limit}", at=at,
                             cls=LimitExceeded)
