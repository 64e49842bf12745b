"""The destination side of multifd: one thread per channel, and the sync barrier.

Each channel thread reads its initial packet, then packets until the source
closes the channel, moving pages from the socket into the snapshot with one
receive and one positional write per packet (a compressed packet is inflated
in between; zlib and zstd release the GIL, so channels inflate in parallel).

The barrier is what keeps an old copy of a page from winning: a channel that
reads a SYNC packet stops until the main stream reaches the matching sync
marker and every channel has reached its SYNC (spec/ram.md §6.1).

Each channel follows the table of :mod:`livemig.wire.multifd_channel`
(HANDSHAKE -> AWAIT_LAYOUT -> PACKETS <-> AT_SYNC -> ENDED): the thread tells
it what arrived and an input the table does not allow is a
:class:`~livemig.errors.StreamFormatError` naming the channel and the packet.

Threads: one per channel, in the owner's
:class:`~livemig.migration.common.thread_group.ThreadGroup` (or the receiver's
own). Nothing waits by polling: a channel blocked in ``recv`` is woken by its
socket being shut down (the latch on failure, :meth:`MultifdReceiver.finish`
at the end), one waiting for the block list or at the barrier by an event or
condition, and the main thread at a sync point by an eventfd together with
the main socket's hang-up (``POLLRDHUP``).
"""

from __future__ import annotations

import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from livemig import limits
from livemig.errors import ChannelError, MigrationError, StreamFormatError, TruncatedStream
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.common.thread_group import ThreadGroup
from livemig.migration.destination.sinks import PageViewSink
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
from livemig.wire.multifd_channel import ChannelInput, ChannelState, RecvChannel

PS = limits.TARGET_PAGE_SIZE

#: How long the main stream waits at a sync point for the channels. QEMU
#: sends a SYNC on every channel right before the marker; minutes of silence
#: mean a dead or mismatched source.
SYNC_TIMEOUT = 600.0

#: How long the main stream still waits at a sync point once the source has
#: closed its main channel. That alone is no failure: a source without a return
#: path closes it right after the last byte, and the channels' SYNC packets, sent
#: before the marker, may still be on their way (or being read behind a large
#: packet). Channels that have not arrived by then never will.
MAIN_HANGUP_GRACE = 1.0


class PageSink(Protocol):
    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None: ...
    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None: ...


@runtime_checkable
class MainChannelWatch(Protocol):
    """The main channel as the barrier watches it while the main stream waits at a
    sync point: the socket to poll for the peer's hang-up, and whether the peer is
    still there (:class:`~livemig.io.channels.SocketSource` is one)."""

    def fileno(self) -> int: ...
    def alive(self) -> bool: ...


