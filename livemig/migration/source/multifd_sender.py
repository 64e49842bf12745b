"""The source side of multifd: N channels, one sender, payloads chosen per use.

This is the one multifd sender of livemig, used by ``send``, ``relay`` and
the engine, in the way QEMU's ``MultiFDMethods`` / ``MultiFDSendData`` let
one set of channel threads carry RAM pages or device state. What a channel
carries is a *job* (:class:`PacketJob`): pages of a snapshot file, pages of
guest RAM, pages a relay has just received, or an already encoded packet
(device state). A job knows where its bytes are; the channel knows how a
packet is framed: the packet number, the compression stage (one compressor
per channel, kept for the whole migration, as QEMU's zlib/zstd streams are),
and the vectored write (``sendmsg`` of header and page views, or ``sendfile``
from the page cache when nothing needs to be compressed).

Two ways to drive the channels:

* **queued** (``send``, the engine): one thread per channel in the caller's
  :class:`~livemig.migration.common.thread_group.ThreadGroup`, fed through a
  bounded queue; ``sync()`` puts a SYNC packet behind everything queued on
  every channel and waits until each has been written.
* **direct** (the relay): no threads of its own; whichever thread has a
  packet writes it under the channel's lock (the relay's incoming channel
  threads hand over pages whose buffer is reused as soon as they return).

Channel states (a table, as for the other state machines of livemig)::

    INIT --init packet--> PACKETS --SYNC--> PACKETS
    PACKETS --stop--> ENDED;   any --failure--> ENDED
"""

from __future__ import annotations

import collections
import enum
import itertools
import os
import socket
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from livemig import limits
from livemig.errors import ChannelError, MigrationError, StateError
from livemig.io.tls import is_tls, refused
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.common.thread_group import ThreadGroup
from livemig.wire.constants import MultifdCompression
from livemig.wire.multifd import (
    InitPacket,
    encode_ram_packet,
    encode_sync_packet,
    make_compressor,
    page_runs,
)

PS = limits.TARGET_PAGE_SIZE

#: Jobs queued per channel: enough to keep the socket busy while the producer
#: prepares the next ones, small enough to bound memory (page jobs hold
#: offsets, not page data; a device-state job holds one packet of at most 1 MiB).
CHANNEL_QUEUE_DEPTH = 8

Buffer = bytes | bytearray | memoryview


class ChannelState(enum.Enum):
    INIT = "init"
    PACKETS = "packets"
    ENDED = "ended"


#: (state, input) -> next state. An input not listed is a bug in the caller.
CHANNEL_ARCS: dict[tuple[ChannelState, str], ChannelState] = {
    (ChannelState.INIT, "init"): ChannelState.PACKETS,
    (ChannelState.PACKETS, "packet"): ChannelState.PACKETS,
    (ChannelState.PACKETS, "sync"): ChannelState.PACKETS,
    (ChannelState.PACKETS, "stop"): ChannelState.ENDED,
    (ChannelState.INIT, "fail"): ChannelState.ENDED,
    (ChannelState.PACKETS, "fail"): ChannelState.ENDED,
    (ChannelState.ENDED, "fail"): ChannelState.ENDED,
}


class PacketJob(Protocol):
    """One packet's worth of work for a channel (see :mod:`.payloads`)."""

    def send_on(self, ch: SendChannel) -> None:
        """Write this job as one packet on ``ch`` (called with the channel held)."""
        ...


