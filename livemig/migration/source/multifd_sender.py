"""The source side of multifd: one thread per channel, fed with page jobs.

A job is at most one packet's worth of pages (128 x 4 KiB) of one block.
The channel thread reads the pages from the snapshot with one ``preadv``,
compresses them if asked, and sends header and payload with one
``sendmsg``. ``sync()`` puts a SYNC packet on every channel and waits until
each has been written, which is what QEMU's destination pairs with the
main stream's sync marker.
"""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
from dataclasses import dataclass

import numpy as np

from livemig import limits
from livemig.errors import ChannelError, MigrationError
from livemig.migration.source.device_state_packets import OutgoingDeviceStatePacket
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import MultifdCompression
from livemig.wire.multifd import (
    ChannelCompressor,
    InitPacket,
    encode_ram_packet,
    encode_sync_packet,
    make_compressor,
    page_runs,
)

PS = limits.TARGET_PAGE_SIZE

#: Jobs queued per channel: enough to keep the socket busy while the main
#: thread prepares the next ones, small enough to bound memory (jobs hold no
#: page data, only offsets).
CHANNEL_QUEUE_DEPTH = 8


@dataclass
class PageJob:
    block: str
    offsets: np.ndarray  # uint64 offsets in the block, ascending
    file_offset: int  # where offset 0 of the block is in the snapshot


_SYNC = object()
_STOP = object()


def sendmsg_all(sock: socket.socket, buffers: list) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _sendfile_all(sock: socket.socket, fd: int, offset: int, count: int, where: str,
                  block: str) -> None:
    while count:
        n = os.sendfile(sock.fileno(), fd, offset, count)
        if n == 0:
            raise ChannelError(f"{where}: snapshot ends inside block {block}")
        offset += n
        count -= n


class MultifdSender:
    def __init__(self, sockets: list[socket.socket], compression: MultifdCompression,
                 snapshot_fd: int, uuid: bytes | None, latch: FailureLatch,
                 stats: TransferStats) -> None:
        self.sockets = sockets
        self.n = len(sockets)
        self.compression = compression
        self.fd = snapshot_fd  # -1 when pages come from elsewhere
        self.uuid = uuid or bytes(16)
        self.latch = latch
        self.stats = stats
        self.packet_num = itertools.count()
        self._num_lock = threading.Lock()
        self.queues: list[queue.Queue] = [queue.Queue(CHANNEL_QUEUE_DEPTH)
                                          for _ in range(self.n)]
        self.synced = threading.Semaphore(0)
        self._next = 0
        stats.multifd_bytes = [0] * self.n
        for s in sockets:
            latch.add_socket(s)
        latch.on_failure(self._drain)
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"multifd-send-{i}")
                        for i in range(self.n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _num(self) -> int:
        with self._num_lock:
            return next(self.packet_num)

    def _put(self, i: int, item: object) -> None:
        while True:
            self.latch.raise_if_failed()
            try:
                self.queues[i].put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def queue_pages(self, job: PageJob | OutgoingDeviceStatePacket) -> None:
        """Queue one packet's pages (or one device-state packet) on the next channel."""
        i = self._next
        self._next = (i + 1) % self.n
        self._put(i, job)

    def sync(self) -> None:
        for i in range(self.n):
            self._put(i, _SYNC)
        for _ in range(self.n):
            while not self.synced.acquire(timeout=0.5):
                self.latch.raise_if_failed()
        self.latch.raise_if_failed()

    def finish(self) -> None:
        for i in range(self.n):
            self._put(i, _STOP)
        self.join()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def _drain(self) -> None:
        for q in self.queues:
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            try:
                q.put_nowait(_STOP)
            except queue.Full:
                pass
        for _ in range(self.n):
            self.synced.release()

    def _run(self, ch: int) -> None:
        where = f"multifd channel {ch}"
        try:
            self._channel(ch, where)
        except OSError as e:
            self.latch.fail(ChannelError(f"{where}: send failed: {e.strerror or e} (did the "
                                         "destination close the connection?)"))
        except MigrationError as e:
            self.latch.fail(e)
        except Exception as e:
            self.latch.fail(e)

    def _channel(self, ch: int, where: str) -> None:
        sock = self.sockets[ch]
        sock.sendall(InitPacket(self.uuid, ch).encode())
        sent = 64
        bounce = bytearray(limits.MULTIFD_PACKET_BYTES)
        bview = memoryview(bounce)
        comp = None
        if self.compression is not MultifdCompression.NONE:
            comp = make_compressor(self.compression)
        flag = int(self.compression.flag)
        q = self.queues[ch]
        while True:
            item = q.get()
            if item is _STOP or self.latch.failed:
                return
            if item is _SYNC:
                hdr = encode_sync_packet(self._num())
                sock.sendall(hdr)
                sent += len(hdr)
                self.stats.multifd_bytes[ch] = sent
                self.synced.release()
                continue
            if isinstance(item, OutgoingDeviceStatePacket):
                sendmsg_all(sock, list(item.buffers))
                sent += item.size
            else:
                sent += self._send_job(ch, sock, item, comp, flag, bview, where)
            self.stats.multifd_bytes[ch] = sent

    def _send_job(self, ch: int, sock: socket.socket, job: PageJob,
                  comp: ChannelCompressor | None, flag: int, bview: memoryview,
                  where: str) -> int:
        """Send one packet for ``job``; returns the bytes written. Subclasses send
        pages from elsewhere (guest RAM) with the same channel machinery."""
        n = len(job.offsets)
        runs = page_runs(job.offsets)
        if comp is None:
            # header from memory, pages from the page cache to the socket with
            # sendfile: no copy through Python at all
            hdr = encode_ram_packet(flags=flag, ramblock=job.block,
                                    normal_offsets=job.offsets, zero_offsets=None,
                                    packet_num=self._num(), payload_size=n * PS)
            sock.sendall(hdr)
            for start, length in runs:
                _sendfile_all(sock, self.fd, job.file_offset + start, length, where,
                              job.block)
            self.stats.add_pages(n)
            return len(hdr) + n * PS
        pos = 0
        for start, want in runs:
            got = os.preadv(self.fd, [bview[pos:pos + want]], job.file_offset + start)
            if got != want:
                raise ChannelError(f"{where}: snapshot ends inside block {job.block}")
            pos += want
        payload = comp.compress([bview[:n * PS]])
        hdr = encode_ram_packet(flags=flag, ramblock=job.block, normal_offsets=job.offsets,
                                zero_offsets=None, packet_num=self._num(),
                                payload_size=len(payload))
        sendmsg_all(sock, [hdr, payload])
        self.stats.add_pages(n)
        return len(hdr) + len(payload)
