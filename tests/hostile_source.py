"""A migration source that lies: helpers for the hostile-input tests.

Not a test module; ``test_hostile.py``, ``test_fuzz.py`` and ``test_wire_stream.py``
import it.

* :func:`walk_capture` is an independent, deliberately naive reader of the framing of a
  main stream up to its first device section (header, configuration, sections, RAM
  records, commands) and of its tail (EOF, VMDESCRIPTION). It does not share code with
  ``livemig.wire``; tests use it to find where things are in a real capture (to cut or
  corrupt a stream at a chosen record) and to cross-check the decoder's events.
* :func:`build_stream` writes a small valid stream with livemig's own encoders, with a
  hook to replace any part of it.
* :func:`leftovers` lists what a failed run left in a folder (the command line itself
  runs through ``helpers.run_cli``, with a deadline and optionally an address-space limit).
* :class:`FakeSource` connects to ``livemig receive unix:PATH --multifd-channels N`` as a
  QEMU source would (main channel + N multifd connections) and sends what a test tells it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livemig.wire.constants import RamFlag, SectionType
from livemig.wire.multifd import InitPacket, encode_ram_packet
from livemig.wire.stream import (
    encode_configuration,
    encode_file_header,
    encode_footer,
    encode_section_header,
    encode_vmdescription,
)

PS = 4096

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


# --------------------------------------------------------------------------------------------
# An independent walk over a captured stream
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One RAM record: ``pos`` of its word, its flags, page offset, block (``None`` when the
    record CONTINUEs), and where its payload starts."""

    pos: int
    flags: int
    offset: int
    block: str | None
    payload: int
    section_kind: int


@dataclass
class Section:
    kind: int
    pos: int  # the type byte
    section_id: int
    idstr: str
    body: int  # first byte after the header
    footer: int = -1  # the 0x7e byte


@dataclass
class Layout:
    """Positions in a main stream, found without livemig's decoder."""

    size: int
    config: int = -1
    config_end: int = -1
    machine: str = ""
    capabilities: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    commands: list[tuple[int, int, int]] = field(default_factory=list)  # (pos, cmd, len)
    records: list[Record] = field(default_factory=list)
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (name, length, entry pos)
    mem_size: int = -1  # the MEM_SIZE word
    tail: int = -1  # first device (FULL) section, or EOF when there is none
    eof: int = -1
    vmdesc: int = -1  # the 0x06 byte
    json: int = -1

    @property
    def pages(self) -> list[Record]:
        return [r for r in self.records if r.flags & ~RamFlag.CONTINUE == RamFlag.PAGE]

    @property
    def zeros(self) -> list[Record]:
        return [r for r in self.records if r.flags & ~RamFlag.CONTINUE == RamFlag.ZERO]

    def section(self, kind: int, idstr: str = "ram") -> Section:
        return next(s for s in self.sections if s.kind == kind and s.idstr == idstr)