def sendmsg_all(sock: socket.socket, buffers: Sequence[Buffer]) -> int:
    """Write every buffer, in order, with as few ``sendmsg`` calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(len(v) for v in views)
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


class SendChannel:
    """One outgoing multifd channel: its socket, compressor, counters and state."""

    def __init__(self, index: int, sock: socket.socket, compression: MultifdCompression,
                 packet_numbers: _PacketNumbers, stats: TransferStats, where: str) -> None:
        self.index = index
        self.sock = sock
        self.where = where
        self.state = ChannelState.INIT
        self.lock = threading.Lock()
        self.comp = (make_compressor(compression)
                     if compression is not MultifdCompression.NONE else None)
        self.flag = int(compression.flag)
        self.stats = stats
        self._numbers = packet_numbers
        self._bounce: memoryview | None = None
        #: pages of a file cannot go by ``sendfile``: it would bypass the encryption
        self._tls = is_tls(sock)
        #: the initial packet went out as the channel was opened (see ``init_sent``)
        self.init_sent = False
        self.sent = 0

    def _move(self, event: str) -> None:
        nxt = CHANNEL_ARCS.get((self.state, event))
        if nxt is None:
            raise StateError(f"{self.where} {self.state.value}", f"a state that takes {event}")
        self.state = nxt

    def _count(self, n: int) -> None:
        self.sent += n
        self.stats.multifd_bytes[self.index] = self.sent

    def write(self, buffers: Sequence[Buffer]) -> None:
        try:
            n = sendmsg_all(self.sock, buffers)
        except OSError as e:
            tls = refused(self.where, e) if self._tls else None
            if tls is not None:
                raise tls from e
            raise ChannelError(f"{self.where}: send failed: {e.strerror or e} (did the "
                               "destination close the connection?)") from e
        self._count(n)

    def send_init(self, uuid: bytes) -> None:
        self._move("init")
        if not self.init_sent:
            self.write([InitPacket(uuid, self.index).encode()])

    def send_sync(self) -> None:
        self._move("sync")
        self.write([encode_sync_packet(self._numbers.next())])

    def send_encoded(self, buffers: Sequence[Buffer]) -> None:
        """A packet that is already framed (device state)."""
        self._move("packet")
        self.write(buffers)

    def send_pages(self, block: str, normal: np.ndarray, zero: np.ndarray | None,
                   payload: Sequence[Buffer]) -> None:
        """One RAM packet: ``payload`` holds the pages at ``normal``, in order."""
        self._move("packet")
        size = len(normal) * PS
        bufs: Sequence[Buffer] = payload
        if self.comp is not None and len(normal):
            packed = self.comp.compress(payload)
            bufs, size = [packed], len(packed)
        hdr = encode_ram_packet(flags=self.flag, ramblock=block, normal_offsets=normal,
                                zero_offsets=zero, packet_num=self._numbers.next(),
                                payload_size=size)
        self.write([hdr, *bufs])

    def send_file_pages(self, block: str, offsets: np.ndarray, fd: int,
                        file_offset: int) -> None:
        """One RAM packet whose pages are read from ``fd`` at ``file_offset + offset``:
        uncompressed they go from the page cache to the socket with ``sendfile``
        (over TLS, through a buffer)."""
        runs = page_runs(offsets)
        if self.comp is not None or self._tls:
            if self._bounce is None:
                self._bounce = memoryview(bytearray(limits.MULTIFD_PACKET_BYTES))
            pos = 0
            for start, length in runs:
                if os.preadv(fd, [self._bounce[pos:pos + length]], file_offset + start) \
                        != length:
                    raise ChannelError(f"{self.where}: snapshot ends inside block {block}")
                pos += length
            self.send_pages(block, offsets, None, [self._bounce[:pos]])
            return
        self._move("packet")
        n = len(offsets)
        hdr = encode_ram_packet(flags=self.flag, ramblock=block, normal_offsets=offsets,
                                zero_offsets=None, packet_num=self._numbers.next(),
                                payload_size=n * PS)
        self.write([hdr])
        out = self.sock.fileno()
        try:
            for start, length in runs:
                at, left = file_offset + start, length
                while left:
                    k = os.sendfile(out, fd, at, left)
                    if k == 0:
                        raise ChannelError(f"{self.where}: snapshot ends inside block {block}")
                    at += k
                    left -= k
        except OSError as e:
            raise ChannelError(f"{self.where}: send failed: {e.strerror or e} (did the "
                               "destination close the connection?)") from e
        self._count(n * PS)


class _PacketNumbers:
    """QEMU numbers packets across all channels of a migration."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._it = itertools.count()

    def next(self) -> int:
        with self._lock:
            return next(self._it)


class _Closed(Exception):
    """The queue was closed by a failure: the producer re-raises the first cause."""


class _JobQueue:
    """A bounded queue that a failure closes: blocked producers and consumers wake."""

    def __init__(self, depth: int) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._depth = depth
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: object) -> None:
        with self._cond:
            while len(self._items) >= self._depth and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Closed
            self._items.append(item)
            self._cond.notify_all()

    def get(self) -> object:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if self._closed:
                return _STOP
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


_SYNC = object()
_STOP = object()


