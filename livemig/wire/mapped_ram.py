"""The mapped-ram file layout (QEMU 9.0+ ``mapped-ram`` capability).

A mapped-ram file is a normal migration stream whose RAM block list is
followed, per block, by a 28-byte header and a region of the file laid out
as: bitmap (host ``unsigned long`` words, little-endian on x86_64), a gap to
the next 1 MiB boundary, then every page of the block at ``pages_offset +
page_offset``. This module computes that layout and encodes the headers; the
I/O layer writes pages at the offsets it gives.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.wire.constants import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    MAPPED_RAM_HEADER_SIZE,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
    RamFlag,
    SectionType,
)
from livemig.wire.events import MappedRamHeader, RamBlockInfo
from livemig.wire.ram import bitmap_bytes
from livemig.wire.stream import encode_section_header

PS = limits.TARGET_PAGE_SIZE
_HDR = struct.Struct(">IQQQ")


def encode_mapped_ram_header(h: MappedRamHeader) -> bytes:
    return _HDR.pack(h.version, h.page_size, h.bitmap_offset, h.pages_offset)


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class BlockLayout:
    info: RamBlockInfo
    entry_offset: int  # where the block's MEM_SIZE entry starts
    header: MappedRamHeader

    @property
    def pages(self) -> int:
        return self.info.length // PS

    @property
    def end(self) -> int:
        return self.header.pages_offset + self.info.length


@dataclass(frozen=True)
class RamStartLayout:
    """Where everything of the RAM START section goes in the file.

    ``prefix`` is the bytes from ``start`` up to the first block entry
    (section header and MEM_SIZE word); ``entries`` are (offset, bytes) pairs
    to write; ``end`` is where the stream continues after the last page area.
    """

    start: int
    prefix: bytes
    blocks: tuple[BlockLayout, ...]
    entries: tuple[tuple[int, bytes], ...]
    end: int


def layout_ram_start(start: int, section_id: int, blocks: list[RamBlockInfo],
                     alignment: int = MAPPED_RAM_FILE_OFFSET_ALIGNMENT) -> RamStartLayout:
    """Lay out ``START ram`` + MEM_SIZE list + page areas from file offset ``start``."""
    total = sum(b.length for b in blocks)
    prefix = (encode_section_header(SectionType.SECTION_START, section_id, RAM_SECTION_IDSTR, 0,
                                    RAM_SECTION_VERSION)
              + struct.pack(">Q", total | RamFlag.MEM_SIZE))
    pos = start + len(prefix)
    out_blocks = []
    entries = []
    for b in blocks:
        name = b.name.encode("ascii")
        entry = bytes([len(name)]) + name + struct.pack(">Q", b.length)
        bitmap_offset = pos + len(entry) + MAPPED_RAM_HEADER_SIZE
        pages_offset = _align_up(bitmap_offset + bitmap_bytes(b.length // PS), alignment)
        hdr = MappedRamHeader(MAPPED_RAM_HDR_VERSION, PS, bitmap_offset, pages_offset)
        entries.append((pos, entry + encode_mapped_ram_header(hdr)))
        info = RamBlockInfo(b.name, b.length, None, None, hdr)
        out_blocks.append(BlockLayout(info, pos, hdr))
        pos = pages_offset + b.length
    return RamStartLayout(start, prefix, tuple(out_blocks), tuple(entries), pos)


def pack_bitmap(present: np.ndarray) -> bytes:
    """Bool-per-page array -> the file's bitmap (LSB-first bytes = LE u64 words)."""
    raw = np.packbits(present.astype(np.bool_, copy=False), bitorder="little").tobytes()
    return raw + b"\x00" * (bitmap_bytes(len(present)) - len(raw))


def unpack_bitmap(raw: bytes | memoryview, pages: int) -> np.ndarray:
    """The file's bitmap -> bool per page (bits past ``pages`` are ignored)."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return bits[:pages].astype(np.bool_)


def bitmap_runs(present: np.ndarray) -> list[tuple[int, int]]:
    """Runs of set bits as (first page, page count), found with numpy."""
    if not present.size:
        return []
    p = np.concatenate(([False], present, [False])).astype(np.int8)
    d = np.diff(p)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]