def walk_capture(data: bytes) -> Layout:
    """Find the records of a real QEMU main stream (plain, multifd main channel, mapped-ram).

    Knows only what the captures contain: configuration with a capability list, START /
    PART / END ``ram`` sections, ZERO / PAGE / EOS / MULTIFD_FLUSH / MEM_SIZE records
    (with mapped-ram headers), commands; stops at the first FULL section, then finds EOF
    and the JSON from the end (QEMU's own analyze-migration.py does the same).
    """
    lay = Layout(len(data))
    pos = 8
    assert data[:4] == b"QEVM"
    if data[pos] == SectionType.CONFIGURATION:
        lay.config = pos
        (n,) = _BE32.unpack_from(data, pos + 1)
        lay.machine = data[pos + 5:pos + 5 + n].decode()
        pos += 5 + n
        while data[pos] == SectionType.SUBSECTION:
            ln = data[pos + 1]
            name = data[pos + 2:pos + 2 + ln].decode()
            pos += 2 + ln + 4
            if name == "configuration/capabilities":
                (count,) = _BE32.unpack_from(data, pos)
                pos += 4
                for _ in range(count):
                    ln = data[pos]
                    lay.capabilities.append(data[pos + 1:pos + 1 + ln].decode())
                    pos += 1 + ln
            elif name == "configuration/uuid":
                pos += 16
            else:
                raise AssertionError(f"walk_capture: subsection {name}")
        lay.config_end = pos
    mapped_ram = "mapped-ram" in lay.capabilities
    ids: dict[int, str] = {}
    while True:
        t = data[pos]
        if t == SectionType.COMMAND:
            cmd, ln = struct.unpack_from(">HH", data, pos + 1)
            lay.commands.append((pos, cmd, ln))
            pos += 5 + ln
            continue
        if t in (SectionType.SECTION_FULL, SectionType.EOF):
            lay.tail = pos
            break
        start = pos
        (sid,) = _BE32.unpack_from(data, pos + 1)
        pos += 5
        if t == SectionType.SECTION_START:
            ln = data[pos]
            ids[sid] = data[pos + 1:pos + 1 + ln].decode()
            pos += 1 + ln + 8
        sec = Section(t, start, sid, ids[sid], pos)
        lay.sections.append(sec)
        assert sec.idstr == "ram", sec
        while True:  # RAM records until EOS
            (word,) = _BE64.unpack_from(data, pos)
            flags, offset = word & (PS - 1), word & ~(PS - 1)
            rec_at = pos
            pos += 8
            base = flags & ~RamFlag.CONTINUE
            if base == RamFlag.EOS:
                lay.records.append(Record(rec_at, flags, offset, None, pos, t))
                break
            if base == RamFlag.MULTIFD_FLUSH:
                lay.records.append(Record(rec_at, flags, offset, None, pos, t))
                continue
            if base == RamFlag.MEM_SIZE:
                lay.mem_size = rec_at
                left = offset
                while left:
                    entry = pos
                    ln = data[pos]
                    name = data[pos + 1:pos + 1 + ln].decode()
                    (length,) = _BE64.unpack_from(data, pos + 1 + ln)
                    pos += 1 + ln + 8
                    lay.blocks.append((name, length, entry))
                    left -= length
                    if mapped_ram:
                        # version, page size, bitmap offset, pages offset; the list goes on
                        # after the block's pages
                        (pages_offset,) = _BE64.unpack_from(data, pos + 20)
                        pos = pages_offset + length
                continue
            block = None
            if not flags & RamFlag.CONTINUE:
                ln = data[pos]
                block = data[pos + 1:pos + 1 + ln].decode()
                pos += 1 + ln
            lay.records.append(Record(rec_at, flags, offset, block, pos, t))
            if base == RamFlag.ZERO:
                pos += 1
            elif base == RamFlag.PAGE:
                pos += PS
            else:
                raise AssertionError(f"walk_capture: RAM flags {flags:#x} at {rec_at:#x}")
        assert data[pos] == SectionType.SECTION_FOOTER, hex(pos)
        sec.footer = pos
        pos += 5
    # The tail, from the end: EOF 06 be32(len) JSON, the JSON holds no NUL byte.
    last_nul = data.rfind(b"\x00")
    start = data.find(b"{", last_nul)
    assert data[start - 5] == SectionType.VMDESCRIPTION
    (n,) = _BE32.unpack_from(data, start - 4)
    assert start + n == len(data)
    lay.json, lay.vmdesc, lay.eof = start, start - 5, start - 6
    assert data[lay.eof] == SectionType.EOF
    return lay


# --------------------------------------------------------------------------------------------
# A small valid stream built with livemig's encoders
# --------------------------------------------------------------------------------------------

#: A device section for :func:`build_stream`: ``dev`` instance 0, a be32 and 4 raw bytes.
DEVICE_JSON = {
    "name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
    "fields": [{"name": "a", "type": "uint32", "size": 4},
               {"name": "b", "type": "buffer", "size": 4}],
}


def ram_word(offset: int, flags: int) -> bytes:
    return _BE64.pack(offset | flags)


def block_list(blocks: Sequence[tuple[str, int]], total: int | None = None) -> bytes:
    """MEM_SIZE word + entries; ``total`` overrides the sum (to make it lie)."""
    if total is None:
        total = sum(length for _, length in blocks)
    out = bytearray(_BE64.pack(total | RamFlag.MEM_SIZE))
    for name, length in blocks:
        raw = name.encode()
        out += bytes([len(raw)]) + raw + _BE64.pack(length)
    return bytes(out)


def page_record(block: str | None, offset: int, data: bytes = b"\xaa" * PS) -> bytes:
    """A PAGE record; ``block=None`` makes it CONTINUE."""
    if block is None:
        return ram_word(offset, RamFlag.PAGE | RamFlag.CONTINUE) + data
    return ram_word(offset, RamFlag.PAGE) + bytes([len(block)]) + block.encode() + data


def zero_record(block: str | None, offset: int, fill: int = 0) -> bytes:
    if block is None:
        return ram_word(offset, RamFlag.ZERO | RamFlag.CONTINUE) + bytes([fill])
    return ram_word(offset, RamFlag.ZERO) + bytes([len(block)]) + block.encode() + bytes([fill])


EOS = ram_word(0, RamFlag.EOS)
RAM_ID = 2


def ram_start(blocks: Sequence[tuple[str, int]] = (("pc.ram", 1 << 20),), *,
              body: bytes | None = None, section_id: int = RAM_ID) -> bytes:
    """``START ram`` with its block list, EOS and footer (``body`` replaces list + EOS)."""
    if body is None:
        body = block_list(blocks) + EOS
    return (encode_section_header(SectionType.SECTION_START, section_id, "ram", 0, 4) + body
            + encode_footer(section_id))


def ram_part(body: bytes, kind: int = SectionType.SECTION_PART,
             section_id: int = RAM_ID) -> bytes:
    return encode_section_header(SectionType(kind), section_id) + body + encode_footer(section_id)