class MultifdSender:
    """The channels of one migration; see the module docstring.

    ``group`` is the owner's thread group (queued mode starts one thread per
    channel in it); without it the sender is direct. The latch is the group's:
    the first failure closes every queue and, through the registered sockets,
    wakes every thread.
    """

    def __init__(self, sockets: Sequence[socket.socket], compression: MultifdCompression,
                 uuid: bytes | None, latch: FailureLatch, stats: TransferStats, *,
                 group: ThreadGroup | None = None, name: str = "multifd channel",
                 init_sent: bool = False) -> None:
        """``init_sent``: the caller sent each channel's initial packet as it opened it
        (over TLS a QEMU destination reads it before it answers the next handshake)."""
        self.n = len(sockets)
        if not self.n:
            raise ValueError("a multifd sender needs at least one channel")
        self.latch = latch
        self.uuid = uuid or bytes(16)
        self._numbers = _PacketNumbers()
        stats.multifd_bytes = [0] * self.n
        self.channels = [SendChannel(i, s, compression, self._numbers, stats, f"{name} {i}")
                         for i, s in enumerate(sockets)]
        for ch in self.channels:
            ch.init_sent = init_sent
        self._rr_lock = threading.Lock()
        self._rr = 0
        self._group = group
        self._queues: list[_JobQueue] = []
        self._synced = threading.Semaphore(0)
        self._ended: list[threading.Event] = []
        for s in sockets:
            latch.add_socket(s)
        if group is None:
            for ch in self.channels:
                with ch.lock:
                    ch.send_init(self.uuid)
            return
        self._queues = [_JobQueue(CHANNEL_QUEUE_DEPTH) for _ in range(self.n)]
        self._ended = [threading.Event() for _ in range(self.n)]
        latch.on_failure(self._on_failure)
        for ch in self.channels:
            group.start(self._run, ch, name=f"multifd-send-{ch.index}")

    @property
    def queued(self) -> bool:
        return self._group is not None

    def _next_channel(self) -> int:
        with self._rr_lock:  # shared by the main thread and device-state savers
            i = self._rr
            self._rr = (i + 1) % self.n
            return i

    def dispatch(self, job: PacketJob, channel: int | None = None) -> None:
        """Send ``job`` as one packet on ``channel`` (by default the next in turn)."""
        i = self._next_channel() if channel is None else channel % self.n
        if self.queued:
            try:
                self._queues[i].put(job)
            except _Closed:
                self.latch.raise_if_failed()
                raise
            return
        ch = self.channels[i]
        with ch.lock:
            self.latch.raise_if_failed()
            job.send_on(ch)

    def sync(self) -> None:
        """A SYNC packet on every channel, after everything dispatched before;
        returns once every channel has written it."""
        self.latch.raise_if_failed()
        if not self.queued:
            for ch in self.channels:
                with ch.lock:
                    ch.send_sync()
            return
        for q in self._queues:
            try:
                q.put(_SYNC)
            except _Closed:
                self.latch.raise_if_failed()
                raise
        for _ in range(self.n):
            self._synced.acquire()  # a failure releases every waiter
            self.latch.raise_if_failed()

    def finish(self) -> None:
        """Stop the channels once everything dispatched has been written."""
        if not self.queued:
            for ch in self.channels:
                with ch.lock:
                    ch._move("stop")
            return
        for q in self._queues:
            try:
                q.put(_STOP)
            except _Closed:
                break
        for e in self._ended:
            e.wait()  # a failure ends every channel thread too
        self.latch.raise_if_failed()

    def _on_failure(self) -> None:
        for q in self._queues:
            q.close()
        for _ in range(self.n):
            self._synced.release()

    def _run(self, ch: SendChannel) -> None:
        try:
            ch.send_init(self.uuid)
            q = self._queues[ch.index]
            while True:
                item = q.get()
                if item is _STOP or self.latch.failed:
                    ch._move("stop" if item is _STOP else "fail")
                    return
                if item is _SYNC:
                    ch.send_sync()
                    self._synced.release()
                    continue
                job: PacketJob = item  # type: ignore[assignment]
                job.send_on(ch)
        except OSError as e:
            raise ChannelError(f"{ch.where}: send failed: {e.strerror or e} (did the "
                               "destination close the connection?)") from e
        except MigrationError:
            raise
        finally:
            self._ended[ch.index].set()
