"""The main channel of an incoming migration, from the first byte to the JSON.

The loader drives :class:`~livemig.wire.stream.MainStreamDecoder` over a large
read buffer (records are parsed in bulk, pages are handed to the sink as
numpy views into that buffer) and does what a QEMU destination does with
each record: places pages, answers PING on the return path, meets the
multifd channels at every sync point.

After the RAM sections come device sections, which can only be split with
the JSON description at the very end; from the first device section (or EOF)
on, the loader collects the rest of the stream in a bounded buffer and parses
it once a complete description is there. It does not wait for the source to
close the connection: a source with a return path waits for our SHUT first.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from livemig import limits
from livemig.errors import (
    ConfigError,
    LimitExceeded,
    MigrationError,
    StreamFormatError,
    TruncatedStream,
    allocating,
)
from livemig.io.channels import ByteSource, SeekableSource
from livemig.migration.common.failure import FailureLatch
from livemig.migration.common.stats import TransferStats
from livemig.migration.destination.multifd_receiver import MainChannelWatch, MultifdReceiver
from livemig.migration.destination.sinks import RamSink, SnapshotSink
from livemig.wire.constants import Command, ReturnPathMessage, SectionType
from livemig.wire.events import (
    CommandRecord,
    Configuration,
    DeviceSection,
    DeviceStateTail,
    EndOfStream,
    RamBlockInfo,
    RamBlockList,
    RamCompressedPage,
    RamEndOfSection,
    RamMultifdFlush,
    RamPages,
    RamXbzrlePage,
    RamZeroPages,
    SectionHeader,
    Seek,
    VmDescriptionRecord,
)
from livemig.wire.ram import xbzrle_decode
from livemig.wire.stream import (
    MainStreamDecoder,
    SectionLengths,
    VmDescriptionScanner,
    find_vmdescription,
    fork_for_tail,
)

PS = limits.TARGET_PAGE_SIZE


@dataclass
class LoadResult:
    configuration: Configuration | None = None
    blocks: tuple[RamBlockInfo, ...] = ()
    ram_section_id: int = 0
    device_sections: list[DeviceSection] = field(default_factory=list)
    vmdesc_json: bytes | None = None
    switchover_start: bool = False
    #: How many device sections came before SWITCHOVER_START.
    switchover_at: int | None = None
    #: Where a snapshot's device-state trailer starts (it follows the description).
    trailer_offset: int | None = None
    return_path: bool = False
    commands: list[CommandRecord] = field(default_factory=list)
    multifd_sync_mode: str | None = None
    page_records: int = 0
    zero_records: int = 0
    stream_bytes: int = 0

    def __repr__(self) -> str:
        # Device sections and the JSON are raw bytes (up to MAX_DEVICE_STATE_TAIL and
        # MAX_VMDESC_JSON): a printed result says how many and how much, never the bytes.
        cfg = self.configuration
        vmdesc = None if self.vmdesc_json is None else _size(len(self.vmdesc_json))
        return (f"LoadResult(machine={cfg.machine if cfg else None!r}, "
                f"{len(self.blocks)} RAM blocks "
                f"({_size(sum(b.length for b in self.blocks))}), "
                f"{len(self.device_sections)} device sections "
                f"({_size(sum(len(s.raw) for s in self.device_sections))}), "
                f"vmdesc_json={vmdesc}, {len(self.commands)} commands, "
                f"ram_section_id={self.ram_section_id}, "
                f"switchover_start={self.switchover_start}, "
                f"switchover_at={self.switchover_at}, trailer_offset={self.trailer_offset}, "
                f"return_path={self.return_path}, "
                f"multifd_sync_mode={self.multifd_sync_mode!r}, "
                f"page_records={self.page_records}, zero_records={self.zero_records}, "
                f"stream_bytes={self.stream_bytes})")


def _size(n: int) -> str:
    """``n`` bytes for a person: "512 B", "3.4 KiB", "1.0 GiB"."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def rp_message(kind: ReturnPathMessage, payload: bytes = b"") -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


