"""The body of ``ram`` sections: record words, page records, the block list.

Theory of operation. A RAM section body is a sequence of records, each
starting with a be64 word ``offset | flags`` (flags in the bits below the
target page size) and ending with EOS. Almost all of a precopy stream is
page records of two shapes that repeat with a fixed stride once the block is
named: ``PAGE|CONTINUE`` (8 + 4096 bytes) and ``ZERO|CONTINUE`` (8 + 1 bytes).
The decoder therefore looks at the buffer through numpy views with that
stride, finds how many consecutive records have exactly that shape, checks
their offsets in one vectorised comparison, and emits them as one
:class:`RamPages` / :class:`RamZeroPages` event whose data is a strided view
into the buffer. Everything else goes through a per-record path.

The block named last is remembered for the whole migration, not per section
(QEMU's PART sections may start with CONTINUE).
"""

from __future__ import annotations

import struct

import numpy as np

from livemig import limits
from livemig.errors import StreamFormatError
from livemig.wire.constants import (
    ENCODING_FLAG_XBZRLE,
    MAPPED_RAM_HDR_VERSION,
    MAPPED_RAM_HEADER_SIZE,
    RamFlag,
    SectionType,
)
from livemig.wire.cursor import Cursor, Incomplete
from livemig.wire.events import (
    Event,
    MappedRamHeader,
    RamBlockInfo,
    RamBlockList,
    RamCompressedPage,
    RamEndOfSection,
    RamMultifdFlush,
    RamPages,
    RamXbzrlePage,
    RamZeroPages,
    Seek,
)

PS = limits.TARGET_PAGE_SIZE
FLAG_MASK = PS - 1
_PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)
_KNOWN_FLAGS = int(
    RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE
    | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE | RamFlag.MULTIFD_FLUSH | RamFlag.HOOK
    | RamFlag.FULL
)
#: Largest zlib stream of one compressed page 7.2 accepts (compressBound(4096)).
MAX_COMPRESSED_PAGE = PS + (PS >> 12) + (PS >> 14) + (PS >> 25) + 13


def _flag_names(flags: int) -> str:
    names = [f.name for f in RamFlag if flags & f and f.name]
    unknown = flags & ~_KNOWN_FLAGS
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "0"


