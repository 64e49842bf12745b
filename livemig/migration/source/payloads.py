"""What a source sends: the payload kinds of the one multifd sender and main channel.

Each kind knows where its page bytes are and writes them either as one
multifd packet (:meth:`send_on`, on a channel of
:class:`~livemig.migration.source.multifd_sender.MultifdSender`) or as PAGE
and ZERO records on the main channel (:meth:`write_records`, through the
:class:`RecordSink` of :class:`~livemig.migration.source.outgoing_stream.OutgoingStream`).
Nothing here copies a page through a Python ``bytes`` object: pages go out as
memoryviews of guest RAM, with ``sendfile``/``preadv`` from a snapshot, or
as numpy views of a relay's receive buffer.

=================  =========================  ==================================
kind               used by                    page bytes come from
=================  =========================  ==================================
``SnapshotPages``  ``send``                   a mapped-ram snapshot (offsets)
``GuestPages``     the engine                 guest RAM (zero pages found with
                                              numpy in the channel's thread)
``ForwardedPages`` ``relay``                  a packet just received
``EncodedPacket``  ``relay``, ``send``        a packet already framed (device
                                              state)
=================  =========================  ==================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from livemig import limits
from livemig.errors import StreamFormatError
from livemig.io.guest_ram import RamBlock
from livemig.migration.common.stats import TransferStats
from livemig.migration.source.multifd_sender import Buffer, SendChannel
from livemig.wire.multifd import page_runs
from livemig.wire.ram import PageRecords

PS = limits.TARGET_PAGE_SIZE
_PS64 = np.uint64(PS)


class RecordSink(Protocol):
    """Where main-channel RAM records go (the outgoing stream's RAM section)."""

    def zero_records(self, block: str, offsets: np.ndarray) -> None: ...

    def page_records(self, block: str, offsets: np.ndarray) -> PageRecords:
        """Records to fill; the sink has decided whether the first names the block."""
        ...

    def put_records(self, records: PageRecords) -> None: ...


class PagePayload(Protocol):
    """Pages that can go either way: a multifd packet or main-channel records."""

    def send_on(self, ch: SendChannel) -> None: ...

    def write_records(self, out: RecordSink) -> None: ...


@dataclass(slots=True)
class SnapshotPages:
    """Pages with data of one block of a mapped-ram snapshot."""

    block: str
    offsets: np.ndarray  # uint64 offsets in the block, ascending
    fd: int
    file_offset: int  # where offset 0 of the block is in the snapshot
    stats: TransferStats

    def send_on(self, ch: SendChannel) -> None:
        ch.send_file_pages(self.block, self.offsets, self.fd, self.file_offset)
        self.stats.add_pages(len(self.offsets))

    def write_records(self, out: RecordSink) -> None:
        rec = out.page_records(self.block, self.offsets)
        row = 0
        for start, length in page_runs(self.offsets):
            k = length // PS
            got = os.preadv(self.fd, [rec.row(row + i) for i in range(k)],
                            self.file_offset + start)
            if got != length:
                raise StreamFormatError(f"snapshot ends inside block {self.block}")
            row += k
        out.put_records(rec)
        self.stats.add_pages(len(self.offsets))


@dataclass(slots=True)
class GuestPages:
    """Dirty pages of a guest RAM block (page indices); zero pages travel as such."""

    block: RamBlock
    pages: np.ndarray  # ascending page indices
    stats: TransferStats

    def send_on(self, ch: SendChannel) -> None:
        blk = self.block
        data = blk.nonzero(self.pages)
        normal = self.pages[data].astype(np.uint64) * _PS64
        zero = self.pages[~data].astype(np.uint64) * _PS64
        views: list[Buffer] = [blk.view[s:s + n] for s, n in page_runs(normal)]
        ch.send_pages(blk.name, normal, zero, views)
        self.stats.add_pages(len(normal), len(zero))

    def write_records(self, out: RecordSink) -> None:
        blk = self.block
        data = blk.nonzero(self.pages)
        zero = self.pages[~data]
        if zero.size:
            out.zero_records(blk.name, zero.astype(np.uint64) * _PS64)
        normal = self.pages[data]
        if normal.size:
            rec = out.page_records(blk.name, normal.astype(np.uint64) * _PS64)
            rec.pages[:] = blk.pages[normal]
            out.put_records(rec)
        self.stats.add_pages(int(normal.size), int(zero.size))


@dataclass(slots=True)
class ForwardedPages:
    """Pages a relay received: ``data`` is ``(len(offsets), 4096)``, valid only
    until the receiving thread goes on (so they are sent directly, not queued)."""

    block: str
    offsets: np.ndarray
    data: np.ndarray

    def send_on(self, ch: SendChannel) -> None:
        pages = self.data if self.data.flags.c_contiguous else np.ascontiguousarray(self.data)
        ch.send_pages(self.block, self.offsets, None, [pages.data.cast("B")])

    def write_records(self, out: RecordSink) -> None:
        rec = out.page_records(self.block, self.offsets)
        rec.pages[:] = self.data
        out.put_records(rec)


@dataclass(slots=True)
class EncodedPacket:
    """A multifd packet already framed (a device-state packet): sent as it is."""

    buffers: Sequence[Buffer]

    def send_on(self, ch: SendChannel) -> None:
        ch.send_encoded(self.buffers)
