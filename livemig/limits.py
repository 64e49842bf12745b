"""Every limit on a length read from the wire, in one place.

A length from the peer is compared with these before anything is allocated,
so a hostile stream can make livemig fail, never make it allocate.
"""

#: x86's target page size; the only one livemig supports (the JSON
#: description's ``page_size`` and the mapped-ram header are checked against it).
TARGET_PAGE_SIZE = 4096

#: A counted string's length is one byte, so idstrs cannot exceed this.
MAX_IDSTR = 255

#: Machine type names are short ("pc-i440fx-10.0"); a be32 length above this
#: is garbage, not a machine.
MAX_MACHINE_NAME = 256

#: The configuration capability list: QEMU validates at most a handful.
MAX_CONFIG_CAPABILITIES = 64

#: COMMAND payloads are tiny except POSTCOPY_RAM_DISCARD; one 64 KiB frame is
#: far above anything QEMU emits in one command.
MAX_COMMAND_LEN = 65535

#: RAM blocks in one MEM_SIZE list. A pc guest has 6-10; DIMMs add one each.
MAX_RAM_BLOCKS = 4096

#: Size of one RAM block. 1 TiB is beyond any guest this tool will see; it
#: bounds the per-page state arrays (one byte per page: 256 MiB at the limit,
#: allocated lazily, and a sparse file).
MAX_RAM_BLOCK_BYTES = 1 << 40

#: Sum of all RAM blocks (the MEM_SIZE word); also bounds the per-page
#: state of all blocks together (256 MiB at the limit).
MAX_RAM_TOTAL_BYTES = 1 << 40

#: Guest RAM (all blocks of the block list together) that a destination takes by
#: default. The block list is a few hundred bytes whatever it declares, and
#: livemig sizes a sparse snapshot and per-page state (one byte per page,
#: 64 MiB at this limit) after it: without a limit below the decoder's 1 TiB, a
#: 352-byte stream made ``receive`` write a 1 TiB snapshot. 256 GiB is above the
#: guests livemig captures; ``--max-ram`` (``max_ram=``) moves it up to
#: :data:`MAX_RAM_TOTAL_BYTES`.
DEFAULT_MAX_GUEST_RAM = 256 << 30

#: Pages of a mapped-ram bitmap read, counted and turned into runs at once
#: (8 KiB of bitmap for 256 MiB of guest RAM): the temporaries of one chunk stay
#: below a few MiB however large the block, and one run list at most 32 Ki entries.
BITMAP_CHUNK_PAGES = 1 << 16

#: The vmstate JSON description: ~100 KB for a pc guest; 64 MiB leaves room for
#: machines with thousands of devices while bounding the buffer.
MAX_VMDESC_JSON = 64 << 20

#: Bytes of device sections kept in memory between the end of RAM and EOF
#: (they can only be split once the JSON arrives at the very end).
MAX_DEVICE_STATE_TAIL = 256 << 20

#: Multifd device-state bytes ``livemig receive`` keeps in a snapshot's trailer.
#: They go to disk, not memory, but no RAM block size bounds them: a source
#: that keeps sending must not fill the disk.
MAX_SNAPSHOT_DEVICE_STATE = 64 << 30

#: multifd: pages per packet is 512 KiB / page size (MULTIFD_PACKET_SIZE).
MULTIFD_PACKET_BYTES = 512 << 10
MULTIFD_PAGES_PER_PACKET = MULTIFD_PACKET_BYTES // TARGET_PAGE_SIZE

#: The 10.0 receiver refuses a compressed payload above 2 x 512 KiB.
MAX_MULTIFD_COMPRESSED_PAYLOAD = 2 * MULTIFD_PACKET_BYTES

#: multifd-channels is a u8 parameter in QEMU.
MAX_MULTIFD_CHANNELS = 255

#: The main channel's read buffer: large enough that RAM records are parsed in
#: bulk (hundreds of pages per parse call), small enough to stay in L2/L3.
MAIN_READ_BUFFER = 4 << 20

#: vhost-user: the largest payload a front-end sends or a back-end answers.
#: QEMU's biggest union member is VhostUserMemory (8 + 8 regions x 32 = 264
#: bytes) or a config access (12 + 256 bytes); 4 KiB bounds any known message
#: with room, and a u32 size above it is refused before anything is read.
MAX_VHOST_USER_PAYLOAD = 4096

#: vhost-user: file descriptors in one message. SET_MEM_TABLE carries one per
#: region and QEMU sends at most VHOST_MEMORY_BASELINE_NREGIONS = 8 of them.
MAX_VHOST_USER_FDS = 8

#: vhost-user: regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_VHOST_USER_MEM_REGIONS = 8

#: vhost-user: GET_CONFIG / SET_CONFIG access size (VHOST_USER_MAX_CONFIG_SIZE).
MAX_VHOST_USER_CONFIG = 256

#: vhost-user back-end state (SET_DEVICE_STATE_FD): the most bytes livemig's
#: own back-ends and front-end keep in memory for one device's state. QEMU
#: bounds nothing here; 256 MiB is far above a virtio-fs or net state.
MAX_VHOST_USER_DEVICE_STATE = 256 << 20
