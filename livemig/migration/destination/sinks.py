"""Where a destination puts the RAM it receives: the sink protocols.

A sink is what :class:`~livemig.migration.destination.loader.MainChannelLoader`
and the multifd receiver hand pages to: a snapshot file
(:class:`~livemig.io.snapshot.SnapshotWriter`, for ``receive``), guest RAM
(``MachineSink`` in :mod:`livemig.engine.incoming_migration`), one state per
page (``CountingSink``, for ``inspect``), or the next hop (the relay's sink).

:class:`RamSink` is what every sink does. The other protocols here are optional
capabilities, one member each; the loader and the receiver ask for them with
``isinstance`` (they are ``runtime_checkable``), so a sink has a capability by
implementing the member with the declared name and signature, and a reader
finds the contract here rather than in an attribute probe:

* :class:`SnapshotSink` -- the sink commits a snapshot at the end, and a snapshot
  records the machine type: the stream must carry a configuration section.
* :class:`PageViewSink` -- the sink lends the memory its pages live in, so an
  uncompressed multifd packet is received straight into place (no bounce buffer).

No I/O here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from livemig.wire.events import Configuration, RamBlockInfo

__all__ = ["PageViewSink", "RamSink", "SnapshotSink"]


class RamSink(Protocol):
    """What the loader writes every RAM record into.

    ``set_layout`` comes once, with the block list, before any page. Offsets are
    byte offsets inside the named block, already checked against its length by
    the decoder. ``data`` in ``write_pages`` is an ``(n, 4096)`` view into the
    loader's read buffer, valid only during the call. ``read_page`` is for XBZRLE
    (a delta against the page as it stands). ``copy_mapped_ram_block`` takes one
    block of a mapped-ram file, read at its offsets from ``src_fd``, and returns
    how many pages it holds (a sink that cannot take one raises ``ConfigError``).
    """

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None: ...
    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None: ...
    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None: ...
    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None: ...
    def read_page(self, block: str, offset: int) -> bytearray: ...
    def copy_mapped_ram_block(self, src_fd: int, info: RamBlockInfo) -> int: ...


@runtime_checkable
class SnapshotSink(Protocol):
    """A :class:`RamSink` that writes a snapshot, committed once the stream ended.

    A snapshot is a stream of its own that QEMU must be able to load, so it needs
    the source's machine type: for such a sink the loader refuses a stream without
    a configuration section. Other sinks do without one.
    """

    def commit(self, *, device_sections: list[bytes], vmdesc_json: bytes | None,
               switchover_start: bool, switchover_at: int | None = None) -> int: ...


@runtime_checkable
class PageViewSink(Protocol):
    """A sink whose pages live in memory it can lend (guest RAM).

    ``page_views(block, offsets)`` returns, for the pages at ``offsets`` (checked
    against the block by the packet decoder), one writable memoryview per run of
    consecutive pages, in order, and counts those pages as received. The multifd
    receiver then reads an uncompressed packet's payload straight into them with
    ``recvmsg_into``; compressed payloads still go through ``write_pages``.
    """

    def page_views(self, block: str, offsets: np.ndarray) -> list[memoryview]: ...
