"""QEMU's migration constants, named as QEMU names them.

Each group names the QEMU file it mirrors so a reader can check it there.
"""

from __future__ import annotations

import enum

# migration/savevm.h
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2  # obsolete; refused like QEMU does


class SectionType(enum.IntEnum):
    """Record type bytes of the main stream (migration/savevm.h QEMU_VM_*)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class Command(enum.IntEnum):
    """MIG_CMD_* sub-commands (migration/savevm.c); 11 exists since 10.0."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


#: Fixed payload lengths of commands (None = variable), as QEMU checks them.
COMMAND_LENGTHS: dict[Command, int | None] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: None,  # 0 or 16
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: None,
    Command.SWITCHOVER_START: 0,
}


class ReturnPathMessage(enum.IntEnum):
    """MIG_RP_MSG_* (migration/migration.c), destination -> source."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


class RamFlag(enum.IntFlag):
    """RAM_SAVE_FLAG_* (migration/ram.c in 7.2, migration/ram.h in 10.0).

    They live in the low bits of the be64 record word; the page offset is the
    rest (masked with the target page size).
    """

    FULL = 0x001  # obsolete since 2009: refused
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080  # RDMA only
    COMPRESS_PAGE = 0x100  # 7.2 only (removed in 9.1)
    MULTIFD_FLUSH = 0x200  # 8.0+


RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4

# migration/xbzrle.h
ENCODING_FLAG_XBZRLE = 0x1

# migration/multifd.h
MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_INIT_PACKET_SIZE = 64
MULTIFD_RAMBLOCK_FIELD = 256
MULTIFD_DEVICE_STATE_HEADER_SIZE = 276


class MultifdFlag(enum.IntFlag):
    """MULTIFD_FLAG_* (migration/multifd.h)."""

    SYNC = 0x01
    ZLIB = 0x02
    ZSTD = 0x04
    QPL = 0x08
    UADK = 0x10
    QATZIP = 0x20
    DEVICE_STATE = 0x40


#: Compression method bits: 7.2 used 3 bits (0x0E), 10.0 five (0x3E).
MULTIFD_COMPRESSION_MASK = 0x3E


class MultifdCompression(enum.Enum):
    """The `multifd-compression` parameter values livemig implements."""

    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"

    @property
    def flag(self) -> int:
        return {"none": 0, "zlib": MultifdFlag.ZLIB, "zstd": MultifdFlag.ZSTD}[self.value]


# migration/ram.c (mapped-ram)
MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HEADER_SIZE = 28
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20

#: vmstate nullptr marker (migration/vmstate-types.c VMS_NULLPTR_MARKER)
VMS_NULLPTR_MARKER = 0x30
