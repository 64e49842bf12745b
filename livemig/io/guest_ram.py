"""Guest RAM of a livemig-hosted machine: anonymous mmap blocks with numpy views.

A block is one private anonymous mapping, so that the kernel can track writes
to it (``livemig.io.dirty_kernel``) and the migration can hand slices of it
straight to ``sendmsg`` as memoryviews: pages never pass through a Python
object on their way out. ``pages`` is the same memory seen as a
``(page_count, PAGE_SIZE)`` uint8 array, the shape every bulk operation
(zero scan, copy of a run of pages, the workload's counters) wants.

The dirty bitmap here is the *software* one: code that writes guest memory
through :meth:`RamBlock.write` (or marks what it wrote with
:meth:`RamBlock.mark_dirty`) is tracked without any kernel help. Marking
happens after the write, so a page written while the migration clears its bit
is either sent after the write or marked again: never lost.
"""

from __future__ import annotations

import contextlib
import mmap

import numpy as np
import numpy.typing as npt

from livemig import limits
from livemig.errors import ConfigError

PAGE_SIZE = limits.TARGET_PAGE_SIZE
#: linux/mman.h (5.14+); Python's mmap module does not name it.
MADV_POPULATE_WRITE = 23


class RamBlock:
    """One named RAM block (``pc.ram``...), page aligned, zero filled at start."""

    def __init__(self, name: str, size: int) -> None:
        if not name or len(name.encode()) > 255:
            raise ConfigError(f"RAM block name {name!r} must be 1..255 bytes")
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError(f"RAM block {name}: size {size} is not a positive multiple of "
                              f"{PAGE_SIZE}")
        self.name = name
        self.size = size
        self.page_count = size // PAGE_SIZE
        self.mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.bytes = np.frombuffer(self.mm, dtype=np.uint8)
        self.pages = self.bytes.reshape(self.page_count, PAGE_SIZE)
        #: Software dirty bitmap, one byte per page (numpy scans bytes fastest).
        self.dirty = np.zeros(self.page_count, dtype=np.uint8)

    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Write guest memory and mark the pages it touched."""
        buf = (data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray)
               else np.frombuffer(data, dtype=np.uint8))
        n = buf.size
        if offset < 0 or offset + n > self.size:
            raise ConfigError(f"write of {n} bytes at {offset:#x} is outside block "
                              f"{self.name} ({self.size:#x} bytes)")
        self.bytes[offset:offset + n] = buf
        self.mark_dirty(offset, n)

    def mark_dirty(self, offset: int, length: int) -> None:
        if length > 0:
            self.dirty[offset // PAGE_SIZE:(offset + length - 1) // PAGE_SIZE + 1] = 1

    def take_dirty(self) -> np.ndarray:
        """Indices of pages marked since the last call, clearing their marks."""
        # a copy first: workers mark pages while we look, and numpy's nonzero()
        # must not see the array change under it
        idx = np.flatnonzero(self.dirty.copy())
        self.dirty[idx] = 0
        return idx

    def populate(self) -> None:
        """Fault every page in now (QEMU's ``-mem-prealloc``), so that pages
        arriving later are copied into memory that exists instead of each
        taking a page fault and a zeroing on the receive path."""
        try:
            self.mm.madvise(MADV_POPULATE_WRITE)
        except OSError:  # Linux < 5.14: touch one byte per page instead
            self.pages[:, 0] = self.pages[:, 0]

    def fill_random(self, seed: int) -> None:
        """Fill the block with reproducible random bytes (benchmarks, tests, demo)."""
        rng = np.random.default_rng(seed)
        step = 64 << 20
        for at in range(0, self.size, step):
            n = min(step, self.size - at)
            self.bytes[at:at + n] = np.frombuffer(rng.bytes(n), dtype=np.uint8)
        self.mark_dirty(0, self.size)

    def nonzero(self, pages: np.ndarray) -> npt.NDArray[np.bool_]:
        """Which of ``pages`` (ascending page indices) hold a non-zero byte.

        The first word of a page decides for almost every page with data; only
        pages whose first word is zero are scanned whole. A contiguous run is
        scanned in place, scattered pages through one gathered copy.
        """
        n = len(pages)
        if n == 0:
            return np.zeros(0, dtype=bool)
        first, last = int(pages[0]), int(pages[-1])
        words = self.pages.view(np.uint64)
        rows = words[first:last + 1] if last - first + 1 == n else words[pages]
        out: npt.NDArray[np.bool_] = rows[:, 0] != 0
        unsure = np.flatnonzero(~out)
        if unsure.size:
            out[unsure] = rows[unsure].any(axis=1)
        return out

    def mark_all_dirty(self) -> None:
        self.dirty[:] = 1

    def close(self) -> None:
        del self.pages, self.bytes
        self.view.release()
        # A numpy view made by a caller may still be alive; the mapping goes with it.
        with contextlib.suppress(BufferError):
            self.mm.close()

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, {self.size:#x})"
