"""Typed records produced by the main-stream decoder (and consumed by encoders).

Page payloads are never copied into these records: ``RamPages.data`` is a
numpy view into the caller's receive buffer, valid until the caller reuses
that buffer, so the I/O layer writes it out (or copies it) before reading on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from livemig.wire.constants import Command, SectionType


@dataclass(frozen=True, slots=True)
class FileHeader:
    version: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Configuration:
    """The 0x07 configuration record (machine type and validated capabilities)."""

    machine: str
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None
    target_page_bits: int | None = None
    raw: bytes = b""  # the record exactly as received, from the 0x07 byte


@dataclass(frozen=True, slots=True)
class CommandRecord:
    cmd: Command
    data: bytes
    offset: int = 0


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """START/FULL carry the identity; PART/END name it by section id only
    (the decoder fills idstr/instance/version in from the opening section)."""

    kind: SectionType
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class SectionFooter:
    section_id: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class MappedRamHeader:
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    name: str
    length: int
    page_size: int | None = None  # postcopy + hugepage blocks only
    addr: int | None = None  # x-ignore-shared only
    mapped_ram: MappedRamHeader | None = None

    @property
    def pages(self) -> int:
        return self.length // 4096


@dataclass(frozen=True, slots=True)
class RamBlockList:
    """MEM_SIZE: the source's RAM blocks, in its order."""

    total: int
    blocks: tuple[RamBlockInfo, ...]


@dataclass(slots=True)
class RamPages:
    """``len(offsets)`` raw pages for ``block``; ``data[i]`` is the page at ``offsets[i]``."""

    block: str
    offsets: np.ndarray  # uint64 byte offsets in the block
    data: np.ndarray  # (n, page_size) uint8 view into the receive buffer


@dataclass(slots=True)
class RamZeroPages:
    """ZERO records: pages filled with ``fill`` (always 0 from QEMU 10; 7.2 allows any)."""

    block: str
    offsets: np.ndarray
    fill: int = 0


@dataclass(frozen=True, slots=True)
class RamXbzrlePage:
    block: str
    offset: int
    encoded: bytes
    record_offset: int = 0  # stream offset of the record, for errors


@dataclass(frozen=True, slots=True)
class RamCompressedPage:
    """7.2's COMPRESS_PAGE: one complete zlib stream inflating to one page."""

    block: str
    offset: int
    compressed: bytes
    record_offset: int = 0


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    offset: int = 0


@dataclass(frozen=True, slots=True)
class RamEndOfSection:
    """EOS: the end of one RAM section body (a multifd sync point in legacy mode)."""

    section_kind: SectionType
    offset: int = 0


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """A complete non-RAM section, kept byte for byte (type byte to footer)."""

    header: SectionHeader
    raw: bytes
    body_offset: int  # offset of the body inside ``raw``
    body_length: int


@dataclass(frozen=True, slots=True)
class DeviceStateTail:
    """A device section begins at ``offset``, and device sections have no
    length: they can only be split with the JSON description that comes after
    EOF. The caller collects the rest of the stream and resumes the decoder
    with :meth:`MainStreamDecoder.provide_description`."""

    offset: int


@dataclass(frozen=True, slots=True)
class Seek:
    """mapped-ram: the stream continues at absolute offset ``offset``."""

    offset: int


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The EOF byte (0x00)."""

    offset: int


@dataclass(frozen=True, slots=True)
class VmDescriptionRecord:
    raw_json: bytes
    offset: int = 0


Event: TypeAlias = (
    FileHeader | Configuration | CommandRecord | SectionHeader | SectionFooter | RamBlockList
    | RamPages | RamZeroPages | RamXbzrlePage | RamCompressedPage | RamMultifdFlush
    | RamEndOfSection | DeviceSection | DeviceStateTail | Seek | EndOfStream
    | VmDescriptionRecord
)

