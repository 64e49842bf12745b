"""Snapshot files: QEMU mapped-ram files written and read with positional I/O.

Why pwrite and not an mmap of the file: a full disk must become a clean
``ENOSPC`` error naming the file, not a SIGBUS that kills the process with a
half-written snapshot; and ``pwritev`` lets the kernel allocate page cache in
bulk, which measured as fast as (or faster than) faulting an mmap in page by
page here.

The writer creates the file under a temporary name in the target's folder,
and only :meth:`SnapshotWriter.commit` (after fsync) renames it into place;
:meth:`SnapshotWriter.abort` removes it. A failed capture leaves nothing
that looks like a snapshot.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.errors import (
    ConfigError,
    MigrationError,
    StreamFormatError,
    TransportError,
    allocating,
)
from livemig.io.paths import create_part_file
from livemig.wire.constants import Command, RamFlag, SectionType
from livemig.wire.device_state_trailer import (
    FOOTER_SIZE,
    TRAILER_HEADER_SIZE,
    TrailerPacket,
    encode_trailer_footer,
    encode_trailer_header,
    scan_trailer,
)
from livemig.wire.events import Configuration, RamBlockInfo
from livemig.wire.mapped_ram import bitmap_runs, layout_ram_start, pack_bitmap, unpack_bitmap
from livemig.wire.multifd import DEVICE_STATE_HEADER_SIZE, page_runs
from livemig.wire.stream import (
    encode_command,
    encode_configuration,
    encode_file_header,
    encode_footer,
    encode_section_header,
    encode_vmdescription,
)

PS = limits.TARGET_PAGE_SIZE

#: Start writeback of what was written every this many bytes, so that the
#: final fsync finds little left to do (sync_file_range, non-blocking).
WRITEBACK_CHUNK = 64 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0),
                              ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


@dataclass
class _Block:
    info: RamBlockInfo
    pages_offset: int
    bitmap_offset: int
    present: np.ndarray  # bool per page: data valid in the file


class SnapshotWriter:
    """Builds a mapped-ram snapshot while a migration arrives."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise ConfigError(f"cannot write {path}: folder {folder} does not exist")
        self.fd, self.tmp_path = create_part_file(self.path, os.O_RDWR)
        self.blocks: dict[str, _Block] = {}
        self.configuration: Configuration | None = None
        self.ram_section_id = 0
        self._end = 0
        self._written = 0
        self._lock = threading.Lock()
        self._closed = False
        # Writeback is started by a thread of its own: sync_file_range can block
        # when the disk queue is full, and receiving must never wait for the disk.
        self._kick = threading.Event()
        self._stop_flusher = False
        self._flusher = threading.Thread(target=self._flush_loop, name="snapshot-writeback")
        self._flusher.start()
        # multifd device-state packets, spooled until the stream's end is known
        self._spool: int | None = None
        self._spool_bytes = 0
        self._spool_packets = 0

    # -- layout --------------------------------------------------------------

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None:
        if config is None:
            raise StreamFormatError("the stream has no configuration section; livemig needs "
                                    "the machine type to write a snapshot")
        self.configuration = config
        self.ram_section_id = ram_section_id
        head = encode_file_header() + encode_configuration(config.machine, ("mapped-ram",),
                                                           config.uuid)
        layout = layout_ram_start(len(head), ram_section_id, list(blocks))
        self._pwrite(head + layout.prefix, 0)
        for off, entry in layout.entries:
            self._pwrite(entry, off)
        for b in layout.blocks:
            assert b.info.mapped_ram is not None
            # one byte per page, untouched (so not resident) until a page arrives
            with allocating(f"the page bitmap of RAM block {b.info.name}", b.pages):
                present = np.zeros(b.pages, dtype=np.bool_)
            self.blocks[b.info.name] = _Block(b.info, b.header.pages_offset,
                                              b.header.bitmap_offset, present)
        self._end = layout.end
        try:
            os.ftruncate(self.fd, self._end)
        except OSError as e:
            raise TransportError(f"{self.tmp_path}: cannot size the snapshot to "
                                 f"{self._end} bytes: {e.strerror}") from e

    def _block(self, name: str) -> _Block:
        b = self.blocks.get(name)
        if b is None:
            raise StreamFormatError(f"pages for unknown RAM block {name!r}")
        return b

    # -- pages ---------------------------------------------------------------

    def _pwrite(self, data: bytes | memoryview | np.ndarray, offset: int) -> None:
        if isinstance(data, np.ndarray):
            # the array's own memoryview (numpy's stubs give ndarray a buffer only on 3.12+)
            data = data.data
        view = data.cast("B") if isinstance(data, memoryview) else data
        n = len(view)
        done = 0
        try:
            while done < n:
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise TransportError(f"writing the snapshot {self.tmp_path} at offset "
                                 f"{offset:#x} failed: {e.strerror}") from e
        self._account(n)

    def _account(self, n: int) -> None:
        with self._lock:
            before = self._written
            self._written += n
            kick = before // WRITEBACK_CHUNK != self._written // WRITEBACK_CHUNK
        if kick:
            self._kick.set()

    def _flush_loop(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stop_flusher:
                return
            _start_writeback(self.fd)

    def _stop_writeback(self) -> None:
        if self._flusher.is_alive():
            self._stop_flusher = True
            self._kick.set()
            self._flusher.join()

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        """Write ``data[i]`` (one page each) at ``offsets[i]`` of ``block``.

        Consecutive pages go out as one pwrite; ``data`` may be a strided view
        into a receive buffer (it is gathered once per run).
        """
        b = self._block(block)
        n = len(offsets)
        if n == 0:
            return
        runs = page_runs(offsets)
        i = 0
        for start, length in runs:
            k = length // PS
            run = data[i:i + k]
            if not run.flags.c_contiguous:
                run = np.ascontiguousarray(run)
            self._pwrite(run, b.pages_offset + start)
            i += k
        if len(runs) == 1:  # the common case: one run, one pwrite, a slice to mark
            first = runs[0][0] // PS
            b.present[first:first + n] = True
        else:
            b.present[(offsets // PS).astype(np.int64)] = True

    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None:
        b = self._block(block)
        self._pwrite(bytes(page), b.pages_offset + offset)
        b.present[offset // PS] = True

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        b = self._block(block)
        idx = (offsets // PS).astype(np.int64)
        if fill == 0:
            b.present[idx] = False
            return
        page = bytes([fill]) * PS
        for i in idx.tolist():  # 7.2 only, and QEMU never sends a non-zero fill itself
            self._pwrite(page, b.pages_offset + i * PS)
        b.present[idx] = True

    def read_page(self, block: str, offset: int) -> bytearray:
        b = self._block(block)
        if not b.present[offset // PS]:
            return bytearray(PS)
        return bytearray(os.pread(self.fd, PS, b.pages_offset + offset))

    def copy_mapped_ram_block(self, src_fd: int, info: RamBlockInfo) -> int:
        """Take a block from another mapped-ram file (``file:`` sources)."""
        b = self._block(info.name)
        hdr = info.mapped_ram
        assert hdr is not None
        copied = 0
        for first, chunk in bitmap_chunks(src_fd, info):
            if chunk.any():  # the rest of the bitmap stays untouched, so not resident
                b.present[first:first + len(chunk)] |= chunk
        for first, count in present_runs(src_fd, info):
            _copy_range(src_fd, hdr.pages_offset + first * PS, self.fd,
                        b.pages_offset + first * PS, count * PS)
            self._account(count * PS)
            copied += count
        return copied

    # -- device state over multifd -------------------------------------------

    def store_device_state(self, header: bytes, payload: memoryview) -> None:
        """Keep one multifd device-state packet for the trailer (callers serialize)."""
        if self._spool is None:
            self._spool = _anonymous_file(os.path.dirname(self.path))
        n = len(header) + len(payload)
        try:
            done = os.pwritev(self._spool, [header, payload], self._spool_bytes)
            if done < n:
                buf = header + bytes(payload)
                while done < n:
                    done += os.pwrite(self._spool, buf[done:], self._spool_bytes + done)
        except OSError as e:
            raise TransportError(f"keeping device state for the snapshot {self.path} "
                                 f"failed: {e.strerror}") from e
        self._spool_bytes += n
        self._spool_packets += 1

    # -- completion ----------------------------------------------------------

    def commit(self, *, device_sections: list[bytes], vmdesc_json: bytes | None,
               switchover_start: bool, switchover_at: int | None = None) -> int:
        """Write the rest of the stream and the bitmaps, fsync, rename into place.

        ``switchover_at``: how many device sections came before ``SWITCHOVER_START``
        (they stay before it: a VFIO device's precopy data must reach the device
        before its multifd stop-copy data); None puts the command before them all.
        """
        if self.configuration is None:
            raise StreamFormatError("the migration ended before its RAM block list arrived")
        sid = self.ram_section_id
        before = 0 if switchover_at is None else switchover_at
        tail = bytearray()
        tail += struct.pack(">Q", RamFlag.EOS) + encode_footer(sid)
        for raw in device_sections[:before]:
            tail += raw
        if switchover_start:
            tail += encode_command(Command.SWITCHOVER_START)
        tail += encode_section_header(SectionType.SECTION_END, sid)
        tail += struct.pack(">Q", RamFlag.EOS) + encode_footer(sid)
        for raw in device_sections[before:]:
            tail += raw
        tail.append(SectionType.EOF)
        if vmdesc_json is not None:
            tail += encode_vmdescription(vmdesc_json)
        elif self._spool is not None:
            raise StreamFormatError("the stream has multifd device state but no vmstate "
                                    "description to end it; livemig cannot place it")
        if self._spool is not None:
            tail += encode_trailer_header(self._spool_packets, self._spool_bytes)
        self._pwrite(bytes(tail), self._end)
        size = self._end + len(tail)
        if self._spool is not None:
            try:
                _copy_range(self._spool, 0, self.fd, size, self._spool_bytes)
            except OSError as e:
                raise TransportError(f"writing the device-state trailer of {self.path} "
                                     f"failed: {e.strerror}") from e
            size += self._spool_bytes
            self._close_spool()
            footer = encode_trailer_footer(self._end + len(tail) - TRAILER_HEADER_SIZE)
            self._pwrite(footer, size)
            size += len(footer)
        for b in self.blocks.values():
            self._pwrite(pack_bitmap(b.present), b.bitmap_offset)
        self._stop_writeback()
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            os.close(self.fd)
            self._closed = True
            os.rename(self.tmp_path, self.path)
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            self.abort()
            raise TransportError(f"cannot complete the snapshot {self.path}: {e.strerror}") from e
        return size

    def _close_spool(self) -> None:
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None

    def abort(self) -> None:
        self._stop_writeback()
        self._close_spool()
        if not self._closed:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self._closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


def _anonymous_file(folder: str) -> int:
    """A file with no name next to the snapshot (same disk, gone with the process)."""
    try:
        return os.open(folder, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError:
        pass
    import tempfile
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".livemig-devstate-")
    except OSError as e:
        raise TransportError(f"cannot create a spool file for device state in {folder}: "
                             f"{e.strerror}") from e
    os.unlink(name)
    return fd


def trailer_packets(fd: int, trailer: int) -> list[TrailerPacket]:
    """The packets of the device-state trailer at ``trailer`` of the open snapshot ``fd``."""
    return scan_trailer(lambda off, n: os.pread(fd, n, off), trailer,
                        os.fstat(fd).st_size - FOOTER_SIZE)


def trailer_payload(fd: int, packet: TrailerPacket, *, with_header: bool = False) -> bytes:
    """One stored packet's payload (with its multifd header if asked)."""
    start = packet.offset if with_header else packet.offset + DEVICE_STATE_HEADER_SIZE
    n = packet.offset + DEVICE_STATE_HEADER_SIZE + packet.payload_size - start
    raw = os.pread(fd, n, start)
    if len(raw) != n:
        raise StreamFormatError(f"device-state packet of {packet.idstr} is cut off by the "
                                "end of the snapshot", offset=packet.offset)
    return raw


def bitmap_chunks(fd: int, info: RamBlockInfo) -> Iterator[tuple[int, np.ndarray]]:
    """A block's bitmap as ``(first page, bool per page)`` pieces of at most
    :data:`~livemig.limits.BITMAP_CHUNK_PAGES` pages, read one piece at a time:
    the memory it takes does not grow with the block."""
    hdr = info.mapped_ram
    assert hdr is not None
    pages = info.length // PS
    step = limits.BITMAP_CHUNK_PAGES  # a multiple of 64: pieces start on a bitmap word
    for first in range(0, pages, step):
        count = min(step, pages - first)
        n = (count + 7) // 8
        at = hdr.bitmap_offset + first // 8
        raw = os.pread(fd, n, at)
        if len(raw) != n:
            raise StreamFormatError(f"mapped-ram block {info.name}: bitmap at "
                                    f"{hdr.bitmap_offset:#x} is cut off by the end of the file",
                                    offset=hdr.bitmap_offset)
        yield first, unpack_bitmap(raw, count)


def present_runs(fd: int, info: RamBlockInfo) -> Iterator[tuple[int, int]]:
    """Runs of present pages ``(first page, page count)`` of a block, from its
    bitmap read piece by piece; a run that crosses pieces comes out whole."""
    start = length = 0
    for base, chunk in bitmap_chunks(fd, info):
        for first, count in bitmap_runs(chunk):
            page = base + first
            if length and start + length == page:
                length += count
                continue
            if length:
                yield start, length
            start, length = page, count
    if length:
        yield start, length


def read_bitmap(fd: int, info: RamBlockInfo) -> np.ndarray:
    hdr = info.mapped_ram
    assert hdr is not None
    pages = info.length // PS
    from livemig.wire.ram import bitmap_bytes
    n = bitmap_bytes(pages)
    raw = os.pread(fd, n, hdr.bitmap_offset)
    if len(raw) != n:
        raise StreamFormatError(f"mapped-ram block {info.name}: bitmap at "
                                f"{hdr.bitmap_offset:#x} is cut off by the end of the file",
                                offset=hdr.bitmap_offset)
    return unpack_bitmap(raw, pages)


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, src_off, dst_off)
        except OSError:
            n = 0
        if n <= 0:  # cross-filesystem or unsupported: plain copy
            chunk = os.pread(src, min(count, 8 << 20), src_off)
            if not chunk:
                raise StreamFormatError("page data is cut off by the end of the file",
                                        offset=src_off)
            n = os.pwrite(dst, chunk, dst_off)
        src_off += n
        dst_off += n
        count -= n


def extract_block(src_path: str, blocks: dict[str, RamBlockInfo], name: str,
                  out_path: str) -> int:
    """Write one block of a mapped-ram file as a raw image (holes for zero pages)."""
    info = blocks.get(name)
    if info is None:
        raise ConfigError(f"no RAM block {name!r} in {src_path} (blocks: "
                          f"{', '.join(blocks)})")
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # 0600 like the snapshot: the image holds the same guest memory
        dst, tmp = create_part_file(out_path, os.O_WRONLY)
    except BaseException:
        os.close(src)
        raise
    try:
        hdr = info.mapped_ram
        assert hdr is not None
        for first, count in present_runs(src, info):
            _copy_range(src, hdr.pages_offset + first * PS, dst, first * PS, count * PS)
        os.ftruncate(dst, info.length)
        os.fsync(dst)
        os.close(dst)
        dst = -1
        os.rename(tmp, out_path)
    except BaseException:
        if dst >= 0:
            os.close(dst)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(src)
    return info.length


__all__ = ["MigrationError", "SnapshotWriter", "bitmap_chunks", "extract_block",
           "present_runs", "read_bitmap",
           "trailer_packets", "trailer_payload"]
