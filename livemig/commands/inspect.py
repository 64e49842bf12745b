"""``livemig inspect`` and ``livemig extract``: what a snapshot or stream file holds.

Inspecting runs the same loader as ``receive`` over the file, with a sink
that only keeps a per-page state (never written / data / zero) instead of
writing pages; a mapped-ram snapshot's pages are not read at all, only its
bitmaps.
"""

from __future__ import annotations

import enum

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from livemig import limits
from livemig.errors import ConfigError, MigrationError, StreamFormatError, allocating
from livemig.io.channels import FileSource
from livemig.io.snapshot import bitmap_chunks, extract_block, trailer_packets
from livemig.migration.destination.device_state_capture import DeviceStateRecorder
from livemig.migration.common.failure import FailureLatch
from livemig.migration.destination.loader import LoadResult, MainChannelLoader
from livemig.migration.common.stats import TransferStats
from livemig.wire.constants import SectionType
from livemig.wire.device_state_trailer import TrailerPacket
from livemig.wire.events import Configuration, RamBlockInfo
from livemig.wire.mapped_ram import pack_bitmap, unpack_bitmap
from livemig.wire.ram import bitmap_bytes

if TYPE_CHECKING:
    from livemig.wire.vmstate import VmDescription

PS = limits.TARGET_PAGE_SIZE
class PageState(enum.IntEnum):
    """What a snapshot holds for one page (one byte per page in :class:`CountingSink`)."""

    NEVER = 0  # never sent
    DATA = 1
    ZERO = 2


_NEVER, _DATA, _ZERO = PageState.NEVER, PageState.DATA, PageState.ZERO