class MainChannelLoader:
    def __init__(self, source: ByteSource, sink: RamSink, *, stats: TransferStats,
                 latch: FailureLatch, multifd: MultifdReceiver | None = None,
                 send_return_path: Callable[[bytes], None] | None = None,
                 observer: Callable[[object], None] | None = None,
                 section_lengths: SectionLengths | None = None,
                 max_ram: int = limits.DEFAULT_MAX_GUEST_RAM) -> None:
        """``observer`` sees every record except pages, after the loader handled
        it (a relay forwards them from there). ``section_lengths`` lets a
        destination that knows its devices split their sections itself
        (:class:`~livemig.wire.stream.MainStreamDecoder`).

        What the source and the sink can do beyond their protocols is declared
        by the capability protocols they implement: a
        :class:`~livemig.migration.destination.sinks.SnapshotSink` needs the
        configuration section, a :class:`~livemig.io.channels.SeekableSource`
        can give mapped-ram pages, a :class:`~livemig.io.channels.LivenessSource`
        tells the sync barrier when the source hung up.

        ``max_ram`` is the most guest RAM the block list may declare (all
        blocks together); above it the stream is refused before the sink sizes
        anything for it."""
        if not 0 < max_ram <= limits.MAX_RAM_TOTAL_BYTES:
            raise ConfigError(f"the guest RAM limit must be between 1 byte and "
                              f"{_size(limits.MAX_RAM_TOTAL_BYTES)}, not {max_ram}")
        self.max_ram = max_ram
        self.observer = observer
        self.requires_configuration = isinstance(sink, SnapshotSink)
        self.source = source
        self.sink = sink
        self.stats = stats
        self.latch = latch
        self.multifd = multifd
        self.send_rp = send_return_path
        self.decoder = MainStreamDecoder(section_lengths=section_lengths)
        self.result = LoadResult()
        self._section: SectionHeader | None = None
        self._flush_in_section = False
        self._tail_offset: int | None = None

    @property
    def where(self) -> str:
        return self.source.name

    def run(self) -> LoadResult:
        try:
            self._run()
        except StreamFormatError as e:
            raise e.locate(self.where)
        return self.result

    # -- reading -------------------------------------------------------------

    def _run(self) -> None:
        with allocating("the main channel's read buffer", limits.MAIN_READ_BUFFER):
            buf = bytearray(limits.MAIN_READ_BUFFER)
        view = memoryview(buf)
        start = end = base = 0
        eof = False
        dec = self.decoder
        while True:
            self.latch.raise_if_failed()
            events, pos = dec.parse(buf, start, end, base, final=eof)
            progressed = pos != start or bool(events)
            start = pos
            seek = self._handle(events)
            if seek is not None:
                base, start, end, eof = seek, 0, 0, False
                self.source.seek(seek)
                continue
            if dec.done:
                self.result.stream_bytes = base + start
                return
            if self._tail_offset is not None:
                self._tail(bytearray(view[start:end]), base + start, eof)
                return
            if eof:
                raise TruncatedStream(f"the stream ends inside a {dec.expecting()}",
                                      offset=base + end)
            if progressed and end - start >= 16:
                continue
            if start and (start == end or end == len(buf) or start > len(buf) // 2):
                buf[0:end - start] = buf[start:end]
                base += start
                end -= start
                start = 0
            if end == len(buf):
                raise StreamFormatError(f"a record in a {dec.expecting()} is larger than the "
                                        f"{len(buf)}-byte read buffer", offset=base + start)
            n = self.source.readinto(view[end:])
            if n == 0:
                eof = True
                if self.latch.failed:
                    self.latch.raise_if_failed()
            end += n
            self.stats.main_bytes = base + end

    def _tail(self, tail: bytearray, tail_base: int, eof: bool) -> None:
        """Collect the rest of the stream until a complete JSON ends it, then parse it."""
        with allocating("the device-state read buffer", 1 << 20):
            chunk = bytearray(1 << 20)
        cview = memoryview(chunk)
        last_error: StreamFormatError | None = None
        self.stats.phase = "device state"
        # looks at each byte of the tail once, however many reads it takes
        scanner = VmDescriptionScanner()
        while True:
            loc = scanner.find(tail)
            if loc is not None:
                try:
                    events = self._parse_tail(tail, tail_base, loc[1])
                except StreamFormatError as e:
                    last_error = e  # perhaps not all of the tail is here yet
                else:
                    # what the records say is final: an error here is not "read more"
                    self._handle(events)
                    return
            elif self.decoder.state.name == "VMDESC" and not tail and eof:
                # EOF, then nothing: QEMU tolerates a missing description.
                self.decoder.parse(tail, 0, 0, tail_base, final=True)
                return
            if eof:
                if last_error is not None:
                    raise last_error
                early = find_vmdescription(tail, exact=False)
                if early is not None:
                    self._handle(self._parse_tail(tail, tail_base, early[1], end=early[2]))
                    raise StreamFormatError(
                        f"{len(tail) - early[2]} bytes of garbage after the end of the stream",
                        offset=tail_base + early[2])
                raise TruncatedStream(
                    "the stream ended before the vmstate description (JSON) that follows EOF "
                    f"was complete ({len(tail)} bytes of device state and description "
                    "arrived); device sections cannot be delimited without it",
                    offset=tail_base + len(tail))
            self.latch.raise_if_failed()
            n = self.source.readinto(cview)
            if n == 0:
                eof = True
                continue
            if len(tail) + n > limits.MAX_DEVICE_STATE_TAIL + limits.MAX_VMDESC_JSON:
                raise StreamFormatError(
                    f"more than {limits.MAX_DEVICE_STATE_TAIL >> 20} MiB of device state "
                    "without a complete vmstate description", offset=tail_base)
            tail += cview[:n]
            self.stats.main_bytes = tail_base + len(tail)

    def _parse_tail(self, tail: bytearray, tail_base: int, json_at: int,
                    end: int | None = None) -> list:  # type: ignore[type-arg]
        from livemig.wire.vmstate import parse_vmdescription

        end = len(tail) if end is None else end
        try:
            desc = parse_vmdescription(bytes(tail[json_at:end]))
        except StreamFormatError as e:
            raise e.locate(self.where, record_offset=tail_base + json_at)
        if desc.page_size != PS:
            raise StreamFormatError(f"the vmstate description says page_size {desc.page_size}; "
                                    f"livemig supports {PS}-byte target pages",
                                    offset=tail_base + json_at)
        trial = fork_for_tail(self.decoder, desc)
        events, pos = trial.parse(tail, 0, end, tail_base, final=True, max_events=1 << 30)
        if not trial.done or pos != end:
            raise StreamFormatError("device sections do not end where the vmstate "
                                    "description begins", offset=tail_base + pos)
        self.decoder = trial
        return events

    # -- events --------------------------------------------------------------

    def _handle(self, events: list) -> int | None:
        r = self.result
        stats = self.stats
        for ev in events:
            t = type(ev)
            if t is RamPages:
                self.sink.write_pages(ev.block, ev.offsets, ev.data)
                stats.add_pages(len(ev.offsets))
            elif t is RamZeroPages:
                self.sink.zero_pages(ev.block, ev.offsets, ev.fill)
                stats.add_pages(0, len(ev.offsets))
            elif t is RamEndOfSection:
                self._end_of_section(ev)
            elif t is RamMultifdFlush:
                self._flush_in_section = True
                r.multifd_sync_mode = "per-round"
                if self.multifd is not None:
                    self.multifd.barrier.main_sync(self.where, self._main_watch())
            elif t is SectionHeader:
                self._section = ev
                self._flush_in_section = False
            elif t is RamBlockList:
                self._block_list(ev)
            elif t is Seek:
                return ev.offset
            elif t is RamXbzrlePage:
                page = self.sink.read_page(ev.block, ev.offset)
                try:
                    xbzrle_decode(ev.encoded, page)
                except StreamFormatError as e:
                    raise StreamFormatError(f"XBZRLE page at {ev.offset:#x} of {ev.block}: "
                                            f"{e.message}", offset=ev.record_offset) from None
                self.sink.write_page_bytes(ev.block, ev.offset, page)
                stats.add_pages(1)
            elif t is RamCompressedPage:
                self.sink.write_page_bytes(ev.block, ev.offset, _inflate_page(ev))
                stats.add_pages(1)
            elif t is CommandRecord:
                self._command(ev)
            elif t is Configuration:
                r.configuration = ev
                stats.phase = "RAM"
            elif t is DeviceSection:
                r.device_sections.append(ev)
            elif t is DeviceStateTail:
                self._tail_offset = ev.offset
            elif t is EndOfStream:
                self._tail_offset = ev.offset + 1
            elif t is VmDescriptionRecord:
                r.vmdesc_json = ev.raw_json
            if self.observer is not None and t not in _PAGE_EVENTS:
                self.observer(ev)
        return None

    def _block_list(self, ev: RamBlockList) -> None:
        r = self.result
        declared = max(ev.total, sum(b.length for b in ev.blocks))
        if declared > self.max_ram:
            largest = max(ev.blocks, key=lambda b: b.length, default=None)
            which = f"; the largest block is {largest.name} ({_size(largest.length)})" \
                if largest is not None else ""
            raise LimitExceeded(
                f"the RAM block list declares {_size(declared)} of guest RAM, more than the "
                f"{_size(self.max_ram)} livemig accepts{which} (--max-ram SIZE raises the "
                "limit)")
        r.blocks = ev.blocks
        r.ram_section_id = self.decoder.ram_section_id or 0
        self.stats.total_ram = ev.total
        if r.configuration is None and self.requires_configuration:
            raise StreamFormatError("the stream has no configuration section (0x07 after the "
                                    "header); livemig needs its machine type to write a "
                                    "snapshot", offset=8)
        self.sink.set_layout(r.configuration, r.ram_section_id, ev.blocks)
        if self.multifd is not None:
            self.multifd.set_blocks({b.name: b.length for b in ev.blocks})
        if any(b.mapped_ram for b in ev.blocks):
            if not isinstance(self.source, SeekableSource):
                raise ConfigError(f"{self.where}: a mapped-ram stream can only be read from "
                                  "a file")
            fd = self.source.file_fd
            for b in ev.blocks:
                self.stats.add_pages(self.sink.copy_mapped_ram_block(fd, b))

    def _end_of_section(self, ev: RamEndOfSection) -> None:
        r = self.result
        if (ev.section_kind == SectionType.SECTION_START and r.multifd_sync_mode is None
                and self.multifd is not None):
            r.multifd_sync_mode = "per-round" if self._flush_in_section else "per-section"
        if self.multifd is not None and r.multifd_sync_mode == "per-section":
            self.multifd.barrier.main_sync(self.where, self._main_watch())

    def _main_watch(self) -> MainChannelWatch | None:
        """The main channel, if it is a socket whose hang-up the sync barrier can watch."""
        src = self.source
        return src if isinstance(src, MainChannelWatch) else None

    def _command(self, ev: CommandRecord) -> None:
        r = self.result
        r.commands.append(ev)
        if ev.cmd == Command.OPEN_RETURN_PATH:
            if self.send_rp is None:
                raise StreamFormatError(f"the source asked for a return path, which "
                                        f"{self.where} cannot carry", offset=ev.offset)
            r.return_path = True
        elif ev.cmd == Command.PING:
            if not r.return_path or self.send_rp is None:
                raise StreamFormatError("PING without a return path", offset=ev.offset)
            self.send_rp(rp_message(ReturnPathMessage.PONG, ev.data))
        elif ev.cmd == Command.SWITCHOVER_START:
            r.switchover_start = True
            r.switchover_at = len(r.device_sections)


_PAGE_EVENTS = (RamPages, RamZeroPages, RamXbzrlePage, RamCompressedPage, Seek,
                DeviceStateTail)


def _inflate_page(ev: RamCompressedPage) -> bytes:
    d = zlib.decompressobj()
    try:
        page = d.decompress(ev.compressed, PS + 1)
    except zlib.error as e:
        raise StreamFormatError(f"compressed page at {ev.offset:#x} of {ev.block}: {e}",
                                offset=ev.record_offset) from None
    if len(page) != PS or not d.eof:
        raise StreamFormatError(f"compressed page at {ev.offset:#x} of {ev.block} does not "
                                f"inflate to exactly one page ({len(page)} bytes)",
                                offset=ev.record_offset)
    return page


__all__ = ["LoadResult", "MainChannelLoader", "MigrationError", "RamSink"]