class RamDecoder:
    """Decodes RAM section bodies for one channel (the main one).

    ``capabilities`` are the source's, as far as they change the wire: the
    configuration's validated list (``x-ignore-shared``, ``mapped-ram``) and
    whether POSTCOPY_ADVISE announced hugepage blocks.
    """

    def __init__(self) -> None:
        self.blocks: dict[str, RamBlockInfo] = {}
        self.block_order: list[str] = []
        self.ignore_shared = False
        self.mapped_ram = False
        self.postcopy_hugepages = False
        self.last_block: str | None = None
        # MEM_SIZE list in progress (it may be interrupted by a mapped-ram seek)
        self._list_remaining: int | None = None
        self._list_total = 0
        self._list: list[RamBlockInfo] = []
        self.zero_records = 0
        self.page_records = 0

    # -- block bookkeeping -------------------------------------------------

    def _block(self, cur: Cursor, name: str, at: int) -> RamBlockInfo:
        info = self.blocks.get(name)
        if info is None:
            raise cur.error(f"RAM record names unknown block {name!r}", at=at)
        return info

    def _resolve(self, cur: Cursor, flags: int, at: int) -> RamBlockInfo:
        if flags & RamFlag.CONTINUE:
            if self.last_block is None:
                raise cur.error("RAM record with CONTINUE before any block was named", at=at)
            return self.blocks[self.last_block]
        name = cur.counted_string("RAM block name")
        info = self._block(cur, name, at)
        self.last_block = name
        return info

    @staticmethod
    def _check_offset(cur: Cursor, info: RamBlockInfo, offset: int, at: int) -> None:
        if offset + PS > info.length:
            raise cur.error(
                f"page offset {offset:#x} beyond block {info.name} ({_size(info.length)})", at=at)

    # -- the body ------------------------------------------------------------

    def parse_body(self, cur: Cursor, kind: SectionType, out: list[Event],
                   max_events: int = 4096) -> bool:
        """Append events for records at ``cur`` until EOS (returns True) or until
        the buffer runs out (returns False, ``cur.pos`` at a record boundary)."""
        while len(out) < max_events:
            if self._list_remaining is not None:
                if not self._parse_block_entries(cur, out):
                    return False
                if out and isinstance(out[-1], Seek):
                    return False
                continue
            start = cur.pos
            try:
                if self._fast_runs(cur, out):
                    continue
                word = cur.be64()
                flags = word & FLAG_MASK
                offset = word & ~FLAG_MASK
                if flags & ~_KNOWN_FLAGS or flags & (RamFlag.FULL | RamFlag.HOOK):
                    if flags & RamFlag.HOOK:
                        raise cur.error("RAM_SAVE_FLAG_HOOK (RDMA) is not supported", at=start)
                    raise cur.error(f"unknown RAM flags {_flag_names(flags)}", at=start)
                base = flags & ~RamFlag.CONTINUE
                if base == RamFlag.EOS:
                    out.append(RamEndOfSection(kind, cur.base + start))
                    return True
                if base == RamFlag.MULTIFD_FLUSH:
                    if self.mapped_ram:
                        raise cur.error("MULTIFD_FLUSH in a mapped-ram stream", at=start)
                    out.append(RamMultifdFlush(cur.base + start))
                elif base == RamFlag.MEM_SIZE:
                    if kind != SectionType.SECTION_START or self.blocks:
                        raise cur.error("a second RAM block list (MEM_SIZE)", at=start)
                    cur.check_limit(offset, limits.MAX_RAM_TOTAL_BYTES,
                                    "RAM total size", at=start)
                    self._list_remaining = offset
                    self._list_total = offset
                    self._list = []
                elif base in (RamFlag.ZERO, RamFlag.PAGE, RamFlag.XBZRLE,
                              RamFlag.COMPRESS_PAGE):
                    if self.mapped_ram:
                        raise cur.error(f"page record ({_flag_names(flags)}) in a mapped-ram "
                                        "stream", at=start)
                    self._page_record(cur, flags, offset, start, out)
                else:
                    raise cur.error(f"unknown combination of RAM flags {_flag_names(flags)}",
                                    at=start)
            except Incomplete:
                cur.pos = start
                return False
        return False

    def _page_record(self, cur: Cursor, flags: int, offset: int, start: int,
                     out: list[Event]) -> None:
        info = self._resolve(cur, flags, start)
        self._check_offset(cur, info, offset, start)
        base = flags & ~RamFlag.CONTINUE
        offs = np.array([offset], dtype=np.uint64)
        if base == RamFlag.ZERO:
            fill = cur.u8()
            out.append(RamZeroPages(info.name, offs, fill))
            self.zero_records += 1
        elif base == RamFlag.PAGE:
            page = cur.take(PS)
            out.append(RamPages(info.name, offs,
                                np.frombuffer(page, dtype=np.uint8).reshape(1, PS)))
            self.page_records += 1
        elif base == RamFlag.XBZRLE:
            enc = cur.u8()
            if enc != ENCODING_FLAG_XBZRLE:
                raise cur.error(f"XBZRLE record with encoding flag {enc:#x}", at=start)
            n = cur.be16()
            cur.check_limit(n, PS, "XBZRLE length", at=start)
            out.append(RamXbzrlePage(info.name, offset, bytes(cur.take(n)), cur.base + start))
            self.page_records += 1
        else:
            n = cur.be32()
            cur.check_limit(n, MAX_COMPRESSED_PAGE, "compressed page length", at=start)
            out.append(RamCompressedPage(info.name, offset, bytes(cur.take(n)),
                                         cur.base + start))
            self.page_records += 1

    def _fast_runs(self, cur: Cursor, out: list[Event]) -> bool:
        """Consume a run of same-shape CONTINUE records in one step, if there is one."""
        if self.last_block is None or cur.remaining < 8:
            return False
        buf = cur.buf
        pos = cur.pos
        # Flags live in the low byte pair of the big-endian word.
        low = buf[pos + 7] | ((buf[pos + 6] & 0x0F) << 8)
        if low == _PAGE_CONT:
            stride, kind = 8 + PS, 0
        elif low == _ZERO_CONT:
            stride, kind = 9, 1
        else:
            return False
        n = (cur.end - pos) // stride
        if n < 2:
            return False
        words = np.ndarray((n,), dtype=">u8", buffer=buf, offset=pos, strides=(stride,))
        flags = words & np.uint64(FLAG_MASK)
        bad = np.flatnonzero(flags != (_PAGE_CONT if kind == 0 else _ZERO_CONT))
        if kind == 1:
            fills = np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(stride,))
            badfill = np.flatnonzero(fills)
            if badfill.size and (not bad.size or badfill[0] < bad[0]):
                bad = badfill
        run = int(bad[0]) if bad.size else n
        if run < 2:
            return False
        offsets = (words[:run] & np.uint64(~FLAG_MASK & 0xFFFFFFFFFFFFFFFF)).astype(np.uint64)
        info = self.blocks[self.last_block]
        over = np.flatnonzero(offsets > np.uint64(info.length - PS)) if info.length >= PS \
            else np.arange(run)
        if over.size:
            i = int(over[0])
            raise cur.error(f"page offset {int(offsets[i]):#x} beyond block {info.name} "
                            f"({_size(info.length)})", at=pos + i * stride)
        if self.mapped_ram:
            raise cur.error("page record in a mapped-ram stream", at=pos)
        if kind == 0:
            data = np.ndarray((run, PS), dtype=np.uint8, buffer=buf, offset=pos + 8,
                              strides=(stride, 1))
            out.append(RamPages(info.name, offsets, data))
            self.page_records += run
        else:
            out.append(RamZeroPages(info.name, offsets, 0))
            self.zero_records += run
        cur.pos = pos + run * stride
        return True

    # -- MEM_SIZE ------------------------------------------------------------

    def _parse_block_entries(self, cur: Cursor, out: list[Event]) -> bool:
        assert self._list_remaining is not None
        while self._list_remaining > 0:
            start = cur.pos
            try:
                name = cur.counted_string("RAM block name")
                if not name:
                    raise cur.error("RAM block list entry with an empty name", at=start)
                length = cur.be64()
                page_size = cur.be64() if self.postcopy_hugepages else None
                addr = cur.be64() if self.ignore_shared else None
                mhdr = None
                if self.mapped_ram:
                    mhdr = self._mapped_ram_header(cur, name, length)
            except Incomplete:
                cur.pos = start
                return False
            if name in self.blocks or any(b.name == name for b in self._list):
                raise cur.error(f"RAM block {name!r} listed twice", at=start)
            if length % PS or length == 0:
                raise cur.error(f"RAM block {name} length {length:#x} is not a positive "
                                "multiple of the page size", at=start)
            cur.check_limit(length, limits.MAX_RAM_BLOCK_BYTES, f"RAM block {name} length",
                            at=start)
            if length > self._list_remaining:
                raise cur.error(f"RAM block {name} length {length:#x} is more than the "
                                f"{self._list_remaining:#x} bytes left of the list's total",
                                at=start)
            if len(self._list) >= limits.MAX_RAM_BLOCKS:
                raise cur.error(f"more than {limits.MAX_RAM_BLOCKS} RAM blocks", at=start)
            info = RamBlockInfo(name, length, page_size, addr, mhdr)
            self._list.append(info)
            self._list_remaining -= length
            if mhdr is not None:
                out.append(Seek(mhdr.pages_offset + length))
                if self._list_remaining == 0:
                    self._finish_list(out)
                return True
        self._finish_list(out)
        return True

    def _finish_list(self, out: list[Event]) -> None:
        for b in self._list:
            self.blocks[b.name] = b
            self.block_order.append(b.name)
        ev = RamBlockList(self._list_total, tuple(self._list))
        # A pending Seek must stay the last event: the caller stops there.
        if out and isinstance(out[-1], Seek):
            out.insert(len(out) - 1, ev)
        else:
            out.append(ev)
        self._list_remaining = None
        self._list = []

    def _mapped_ram_header(self, cur: Cursor, name: str, length: int) -> MappedRamHeader:
        at = cur.pos
        cur.need(MAPPED_RAM_HEADER_SIZE)
        version = cur.be32()
        page_size = cur.be64()
        bitmap_offset = cur.be64()
        pages_offset = cur.be64()
        if version != MAPPED_RAM_HDR_VERSION:
            raise cur.error(f"mapped-ram header of block {name}: version {version}, "
                            f"expected {MAPPED_RAM_HDR_VERSION}", at=at)
        if page_size != PS:
            raise cur.error(f"mapped-ram header of block {name}: page size {page_size}, "
                            f"expected {PS}", at=at)
        if pages_offset % PS:
            raise cur.error(f"mapped-ram block {name}: pages offset {pages_offset:#x} is not "
                            "page aligned", at=at)
        if bitmap_offset < cur.offset:
            # QEMU puts the bitmap right after this header: anything before it would be
            # written over the file's header, block list or an earlier block
            raise cur.error(f"mapped-ram block {name}: bitmap offset {bitmap_offset:#x} "
                            f"overlaps the file header (the block's header ends at "
                            f"{cur.offset:#x})", at=at)
        if bitmap_offset + bitmap_bytes(length // PS) > pages_offset:
            raise cur.error(f"mapped-ram block {name}: bitmap at {bitmap_offset:#x} overlaps "
                            f"the pages at {pages_offset:#x}", at=at)
        if pages_offset + length > 1 << 62:
            raise cur.error(f"mapped-ram block {name}: pages offset {pages_offset:#x} is "
                            "absurd", at=at)
        return MappedRamHeader(version, page_size, bitmap_offset, pages_offset)


def bitmap_bytes(pages: int) -> int:
    """Size of a mapped-ram bitmap: host ``unsigned long`` words (8 bytes on x86_64)."""
    return (pages + 63) // 64 * 8


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def xbzrle_decode(encoded: bytes | memoryview, page: bytearray | memoryview) -> None:
    """Apply an XBZRLE delta onto ``page`` in place (QEMU migration/xbzrle.c rules).

    Pairs of (zero run, non-zero run + literal bytes), counts as ULEB128 of at
    most two bytes; only the first zero run may be empty; non-zero runs must
    not be empty; the page must not be overrun.
    """
    enc = bytes(encoded)
    i = 0
    d = 0
    n = len(enc)
    size = len(page)

    def uleb(at: int) -> tuple[int, int]:
        if at >= n:
            raise StreamFormatError(f"XBZRLE: count truncated at byte {at}")
        b0 = enc[at]
        if b0 < 0x80:
            return b0, at + 1
        if at + 1 >= n:
            raise StreamFormatError(f"XBZRLE: count truncated at byte {at}")
        b1 = enc[at + 1]
        if b1 >= 0x80:
            raise StreamFormatError(f"XBZRLE: count longer than 2 bytes at byte {at}")
        return (b0 & 0x7F) | (b1 << 7), at + 2

    first = True
    while i < n:
        if n - i < 2:
            raise StreamFormatError(f"XBZRLE: truncated pair at byte {i}")
        zrun, i = uleb(i)
        if zrun == 0 and not first:
            raise StreamFormatError(f"XBZRLE: empty zero run at byte {i}")
        first = False
        d += zrun
        if d > size:
            raise StreamFormatError(f"XBZRLE: zero run overruns the page at byte {i}")
        if i >= n:
            break
        nzrun, i = uleb(i)
        if nzrun == 0:
            raise StreamFormatError(f"XBZRLE: empty literal run at byte {i}")
        if d + nzrun > size or i + nzrun > n:
            raise StreamFormatError(f"XBZRLE: literal run overruns at byte {i}")
        page[d:d + nzrun] = enc[i:i + nzrun]
        i += nzrun
        d += nzrun



# -- encoders ----------------------------------------------------------------

_BE64 = struct.Struct(">Q")


def encode_block_list(blocks: list[RamBlockInfo] | tuple[RamBlockInfo, ...]) -> bytes:
    """MEM_SIZE word + entries (plain: no page size, address or mapped-ram fields)."""
    total = sum(b.length for b in blocks)
    out = bytearray(_BE64.pack(total | RamFlag.MEM_SIZE))
    for b in blocks:
        name = b.name.encode("ascii")
        out += bytes([len(name)]) + name + _BE64.pack(b.length)
    return bytes(out)


def encode_eos() -> bytes:
    return _BE64.pack(RamFlag.EOS)


def encode_multifd_flush() -> bytes:
    return _BE64.pack(RamFlag.MULTIFD_FLUSH)


def encode_named_record(block: str, offset: int, flag: RamFlag) -> bytes:
    """The word and block name of a record that names its block (no CONTINUE)."""
    name = block.encode("ascii")
    return _BE64.pack(offset | flag) + bytes([len(name)]) + name


def encode_zero_records(block: str, offsets: np.ndarray, *, name_first: bool) -> bytes:
    """ZERO records for ``offsets`` (fill byte 0), built with numpy in one go.

    With ``name_first`` the first record names the block; the others CONTINUE.
    """
    n = len(offsets)
    if n == 0:
        return b""
    rec = np.zeros(n, dtype=[("word", ">u8"), ("fill", "u1")])
    rec["word"] = offsets.astype(np.uint64) | np.uint64(RamFlag.ZERO | RamFlag.CONTINUE)
    raw = rec.tobytes()
    if not name_first:
        return raw
    return encode_named_record(block, int(offsets[0]), RamFlag.ZERO) + b"\x00" + raw[9:]


def page_record_headers(offsets: np.ndarray) -> np.ndarray:
    """be64 words ``offset | PAGE | CONTINUE`` for a run of pages."""
    return (offsets.astype(np.uint64) | np.uint64(RamFlag.PAGE | RamFlag.CONTINUE)).astype(">u8")


class PageRecords:
    """PAGE records for a run of pages of one block, laid out for one vectored write.

    Every record is ``be64 offset|PAGE|CONTINUE`` + 4 KiB, except that the first
    one names its block when ``name_first`` is set (the destination has not seen
    this block since the last record or section start). The records share one
    staging array of rows ``[8-byte word | page]``; the caller fills the page
    columns (:attr:`pages`) from wherever its pages are (guest RAM, a snapshot
    file, a received packet) and writes :meth:`buffers`. When the first record
    names its block, its word is replaced by the longer named header: the
    buffers start with that header and skip row 0's word.

    This is the one encoder of main-channel PAGE records for every source
    (``send``, ``relay``, the engine).
    """

    __slots__ = ("_prefix", "_staging", "block", "count")

    def __init__(self, block: str, offsets: np.ndarray, *, name_first: bool) -> None:
        k = len(offsets)
        self.block = block
        self.count = k
        self._staging = np.empty((k, 8 + PS), dtype=np.uint8)
        self._staging[:, :8] = page_record_headers(offsets).view(np.uint8).reshape(k, 8)
        self._prefix = (encode_named_record(block, int(offsets[0]), RamFlag.PAGE)
                        if name_first and k else b"")

    @property
    def pages(self) -> np.ndarray:
        """The ``(count, 4096)`` page columns to fill (a strided view)."""
        return self._staging[:, 8:]

    def row(self, i: int) -> memoryview:
        """Page ``i``'s 4 KiB, contiguous (for ``preadv`` straight into it)."""
        return self._staging[i, 8:].data

    def buffers(self) -> list[bytes | memoryview]:
        """The records, in order, as buffers for one ``sendmsg``/``write``."""
        if not self.count:
            return []
        body = self._staging.data.cast("B")
        if self._prefix:
            return [self._prefix, body[8:]]
        return [body]

    @property
    def size(self) -> int:
        return len(self._prefix) + self.count * (8 + PS) - (8 if self._prefix else 0)