class SyncBarrier:
    """Where the channels and the main stream meet at each sync point.

    Channel threads wait on a condition; the main thread waits in :meth:`main_sync`
    on an eventfd (written with every change it waits for, and on failure) together
    with the main socket (``POLLRDHUP``), so a source that hangs up its main channel
    at a sync point wakes it at once instead of being found by polling.
    """

    def __init__(self, channels: int, latch: FailureLatch) -> None:
        self.n = channels
        self.latch = latch
        self.cond = threading.Condition()
        self.arrived = 0
        self.generation = 0
        self.ended: set[int] = set()
        self.released_all = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        latch.on_failure(self._wake)

    def _notify_locked(self) -> None:
        self.cond.notify_all()
        if not self._closed:
            os.eventfd_write(self._wake_fd, 1)

    def _wake(self) -> None:
        with self.cond:
            self._notify_locked()

    def channel_reached(self) -> None:
        with self.cond:
            self.arrived += 1
            gen = self.generation
            self._notify_locked()
            while self.generation == gen and not self.latch.failed and not self.released_all:
                self.cond.wait()
        self.latch.raise_if_failed()

    def channel_ended(self, channel: int) -> bool:
        """Record that ``channel`` ended; True for the last one to end."""
        with self.cond:
            self.ended.add(channel)
            self._notify_locked()
            return len(self.ended) == self.n

    def _settled_locked(self) -> bool:
        """Every channel is at the sync point or has ended (one at least), or failure."""
        return (self.arrived >= self.n or self.latch.failed
                or (bool(self.ended) and len(self.ended) + self.arrived >= self.n))

    def main_sync(self, where: str, main: MainChannelWatch | None = None) -> None:
        """Wait until every channel reached its SYNC, then release them all.

        With ``main``, a source that hangs up its main channel while we wait (and
        left nothing unread on it) ends the wait with
        :class:`~livemig.errors.TruncatedStream` once :data:`MAIN_HANGUP_GRACE` has
        passed without the channels: its channels would never come.
        """
        deadline = time.monotonic() + SYNC_TIMEOUT
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        main_fd = main.fileno() if main is not None else -1
        if main_fd >= 0:
            poller.register(main_fd, select.POLLRDHUP)
        hung_up: float | None = None
        while True:
            with self.cond:
                if self._settled_locked():
                    break
            now = time.monotonic()
            if hung_up is not None and now >= hung_up + MAIN_HANGUP_GRACE:
                raise TruncatedStream(
                    f"the source closed the {where} while the multifd channels were at a "
                    f"sync point ({self.arrived} of {self.n} had reached it)")
            until = deadline if hung_up is None else min(deadline, hung_up + MAIN_HANGUP_GRACE)
            if now >= deadline:
                break
            for fd, _ in poller.poll(math.ceil((until - now) * 1000)):
                if fd == self._wake_fd:
                    _drain_eventfd(fd)
                elif not self.latch.failed:  # (a failure shuts the socket down: not a hang-up)
                    assert main is not None
                    if not main.alive():
                        hung_up = time.monotonic()
                    # Either way nothing changes on this socket until the main thread
                    # reads it (a source that closed after sending more is not gone).
                    poller.unregister(main_fd)
        with self.cond:
            self.latch.raise_if_failed()
            if not self._settled_locked():
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
            self._notify_locked()

    def close(self) -> None:
        """Free the eventfd (after the main stream and the channels are done with it)."""
        with self.cond:
            if not self._closed:
                self._closed = True
                os.close(self._wake_fd)


def _drain_eventfd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


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


#: ``on_device_state(idstr, instance_id, payload, channel)``: one device-state packet.
DeviceStateCallback = Callable[[str, int, memoryview, int], None]