def device_section(section_id: int = 10, body: bytes = b"\x00\x00\x00\x01abcd",
                   idstr: str = "dev", footer_id: int | None = None) -> bytes:
    return (encode_section_header(SectionType.SECTION_FULL, section_id, idstr, 0, 1) + body
            + encode_footer(section_id if footer_id is None else footer_id))


def vmdesc_json(devices: Sequence[dict[str, object]] = (DEVICE_JSON,)) -> bytes:
    return json.dumps({"page_size": PS, "devices": list(devices)}).encode()


def build_stream(**parts: bytes) -> bytes:
    """A complete small stream; any named part may be replaced:
    ``header``, ``config``, ``commands``, ``start``, ``part``, ``end``, ``devices``, ``eof``,
    ``vmdesc``."""
    default = {
        "header": encode_file_header(),
        "config": encode_configuration("pc-i440fx-7.2"),
        "commands": b"",
        "start": ram_start(),
        "part": ram_part(page_record("pc.ram", 0) + page_record(None, PS)
                         + page_record(None, 2 * PS) + zero_record(None, 3 * PS)
                         + zero_record(None, 4 * PS) + EOS),
        "end": ram_part(EOS, SectionType.SECTION_END),
        "devices": device_section(),
        "eof": bytes([SectionType.EOF]),
        "vmdesc": encode_vmdescription(vmdesc_json()),
    }
    unknown = set(parts) - set(default)
    if unknown:
        raise TypeError(f"unknown parts {unknown}")
    default.update(parts)
    return b"".join(default[k] for k in ("header", "config", "commands", "start", "part", "end",
                                          "devices", "eof", "vmdesc"))


# --------------------------------------------------------------------------------------------
# Running the command line: helpers.run_cli / start_cli / finish_cli
# --------------------------------------------------------------------------------------------


def leftovers(folder: Path, output_name: str) -> list[str]:
    """The snapshot itself or any of its temporary files (``.NAME.part-PID``)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name == output_name or p.name.startswith(f".{output_name}.part-"))


# --------------------------------------------------------------------------------------------
# A fake source over sockets
# --------------------------------------------------------------------------------------------


def main_prefix(blocks: Sequence[tuple[str, int]] = (("pc.ram", 1 << 20),)) -> bytes:
    """What a source sends first: header, configuration, ``START ram`` and its block list
    (without EOS: the receiver has the layout and waits for more)."""
    return (encode_file_header() + encode_configuration("pc-i440fx-10.0")
            + encode_section_header(SectionType.SECTION_START, RAM_ID, "ram", 0, 4)
            + block_list(blocks))


def init_packet(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    return InitPacket(uuid, channel_id).encode()


def pages_packet(offsets: Sequence[int], *, block: str = "pc.ram", packet_num: int = 1,
                 flags: int = 0) -> bytes:
    """An uncompressed RAM packet header and its page data."""
    hdr = encode_ram_packet(flags=flags, ramblock=block, normal_offsets=list(offsets),
                            zero_offsets=None, packet_num=packet_num,
                            payload_size=len(offsets) * PS)
    return hdr + bytes(len(offsets) * PS)


def patch_be32(packet: bytes, at: int, value: int) -> bytes:
    b = bytearray(packet)
    _BE32.pack_into(b, at, value)
    return bytes(b)


def patch_be64(packet: bytes, at: int, value: int) -> bytes:
    b = bytearray(packet)
    _BE64.pack_into(b, at, value)
    return bytes(b)


# Field positions in a multifd RAM packet header (MultiFDPacket_t)
PKT_FLAGS, PKT_PAGES_ALLOC, PKT_NORMAL_PAGES, PKT_NEXT_SIZE, PKT_ZERO_PAGES = 8, 12, 16, 20, 32
PKT_OFFSETS = 320


class FakeSource:
    """One fake QEMU source: a main channel and ``channels`` multifd connections.

    Connects the main channel first (as 7.2 does), then the multifd connections; every
    socket stays open until :meth:`close` unless a test closes it, so livemig's failure is
    caused by the bytes, not by a hang-up.
    """

    def __init__(self, path: str, channels: int, *, connect_timeout: float = 20.0) -> None:
        self.path = path
        self.main = self._connect(connect_timeout)
        self.chans: list[socket.socket] = []
        for _ in range(channels):
            self.chans.append(self._connect(connect_timeout))

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                s.settimeout(timeout)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def send(self, sock: socket.socket, data: bytes) -> None:
        """Send, ignoring the receiver having hung up already (that is its right)."""
        with contextlib.suppress(OSError):
            sock.sendall(data)

    def send_main(self, data: bytes) -> None:
        self.send(self.main, data)

    def send_chan(self, i: int, data: bytes) -> None:
        self.send(self.chans[i], data)

    def close_chan(self, i: int) -> None:
        self.chans[i].close()

    def close_main(self) -> None:
        self.main.close()

    def close(self) -> None:
        for s in [self.main, *self.chans]:
            with contextlib.suppress(OSError):
                s.close()