@dataclass
class _BlockCount:
    info: RamBlockInfo
    _state: np.ndarray | None = None
    page_records: int = 0
    zero_records: int = 0
    #: for a mapped-ram snapshot, counted from its bitmap: no per-page state at all
    mapped: tuple[int, int] | None = None  # (present, zero)
    #: the snapshot's bitmap (1 bit per page), kept only for :attr:`state`
    bitmap: bytearray | None = None

    @property
    def pages(self) -> int:
        return self.info.length // PS

    @property
    def state(self) -> np.ndarray:
        """One byte per page, made on the first page record: a snapshot's blocks
        are only counted from their bitmaps and never need it. Untouched parts
        are not resident."""
        if self._state is None:
            if self.mapped is not None and self.bitmap is None:
                raise ConfigError(f"the per-page state of RAM block {self.info.name} was not "
                                  "kept (load_file(keep_page_state=False))")
            with allocating(f"the per-page state of RAM block {self.info.name}", self.pages):
                self._state = np.zeros(self.pages, dtype=np.int8)
            if self.bitmap is not None:
                step = limits.BITMAP_CHUNK_PAGES
                for first in range(0, self.pages, step):
                    count = min(step, self.pages - first)
                    raw = memoryview(self.bitmap)[first // 8:(first + count + 7) // 8]
                    piece = self._state[first:first + count]
                    piece[:] = _ZERO
                    piece[unpack_bitmap(raw, count)] = _DATA
        return self._state

    def counts(self) -> tuple[int, int, int]:
        """``(present, zero, never sent)`` pages, counted piece by piece (no
        temporary as large as the block)."""
        if self.mapped is not None:
            return self.mapped[0], self.mapped[1], 0
        if self._state is None:
            return 0, 0, self.pages
        data = zero = 0
        step = limits.BITMAP_CHUNK_PAGES
        for first in range(0, self.pages, step):
            piece = self._state[first:first + step]
            data += int(np.count_nonzero(piece == _DATA))
            zero += int(np.count_nonzero(piece == _ZERO))
        return data, zero, self.pages - data - zero


class CountingSink:
    """A RamSink that remembers what each page is, without its bytes."""

    def __init__(self, *, keep_page_state: bool = True) -> None:
        """``keep_page_state=False``: a snapshot's blocks are only counted, and
        :attr:`_BlockCount.state` is not available for them (memory does not
        grow with the declared RAM); with True their bitmaps are kept (1 bit per
        page) and turned into per-page state on demand."""
        self.blocks: dict[str, _BlockCount] = {}
        self.mapped_ram = False
        self.keep_page_state = keep_page_state

    def set_layout(self, config: Configuration | None, ram_section_id: int,
                   blocks: tuple[RamBlockInfo, ...]) -> None:
        for b in blocks:
            self.blocks[b.name] = _BlockCount(b)

    def write_pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> None:
        b = self.blocks[block]
        b.state[(offsets // PS).astype(np.int64)] = _DATA
        b.page_records += len(offsets)

    def write_page_bytes(self, block: str, offset: int, page: bytes | bytearray) -> None:
        b = self.blocks[block]
        b.state[offset // PS] = _DATA
        b.page_records += 1

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> None:
        b = self.blocks[block]
        b.state[(offsets // PS).astype(np.int64)] = _ZERO if fill == 0 else _DATA
        b.zero_records += len(offsets)

    def read_page(self, block: str, offset: int) -> bytearray:
        # Contents are not kept: a blank page still lets the XBZRLE record be
        # checked and counted.
        return bytearray(PS)

    def copy_mapped_ram_block(self, src_fd: int, info: RamBlockInfo) -> int:
        self.mapped_ram = True
        b = self.blocks[info.name]
        if self.keep_page_state:
            with allocating(f"the page bitmap of RAM block {info.name}", bitmap_bytes(b.pages)):
                b.bitmap = bytearray(bitmap_bytes(b.pages))
        present = 0
        for first, chunk in bitmap_chunks(src_fd, info):
            present += int(np.count_nonzero(chunk))
            if b.bitmap is not None:
                packed = pack_bitmap(chunk)
                b.bitmap[first // 8:first // 8 + len(packed)] = packed
        b.mapped = (present, b.pages - present)
        return present


@dataclass
class Inspection:
    path: str
    load: LoadResult
    sink: CountingSink
    # the parsed JSON description and the report run to thousands of lines for a pc guest
    description: Any = field(default=None, repr=False)
    report: dict[str, Any] = field(default_factory=dict, repr=False)


def load_file(path: str, *, max_ram: int = limits.DEFAULT_MAX_GUEST_RAM,
              keep_page_state: bool = True) -> tuple[LoadResult, CountingSink]:
    """Run the loader over a file. ``max_ram``: the most guest RAM the file may
    declare; ``keep_page_state``: see :class:`CountingSink` (``inspect`` and
    ``extract`` only count, and pass False)."""
    source = FileSource(path)
    sink = CountingSink(keep_page_state=keep_page_state)
    try:
        loader = MainChannelLoader(source, sink, stats=TransferStats(), latch=FailureLatch(),
                                   max_ram=max_ram)
        result = loader.run()
        result.trailer_offset = source.trailer
        return result, sink
    finally:
        source.close()


def device_state_report(path: str, trailer: int) -> list[dict[str, Any]]:
    """Per device, the multifd device-state packets a snapshot's trailer holds.

    The packets go through the same checks as when ``receive`` took them (a
    trailer edited since fails here, naming the packet); each device's data is
    hashed in idx order, the order a destination writes it to the device.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            packets = trailer_packets(fd, trailer)
        except StreamFormatError as e:
            raise e.locate(path) from None
        check = DeviceStateRecorder(lambda header, payload: None)
        by_device: dict[tuple[str, int], list[TrailerPacket]] = {}
        for i, p in enumerate(packets):
            # the headers carry what the checks need; only a config packet is read here
            config = memoryview(os.pread(fd, p.data_size, p.data_offset)) \
                if p.vfio.is_config else None
            try:
                check.check(p.idstr, p.instance_id, p.vfio, p.payload_size, config)
            except StreamFormatError as e:
                raise StreamFormatError(f"device-state trailer packet {i}: {e.message}",
                                        where=f"{path}, {e.where}", offset=p.offset) from None
            by_device.setdefault((p.idstr, p.instance_id), []).append(p)
        out = []
        for key, plist in sorted(by_device.items()):
            dev = check.devices[key]
            data_hash, config_hash = hashlib.sha256(), hashlib.sha256()
            for p in sorted(plist, key=lambda q: q.vfio.idx):
                (config_hash if p.vfio.is_config else data_hash).update(
                    os.pread(fd, p.data_size, p.data_offset))
            missing = dev.missing()
            out.append({
                "idstr": key[0],
                "instance_id": key[1],
                "packet_count": len(plist),
                "data_bytes": dev.data_bytes,
                "config_bytes": dev.config_bytes,
                "config_idx": dev.config_idx,
                "complete": not missing,
                "missing": missing or None,
                "data_sha256": data_hash.hexdigest(),
                "config_sha256": config_hash.hexdigest(),
                "packets": [{"idx": p.vfio.idx, "kind": "config" if p.vfio.is_config else "data",
                             "bytes": p.data_size, "offset": p.offset} for p in plist],
            })
        return out
    finally:
        os.close(fd)


def inspect_file(path: str, *, fields: bool = False,
                 max_ram: int = limits.DEFAULT_MAX_GUEST_RAM) -> dict[str, Any]:
    """A JSON-ready account of a snapshot or a single-channel stream file.

    ``max_ram``: the most guest RAM the file may declare (see :func:`load_file`)."""
    load, sink = load_file(path, max_ram=max_ram, keep_page_state=False)
    cfg = load.configuration
    desc = None
    if load.vmdesc_json is not None:
        from livemig.wire.vmstate import parse_vmdescription
        desc = parse_vmdescription(load.vmdesc_json)
    blocks = []
    for b in sink.blocks.values():
        present, zero, never = b.counts()
        entry: dict[str, Any] = {
            "name": b.info.name,
            "size": b.info.length,
            "pages": b.pages,
            "pages_present": present,
            "zero_pages": zero,
        }
        if not sink.mapped_ram:
            entry["pages_never_sent"] = never
            entry["page_records"] = b.page_records
            entry["zero_records"] = b.zero_records
        blocks.append(entry)
    devices = []
    for s in load.device_sections:
        body = s.raw[s.body_offset:s.body_offset + s.body_length]
        d: dict[str, Any] = {
            "idstr": s.header.idstr,
            "instance_id": s.header.instance_id,
            "version": s.header.version_id,
            "section_id": s.header.section_id,
            "kind": s.header.kind.name.removeprefix("SECTION_"),
            "size": s.body_length,
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        if fields and desc is not None and s.header.kind is SectionType.SECTION_FULL:
            from livemig.wire.vmstate import decode_fields
            dd = desc.device(s.header.idstr, s.header.instance_id)
            d["fields"] = decode_fields(dd, body) if dd is not None else None
        devices.append(d)
    caps = list(cfg.capabilities) if cfg else []
    return {
        "runstate": captured_runstate(load, desc),
        "file": path,
        "format": "mapped-ram snapshot" if sink.mapped_ram else "migration stream",
        "stream_version": 3,
        "machine": cfg.machine if cfg else None,
        "capabilities": caps,
        "uuid": cfg.uuid.hex() if cfg and cfg.uuid else None,
        "switchover_start": load.switchover_start,
        "multifd_sync_mode": load.multifd_sync_mode,
        "ram_total": sum(b.info.length for b in sink.blocks.values()),
        "ram_blocks": blocks,
        "devices": devices,
        "device_state": (device_state_report(path, load.trailer_offset)
                         if load.trailer_offset is not None else []),
        "vmdescription_bytes": len(load.vmdesc_json) if load.vmdesc_json is not None else None,
        "page_size": desc.page_size if desc is not None else PS,
    }


#: A QEMU RunState name (qapi/run-state.json), and what hex of a buffer looks like.
_RUNSTATE_NAME = re.compile(r"[a-z]+(-[a-z]+)*")
_HEX = re.compile(r"[0-9a-f]*")


def captured_runstate(load: LoadResult, desc: VmDescription | None) -> str | None:
    """The run state the source was in when the migration started, from QEMU's
    ``globalstate`` section (``running``, ``paused``, ``prelaunch``, ...): what the
    destination resumes into. None when the stream has no such section or no
    description to read it with (livemig's own machines send none)."""
    if desc is None:
        return None
    from livemig.wire.vmstate import decode_fields
    for s in load.device_sections:
        if s.header.idstr != "globalstate" or s.header.kind is not SectionType.SECTION_FULL:
            continue
        dd = desc.device(s.header.idstr, s.header.instance_id)
        if dd is None:
            return None
        body = s.raw[s.body_offset:s.body_offset + s.body_length]
        try:
            value = decode_fields(dd, body).get("runstate")
        except MigrationError:
            return None  # the report's device list shows the section; its state is unknown
        # a QEMU RunState name ("running", "finish-migrate"); anything else came out as
        # hex: a buffer that holds no text
        if isinstance(value, str) and _RUNSTATE_NAME.fullmatch(value) \
                and not _HEX.fullmatch(value):
            return value
        return None
    return None


def fields_lines(fields: object, indent: str = "") -> list[str]:
    """Decoded vmstate fields as lines for a person: one ``name: value`` line per
    field, an array of numbers or strings on one line, 32/64-bit words in hex
    (:class:`~livemig.wire.vmstate.Register`), a struct indented under its name, an
    array of structs one line per element."""
    lines: list[str] = []

    def scalar(v: object) -> str:
        if isinstance(v, bool) or v is None:
            return str(v).lower() if v is not None else "null"
        if isinstance(v, int):
            return str(v)  # a Register's str() is hex
        return json.dumps(v) if isinstance(v, str) else str(v)

    def inline(v: object) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {inline(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(inline(x) for x in v) + "]"
        return scalar(v)

    def one(name: str, v: object, ind: str) -> None:
        if isinstance(v, dict):
            lines.append(f"{ind}{name}:")
            for k, sub in v.items():
                one(str(k), sub, ind + "  ")
        elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            for i, x in enumerate(v):  # an array of structs: one line per element
                lines.append(f"{ind}{name}[{i}]: {inline(x)}")
        elif isinstance(v, list):
            lines.append(f"{ind}{name}: [{', '.join(scalar(x) for x in v)}]")
        else:
            lines.append(f"{ind}{name}: {scalar(v)}")

    if isinstance(fields, dict):
        for k, v in fields.items():
            one(str(k), v, indent)
    else:
        lines.append(f"{indent}{scalar(fields)}")
    return lines


def extract(path: str, block: str, output: str, *,
            max_ram: int = limits.DEFAULT_MAX_GUEST_RAM) -> int:
    load, sink = load_file(path, max_ram=max_ram, keep_page_state=False)
    if not sink.mapped_ram:
        raise ConfigError(f"{path} is a migration stream, not a snapshot; capture it first with "
                          f"'livemig receive file:{path} -o SNAPSHOT'")
    return extract_block(path, {b.name: b for b in load.blocks}, block, output)