class MultifdReceiver:
    """Owns the channel threads; :meth:`join` re-raises nothing (the latch does).

    ``on_device_state`` takes the device-state packets (None refuses them);
    ``on_channels_ended`` is called once, from the last channel thread to end. Both
    may also still be set as attributes before the channels see the RAM block list
    (the way older callers do it). The threads run in ``group`` (an owner's
    :class:`~livemig.migration.common.thread_group.ThreadGroup` sharing ``latch``),
    or in a group of the receiver's own.
    """

    def __init__(self, sockets: list[socket.socket], compression: MultifdCompression,
                 sink: PageSink, latch: FailureLatch, stats: TransferStats, *,
                 on_device_state: DeviceStateCallback | None = None,
                 on_channels_ended: Callable[[], None] | None = None,
                 group: ThreadGroup | None = None) -> None:
        self.sockets = sockets
        self.n = len(sockets)
        self.compression = compression
        self.sink = sink
        self.latch = latch
        self.stats = stats
        self.group = group if group is not None else ThreadGroup("multifd-recv", latch)
        self.barrier = SyncBarrier(self.n, latch)
        self.block_sizes: dict[str, int] = {}
        self.layout_ready = threading.Event()
        #: Where device-state packets go: ``(idstr, instance_id, payload, channel)``.
        #: None refuses them.
        self.on_device_state: DeviceStateCallback | None = on_device_state
        #: Called once, from the last channel thread to end: no more packets will come.
        self.on_channels_ended: Callable[[], None] | None = on_channels_ended
        self.finishing = False
        #: One state table per connection, in accept order.
        self.channels = [RecvChannel(i) for i in range(self.n)]
        self.threads: list[threading.Thread] = []
        self._ids: dict[int, int] = {}
        self._uuid: bytes | None = None
        self._first_init = threading.Event()
        latch.on_failure(self._first_init.set)
        self._ids_lock = threading.Lock()
        self.stats.multifd_bytes = [0] * self.n
        latch.on_failure(self.layout_ready.set)
        for s in sockets:
            latch.add_socket(s)

    def start(self) -> None:
        for i in range(self.n):
            self.threads.append(self.group.start(self._run, i, name=f"multifd-recv-{i}"))

    def source_uuid(self, timeout: float = 30.0) -> bytes | None:
        """The uuid the source put in its initial packets (its ``-uuid``)."""
        self._first_init.wait(timeout)
        return self._uuid

    def set_blocks(self, sizes: dict[str, int]) -> None:
        self.block_sizes = dict(sizes)
        self.layout_ready.set()

    def channel_states(self) -> list[ChannelState]:
        return [c.state for c in self.channels]

    def finish(self) -> None:
        """The main stream is complete (or the migration failed): end the channels and
        join them. Errors the channels meet from here on are not failures."""
        self.finishing = True
        self.barrier.release_all()
        self.layout_ready.set()  # a channel may still wait for a block list that never came
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join()

    def abort(self) -> None:
        """After ``latch.fail``: end and join the channel threads."""
        self.finish()

    def join(self) -> None:
        """Wait for the channel threads (woken by :meth:`finish` or the latch), then close
        the sockets."""
        for t in self.threads:
            t.join()
        for s in self.sockets:
            s.close()
        self.barrier.close()

    def _run(self, conn_index: int) -> None:
        where = f"multifd connection {conn_index}"
        try:
            self._channel(conn_index, where)
        except MigrationError as e:
            if not self.finishing:
                self.latch.fail(e)
        except Exception as e:
            self.latch.fail(e)
        finally:
            self.channels[conn_index].close()
            last = self.barrier.channel_ended(conn_index)
            if last and self.on_channels_ended is not None:
                self.on_channels_ended()

    def _channel(self, conn_index: int, where: str) -> None:
        sock = self.sockets[conn_index]
        chan = self.channels[conn_index]
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
        chan.receive(ChannelInput.INIT_PACKET, channel_id=pkt.channel_id)
        ch = pkt.channel_id
        where = chan.where
        self.layout_ready.wait()
        self.latch.raise_if_failed()
        if self.finishing:
            return
        chan.receive(ChannelInput.LAYOUT)
        decomp = make_decompressor(self.compression)
        header = bytearray(RAM_HEADER_SIZE)
        hview = memoryview(header)
        bounce = bytearray(limits.MULTIFD_PACKET_BYTES)
        bview = memoryview(bounce)
        cbuf = bytearray(limits.MAX_MULTIFD_COMPRESSED_PAYLOAD)
        cview = memoryview(cbuf)
        pages = np.frombuffer(bounce, dtype=np.uint8).reshape(-1, PS)
        direct = (self.sink.page_views
                  if self.compression is MultifdCompression.NONE
                  and isinstance(self.sink, PageViewSink) else None)
        offset = INIT_PACKET_SIZE
        nbytes = INIT_PACKET_SIZE
        while True:
            index = chan.packets
            try:
                if not _recv_exact(sock, hview[:COMMON_HEADER_SIZE], f"packet {index}'s header",
                                   eof_ok=True):
                    chan.receive(ChannelInput.SOURCE_CLOSED)
                    return
                size = packet_header_size(header, packet_index=index)
                if is_device_state(peek_common_header(header)[2]):
                    _recv_exact(sock, hview[COMMON_HEADER_SIZE:size],
                                f"packet {index}'s header")
                    dev = decode_device_state_header(header, packet_index=index)
                    on_device_state = self.on_device_state
                    if on_device_state is None:
                        raise StreamFormatError(
                            f"packet {index}: device-state packet for {dev.idstr} instance "
                            f"{dev.instance_id}, but this destination takes no device state "
                            "over multifd", offset=0)
                    payload = bytearray(dev.payload_size)
                    _recv_exact(sock, memoryview(payload), f"packet {index}'s device state")
                    chan.receive(ChannelInput.DEVICE_STATE_PACKET)
                    on_device_state(dev.idstr, dev.instance_id, memoryview(payload), ch)
                    nbytes += size + dev.payload_size
                    offset = nbytes
                    self.stats.multifd_bytes[conn_index] = nbytes
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
                chan.receive(ChannelInput.SYNC_PACKET if pkt_.is_sync
                             else ChannelInput.RAM_PACKET)
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
            if pkt_.is_sync:
                self.barrier.channel_reached()
                chan.receive(ChannelInput.RELEASED)
