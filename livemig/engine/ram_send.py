"""Pages out of guest RAM: over multifd packets or as main-channel records.

Every page leaves with its bytes still in guest memory: a multifd packet is
one ``sendmsg`` of its header and memoryviews of the runs of pages it
carries (compressed packets go through the channel's compressor first);
main-channel records are assembled with numpy in one staging buffer. Zero
pages are found with numpy in the sending thread and travel as zero pages
(QEMU 10's ``zero-page-detection=multifd``), never as 4 KiB of zeros.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.io.guest_ram import PAGE_SIZE, RamBlock
from livemig.migration.common.failure import FailureLatch
from livemig.migration.source.multifd_sender import MultifdSender, sendmsg_all
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import MultifdCompression, RamFlag
from livemig.wire.multifd import ChannelCompressor, encode_ram_packet, page_runs
from livemig.wire.ram import encode_named_record, encode_zero_records, page_record_headers

PS = PAGE_SIZE
_PS64 = np.uint64(PS)

#: Pages per main-channel batch (one staging buffer, one send).
MAIN_BATCH_PAGES = 256


@dataclass
class RamJob:
    block: RamBlock
    pages: np.ndarray  # ascending page indices, at most one packet's worth


class RamMultifdSender(MultifdSender):
    """Multifd channels fed with :class:`RamJob` s instead of snapshot offsets."""

    def __init__(self, sockets: list[socket.socket], compression: MultifdCompression,
                 uuid: bytes | None, latch: FailureLatch, stats: TransferStats) -> None:
        super().__init__(sockets, compression, -1, uuid, latch, stats)

    def _send_job(self, ch: int, sock: socket.socket, job: RamJob,  # type: ignore[override]
                  comp: ChannelCompressor | None, flag: int, bview: memoryview,
                  where: str) -> int:
        blk = job.block
        data = blk.nonzero(job.pages)
        normal = job.pages[data].astype(np.uint64) * _PS64
        zero = job.pages[~data].astype(np.uint64) * _PS64
        bufs: list[memoryview | bytes] = [blk.view[s:s + n] for s, n in page_runs(normal)]
        size = len(normal) * PS
        if comp is not None and bufs:
            payload = comp.compress(bufs)
            bufs, size = [payload], len(payload)
        hdr = encode_ram_packet(flags=flag, ramblock=blk.name, normal_offsets=normal,
                                zero_offsets=zero, packet_num=self._num(), payload_size=size)
        sendmsg_all(sock, [hdr, *bufs])
        self.stats.add_pages(len(normal), len(zero))
        return len(hdr) + size


def main_channel_records(blk: RamBlock, pages: np.ndarray,
                         stats: TransferStats) -> list[bytes | memoryview]:
    """PAGE and ZERO records for ``pages`` (a batch); the first of each kind names the block."""
    out: list[bytes | memoryview] = []
    data = blk.nonzero(pages)
    zero = pages[~data]
    if zero.size:
        out.append(encode_zero_records(blk.name, zero.astype(np.uint64) * _PS64,
                                       name_first=True))
    normal = pages[data]
    k = len(normal)
    if k:
        offs = normal.astype(np.uint64) * _PS64
        out.append(encode_named_record(blk.name, int(offs[0]), RamFlag.PAGE))
        out.append(blk.view[int(offs[0]):int(offs[0]) + PS])
        if k > 1:
            staging = np.empty((k - 1, 8 + PS), dtype=np.uint8)
            staging[:, :8] = page_record_headers(offs[1:]).view(np.uint8).reshape(k - 1, 8)
            staging[:, 8:] = blk.pages[normal[1:]]
            out.append(memoryview(staging).cast("B"))
    stats.add_pages(k, int(zero.size))
    return out


class RateLimiter:
    """QEMU's rate limit: a byte budget per 100 ms window (``max-bandwidth``)."""

    WINDOW = 0.1

    def __init__(self, bytes_per_second: int, latch: FailureLatch) -> None:
        self.limit = bytes_per_second
        self.latch = latch
        self.window_start = time.monotonic()
        self.used = 0
        self._wake = threading.Event()
        latch.on_failure(self._wake.set)

    def set_limit(self, bytes_per_second: int) -> None:
        self.limit = bytes_per_second

    def consume(self, n: int) -> None:
        """Account ``n`` bytes; sleep until the window ends once its budget is spent."""
        if not self.limit:
            return
        self.used += n
        budget = self.limit * self.WINDOW
        while self.used >= budget:
            now = time.monotonic()
            end = self.window_start + self.WINDOW
            if now >= end:
                self.used -= budget
                self.window_start = max(end, now - self.WINDOW)
                continue
            self._wake.wait(end - now)
            self.latch.raise_if_failed()


def packet_jobs(blk: RamBlock, pages: np.ndarray) -> list[RamJob]:
    per = limits.MULTIFD_PAGES_PER_PACKET
    return [RamJob(blk, pages[i:i + per]) for i in range(0, len(pages), per)]
