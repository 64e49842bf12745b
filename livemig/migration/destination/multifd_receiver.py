"""The destination side of multifd: one thread per channel, and the sync barrier.

Each channel thread reads its initial packet, then packets until the source
closes the channel, moving pages from the socket into the snapshot with one
receive and one positional write per packet (a compressed packet is inflated
in between; zlib and zstd release the GIL, so channels inflate in parallel).

The barrier is what keeps an old copy of a page from winning: a channel that
reads a SYNC packet stops until the main stream reaches the matching sync
marker and every channel has reached its SYNC (spec/ram.md §6.1).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from livemig import limits
from livemig.errors import ChannelError, MigrationError, StreamFormatError, TruncatedStream
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import MultifdCompression
from livemig.wire.multifd import (
    COMMON_HEADER_SIZE,
    INIT_PACKET_SIZE,
    RAM_HEADER_SIZE,
    decode_device_state_header,
    decode_init_packet,
    decode_ram_packet,
    is_device_state,
    make_decompressor,
    packet_header_size,
    peek_common_header,
)

PS = limits.TARGET_PAGE_SIZE

#: How long the main stream waits at a sync point for the channels. QEMU
#: sends a SYNC on every channel right before the marker; minutes of silence
#: mean a dead or mismatched source.
SYNC_TIMEOUT = 600.0


class PageSink(Protocol):
    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None: ...
    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None: ...


class SyncBarrier:
    def __init__(self, channels: int, latch: FailureLatch) -> None:
        self.n = channels
        self.latch = latch
        self.cond = threading.Condition()
        self.arrived = 0
        self.generation = 0
        self.ended: set[int] = set()
        self.released_all = False
        latch.on_failure(self._wake)

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def channel_reached(self) -> None:
        with self.cond:
            self.arrived += 1
            gen = self.generation
            self.cond.notify_all()
            while self.generation == gen and not self.latch.failed and not self.released_all:
                self.cond.wait()
        self.latch.raise_if_failed()

    def channel_ended(self, channel: int) -> bool:
        """Record that ``channel`` ended; True for the last one to end."""
        with self.cond:
            self.ended.add(channel)
            self.cond.notify_all()
            return len(self.ended) == self.n

    def main_sync(self, where: str, main_alive: Callable[[], bool] | None = None) -> None:
        """Wait until every channel reached its SYNC, then release them all.

        ``main_alive`` is polled while waiting: a source that hangs up its main
        channel at a sync point must not keep us waiting for the channels.
        """
        deadline = time.monotonic() + SYNC_TIMEOUT
        with self.cond:
            while True:
                ok = self.cond.wait_for(
                    lambda: self.arrived >= self.n or self.latch.failed
                    or len(self.ended) + self.arrived >= self.n and bool(self.ended),
                    timeout=0.25)
                if ok or time.monotonic() > deadline:
                    break
                if main_alive is not None and not main_alive():
                    raise TruncatedStream(f"the source closed the {where} while the multifd "
                                          f"channels were at a sync point ({self.arrived} of "
                                          f"{self.n} had reached it)")
            self.latch.raise_if_failed()
            if not ok:
                raise ChannelError(f"{where}: multifd channels did not reach the sync point in "
                                   f"{SYNC_TIMEOUT:.0f} s ({self.arrived} of {self.n} did)")
            if self.arrived < self.n:
                raise ChannelError(f"{where}: multifd channel(s) "
                                   f"{', '.join(map(str, sorted(self.ended)))} closed before "
                                   "the sync point")
            self.arrived -= self.n
            self.generation += 1
            self.cond.notify_all()

    def release_all(self) -> None:
        with self.cond:
            self.released_all = True
            self.cond.notify_all()


def _recv_exact(sock: socket.socket, view: memoryview, what: str,
                *, eof_ok: bool = False) -> bool:
    """Fill ``view`` from ``sock``; errors name ``what`` (the caller adds the channel)."""
    got = 0
    n = len(view)
    while got < n:
        try:
            r = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        except OSError as e:
            raise ChannelError(f"receive failed in {what}: {e}") from e
        if r == 0:
            if got == 0 and eof_ok:
                return False
            raise TruncatedStream(f"the source closed the channel in the middle of "
                                  f"{what} ({got} of {n} bytes)")
        got += r
    return True


def _recv_exact_views(sock: socket.socket, views: list[memoryview], what: str) -> None:
    """Fill every view in order from ``sock`` with ``recvmsg_into`` (one syscall for
    all of them when the data is there): pages go straight to their place."""
    total = sum(len(v) for v in views)
    got = 0
    while views:
        try:
            r = sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
        except OSError as e:
            raise ChannelError(f"receive failed in {what}: {e}") from e
        if r == 0:
            raise TruncatedStream(f"the source closed the channel in the middle of "
                                  f"{what} ({got} of {total} bytes)")
        got += r
        while r:
            if r >= len(views[0]):
                r -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][r:]
                r = 0


class MultifdReceiver:
    """Owns the channel threads; :meth:`join` re-raises nothing (the latch does)."""

    def __init__(self, sockets: list[socket.socket], compression: MultifdCompression,
                 sink: PageSink, latch: FailureLatch, stats: TransferStats) -> None:
        self.sockets = sockets
        self.n = len(sockets)
        self.compression = compression
        self.sink = sink
        self.latch = latch
        self.stats = stats
        self.barrier = SyncBarrier(self.n, latch)
        self.block_sizes: dict[str, int] = {}
        self.layout_ready = threading.Event()
        #: Where device-state packets go: ``(idstr, instance_id, payload, channel)``.
        #: None refuses them.
        self.on_device_state: Callable[[str, int, memoryview, int], None] | None = None
        #: Called once, from the last channel thread to end: no more packets will come.
        self.on_channels_ended: Callable[[], None] | None = None
        self.finishing = False
        self._ids: dict[int, int] = {}
        self._uuid: bytes | None = None
        self._first_init = threading.Event()
        latch.on_failure(self._first_init.set)
        self._ids_lock = threading.Lock()
        self.stats.multifd_bytes = [0] * self.n
        latch.on_failure(self.layout_ready.set)
        for s in sockets:
            latch.add_socket(s)
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"multifd-recv-{i}")
                        for i in range(self.n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def source_uuid(self, timeout: float = 30.0) -> bytes | None:
        """The uuid the source put in its initial packets (its ``-uuid``)."""
        self._first_init.wait(timeout)
        return self._uuid

    def set_blocks(self, sizes: dict[str, int]) -> None:
        self.block_sizes = dict(sizes)
        self.layout_ready.set()

    def finish(self) -> None:
        """The main stream is complete: end the channels and join them."""
        self.finishing = True
        self.barrier.release_all()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join()

    def join(self) -> None:
        for t in self.threads:
            t.join()
        for s in self.sockets:
            s.close()

    def _run(self, conn_index: int) -> None:
        where = f"multifd connection {conn_index}"
        try:
            self._channel(conn_index, where)
        except MigrationError as e:
            if not self.finishing:
                self.latch.fail(e)
        except Exception as e:  # a bug must still end the migration, with its cause
            self.latch.fail(e)
        finally:
            last = self.barrier.channel_ended(conn_index)
            if last and self.on_channels_ended is not None:
                self.on_channels_ended()

    def _channel(self, conn_index: int, where: str) -> None:
        sock = self.sockets[conn_index]
        init = bytearray(INIT_PACKET_SIZE)
        try:
            _recv_exact(sock, memoryview(init), "the initial packet")
            pkt = decode_init_packet(init, channels=self.n)
        except StreamFormatError as e:
            raise e.locate(where)
        except ChannelError as e:
            raise ChannelError(f"{where}: {e}") from e.__cause__
        with self._ids_lock:
            if pkt.channel_id in self._ids:
                raise StreamFormatError(f"channel id {pkt.channel_id} used twice (by multifd "
                                        f"connection {self._ids[pkt.channel_id]} too)",
                                        offset=24).locate(where)
            self._ids[pkt.channel_id] = conn_index
            if self._uuid is None:
                self._uuid = pkt.uuid
            self._first_init.set()
        ch = pkt.channel_id
        where = f"multifd channel {ch}"
        self.layout_ready.wait()
        self.latch.raise_if_failed()
        decomp = make_decompressor(self.compression)
        header = bytearray(RAM_HEADER_SIZE)
        hview = memoryview(header)
        bounce = bytearray(limits.MULTIFD_PACKET_BYTES)
        bview = memoryview(bounce)
        cbuf = bytearray(limits.MAX_MULTIFD_COMPRESSED_PAYLOAD)
        cview = memoryview(cbuf)
        pages = np.frombuffer(bounce, dtype=np.uint8).reshape(-1, PS)
        direct = (getattr(self.sink, "page_views", None)
                  if self.compression is MultifdCompression.NONE else None)
        offset = INIT_PACKET_SIZE
        index = 0
        nbytes = INIT_PACKET_SIZE
        while True:
            try:
                if not _recv_exact(sock, hview[:COMMON_HEADER_SIZE], f"packet {index}'s header",
                                   eof_ok=True):
                    return
                size = packet_header_size(header, packet_index=index)
                if is_device_state(peek_common_header(header)[2]):
                    _recv_exact(sock, hview[COMMON_HEADER_SIZE:size],
                                f"packet {index}'s header")
                    dev = decode_device_state_header(header, packet_index=index)
                    if self.on_device_state is None:
                        raise StreamFormatError(
                            f"packet {index}: device-state packet for {dev.idstr} instance "
                            f"{dev.instance_id}, but this destination takes no device state "
                            "over multifd", offset=0)
                    payload = bytearray(dev.payload_size)
                    _recv_exact(sock, memoryview(payload), f"packet {index}'s device state")
                    self.on_device_state(dev.idstr, dev.instance_id, memoryview(payload), ch)
                    nbytes += size + dev.payload_size
                    offset = nbytes
                    self.stats.multifd_bytes[conn_index] = nbytes
                    index += 1
                    continue
                _recv_exact(sock, hview[COMMON_HEADER_SIZE:size], f"packet {index}'s header")
                pkt_ = decode_ram_packet(header, compression=self.compression,
                                         block_sizes=self.block_sizes, packet_index=index)
                n = pkt_.normal_pages
                if n:
                    psize = pkt_.payload_size
                    views = direct(pkt_.ramblock, pkt_.normal) if direct else None
                    if views is not None:
                        # a sink that is memory takes the pages in place: one copy
                        _recv_exact_views(sock, views, f"packet {index}'s pages")
                        data = None
                    elif self.compression is MultifdCompression.NONE:
                        _recv_exact(sock, bview[:n * PS], f"packet {index}'s pages")
                        data = pages[:n]
                    else:
                        _recv_exact(sock, cview[:psize], f"packet {index}'s payload")
                        out = decomp.decompress(cview[:psize], n * PS)
                        data = np.frombuffer(out, dtype=np.uint8).reshape(n, PS)
                    if data is not None:
                        self.sink.write_pages(pkt_.ramblock, pkt_.normal, data)
                    nbytes += psize
                if pkt_.zero_pages:
                    self.sink.zero_pages(pkt_.ramblock, pkt_.zero)
                self.stats.add_pages(n, pkt_.zero_pages)
            except StreamFormatError as e:
                if e.offset is None and "packet" not in e.message:
                    e.message = f"packet {index}: {e.message}"
                    e.args = (e.message,)
                raise e.locate(where, offset, record_offset=offset)
            except ChannelError as e:
                raise ChannelError(f"{where}, offset {offset:#x}: {e}") from e.__cause__
            nbytes += size
            offset = nbytes
            self.stats.multifd_bytes[conn_index] = nbytes
            index += 1
            if pkt_.is_sync:
                self.barrier.channel_reached()
