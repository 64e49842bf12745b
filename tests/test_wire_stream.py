"""Tests for livemig.wire.stream (MainStreamDecoder) and livemig.wire.ram (RamDecoder).

Every decoder runs three ways over real QEMU captures (tests/data): the whole input in
one buffer, in small pieces (one byte at a time over the header, the block list, whole
page records, the start of the device state and the end of the JSON; random piece sizes
elsewhere), and with trailing bytes after the JSON. The pieces are handed over the way
the I/O layer does it: a buffer whose valid region ends before the buffer does (the rest
is junk the decoder must not look at), and only unconsumed bytes are kept.

What the events must say is checked against an independent walk of the same bytes
(``hostile_source.walk_capture``) and against the source's ``query-migrate`` counters.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections import Counter
from functools import cache
from typing import Any

import pytest
from hostile_source import (
    EOS,
    Layout,
    block_list,
    build_stream,
    device_section,
    page_record,
    ram_part,
    ram_start,
    ram_word,
    vmdesc_json,
    walk_capture,
    zero_record,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import DATA_DIR, read_capture

from livemig.errors import LimitExceeded, MigrationError, StreamFormatError, TruncatedStream
from livemig.wire.constants import Command, RamFlag, SectionType
from livemig.wire.cursor import Cursor
from livemig.wire.events import (
    CommandRecord,
    Configuration,
    DeviceSection,
    DeviceStateTail,
    EndOfStream,
    FileHeader,
    RamBlockList,
    RamEndOfSection,
    RamMultifdFlush,
    RamPages,
    RamZeroPages,
    SectionFooter,
    SectionHeader,
    Seek,
    VmDescriptionRecord,
)
from livemig.wire.ram import RamDecoder, bitmap_bytes, xbzrle_decode
from livemig.wire.stream import (
    MainStreamDecoder,
    encode_command,
    encode_configuration,
    encode_file_header,
    encode_footer,
    encode_section_header,
    encode_vmdescription,
    find_vmdescription,
    fork_for_tail,
)
from livemig.wire.vmstate import parse_vmdescription

PS = 4096
GARBAGE = b"\x00garbage after the JSON\x00"

#: Main streams: (capture file, query-migrate.json or None, kind)
CAPTURES = {
    "qemu7.2-precopy": ("qemu7.2-precopy.stream", "qemu7.2-precopy.query-migrate.json"),
    "qemu10.0-precopy": ("qemu10.0-precopy.stream", "qemu10.0-precopy.query-migrate.json"),
    "qemu7.2-multifd-main": ("qemu7.2-multifd-none-2ch", None),
    "qemu10.0-multifd-main": ("qemu10.0-multifd-none-2ch", None),
    "qemu10.0-m7.2-multifd-main": ("qemu10.0-m7.2-multifd-none-2ch", None),
    "qemu10.0-mapped-ram": ("qemu10.0-mapped-ram.bin", "qemu10.0-mapped-ram.query-migrate.json"),
}


@cache
def capture(name: str) -> bytes:
    path, _ = CAPTURES[name]
    if (DATA_DIR / path).is_dir():
        # The main channel is the connection that starts with "QEVM" (never rely on order).
        conns = sorted(p.name for p in (DATA_DIR / path).iterdir() if p.name.startswith("conn"))
        mains = [c for c in conns if read_capture(f"{path}/{c}")[:4] == b"QEVM"]
        assert len(mains) == 1, (path, mains)
        return read_capture(f"{path}/{mains[0]}")
    return read_capture(path)


@cache
def layout(name: str) -> Layout:
    return walk_capture(capture(name))


def query_migrate(name: str) -> dict[str, Any] | None:
    qm = CAPTURES[name][1]
    return json.loads((DATA_DIR / qm).read_text()) if qm else None


# --------------------------------------------------------------------------------------------
# Driving the decoder like the I/O layer does
# --------------------------------------------------------------------------------------------

_JUNK = b"\xff" * 8 + struct.pack(">Q", 0x20 | 0x08) * 8  # looks like records, is not data


def flatten(events: list[Any]) -> list[Any]:
    """Events in a form that does not depend on how pages were grouped (one item per page)
    and keeps no view into the decoder's buffer."""
    out: list[Any] = []
    for e in events:
        if isinstance(e, RamPages):
            assert e.data.shape == (len(e.offsets), PS)
            for off, page in zip(e.offsets.tolist(), e.data, strict=True):
                out.append(("page", e.block, off, hashlib.blake2b(page.tobytes(),
                                                                  digest_size=12).digest()))
        elif isinstance(e, RamZeroPages):
            out.extend(("zero", e.block, off, e.fill) for off in e.offsets.tolist())
        else:
            out.append(e)
    return out


class Run:
    """The result of one decoder run over a capture."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.tail_at: int | None = None  # DeviceStateTail.offset
        self.tail_json: tuple[int, int] | None = None  # find_vmdescription on the tail
        self.decoder: MainStreamDecoder | None = None

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


def drive(data: bytes, cuts: list[int] | None = None, *, description: object = None,
          tail_description: object = None, junk: bytes = _JUNK) -> Run:
    """Decode ``data`` handed over in pieces ending at ``cuts`` (None: all at once).

    Without ``description`` the decoder stops at the first device section; the tail is then
    collected until :func:`find_vmdescription` sees a complete JSON, and parsed by
    :func:`fork_for_tail` with that JSON (or with ``tail_description`` if given), as
    ``MainChannelLoader`` does. Raises whatever the decoder raises.
    """
    run = Run()
    dec = MainStreamDecoder(description=description)
    run.decoder = dec
    n = len(data)
    cut_list = [*sorted(set(cuts or [])), n]
    ci = 0
    pos = 0  # stream offset of the first unconsumed byte
    fed = n if cuts is None else 0  # stream offset up to which bytes are "received"
    tail_from: int | None = None
    last_error: StreamFormatError | None = None

    def feed() -> bool:
        nonlocal fed, ci
        while ci < len(cut_list) and cut_list[ci] <= fed:
            ci += 1
        if ci == len(cut_list):
            return False
        fed = cut_list[ci]
        return True

    while True:
        if tail_from is None:
            final = fed == n
            # A receive buffer: valid bytes, then junk the decoder must not read.
            buf = data[pos:fed] + junk
            events, used = dec.parse(memoryview(buf), 0, fed - pos, pos, final=final)
            progressed = used > 0 or bool(events)
            stop = events[-1] if events else None
            run.events += flatten(events)
            del events
            pos += used
            if isinstance(stop, Seek):
                pos = fed = stop.offset
                continue
            if isinstance(stop, DeviceStateTail):
                run.tail_at = stop.offset
                tail_from = stop.offset
                assert pos == stop.offset, "the decoder consumed part of the device state"
                assert dec.waiting_for_description
                continue
            if dec.done:
                assert pos == fed == n
                return run
            if progressed:
                continue
            if not feed():
                raise AssertionError(f"decoder stuck at {pos:#x} in {dec.expecting()}")
        else:
            tail = data[tail_from:fed]
            loc = find_vmdescription(tail) if tail_description is None else (-1, -1, -1)
            if loc is not None:
                desc = tail_description or parse_vmdescription(tail[loc[1]:])
                trial = fork_for_tail(dec, desc)
                try:
                    events, used = trial.parse(tail, 0, len(tail), tail_from, final=fed == n,
                                               max_events=1 << 30)
                except StreamFormatError as e:
                    last_error = e
                else:
                    if trial.done and used == len(tail):
                        if tail_description is None:
                            run.tail_json = (tail_from + loc[0], tail_from + loc[1])
                        run.events += flatten(events)
                        run.decoder = trial
                        assert fed == n, "JSON found before the end of the capture"
                        return run
            if not feed():
                if last_error is not None:
                    raise last_error
                raise TruncatedStream("no complete vmstate description at the end",
                                      offset=fed)


def piece_cuts(name: str, seed: int = 0) -> list[int]:
    """One byte at a time where it matters, random pieces (up to 6 KB) elsewhere."""
    data, lay = capture(name), layout(name)
    n = len(data)
    rng = random.Random(seed)
    cuts: set[int] = set(range(1, min(n, 2048)))
    windows = [(lay.tail, 160), (lay.eof, 40), (n, 200)]
    windows += [(entry, 64) for _, _, entry in lay.blocks]
    named = [r for r in lay.pages if r.block] + [r for r in lay.zeros if r.block]
    for r in named[:2]:
        windows.append((r.pos, 64))
    pages = lay.pages
    if pages:  # a named page record and the CONTINUE record after it, byte by byte
        first = pages[0].pos
        cuts.update(range(first, min(n, first + 2 * (8 + PS) + 16)))
    for at, width in windows:
        cuts.update(range(max(1, at - width), min(n, at + width)))
    p = 2048
    while p < n:
        p += rng.randint(1, 6000)
        cuts.add(min(p, n))
    if lay.blocks and "mapped-ram" in lay.capabilities:
        # pieces restart at every seek target; make sure they are cut there too
        for b in lay.blocks:
            cuts.update(range(b[2], b[2] + 64))
    return sorted(c for c in cuts if 0 < c <= n)


@cache
def whole_run(name: str) -> Run:
    return drive(capture(name))


# --------------------------------------------------------------------------------------------
# The three ways, on every capture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CAPTURES))
def test_capture_whole(name: str) -> None:
    data, lay = capture(name), layout(name)
    run = whole_run(name)
    assert run.decoder is not None and run.decoder.done
    kinds = [type(e).__name__ if not isinstance(e, tuple) else e[0] for e in run.events]
    assert kinds[:2] == ["FileHeader", "Configuration"]
    assert kinds[-2:] == ["EndOfStream", "VmDescriptionRecord"]
    # the events agree with the independent walk
    block_of = _blocks_of(lay)
    assert [(e[1], e[2]) for e in run.events if isinstance(e, tuple) and e[0] == "page"] == \
        [(block_of[id(r)], r.offset) for r in lay.pages]
    assert [(e[1], e[2]) for e in run.events if isinstance(e, tuple) and e[0] == "zero"] == \
        [(block_of[id(r)], r.offset) for r in lay.zeros]
    headers = run.of(SectionHeader)
    assert [(h.kind, h.offset) for h in headers] == [(s.kind, s.pos) for s in lay.sections]
    assert [f.offset for f in run.of(SectionFooter)] == [s.footer for s in lay.sections]
    assert [(c.offset, c.cmd) for c in run.of(CommandRecord)] == \
        [(p, c) for p, c, _ in lay.commands]
    flushes = [r.pos for r in lay.records if r.flags == RamFlag.MULTIFD_FLUSH]
    assert [f.offset for f in run.of(RamMultifdFlush)] == flushes
    eos = [r.pos for r in lay.records if r.flags == RamFlag.EOS]
    assert [e.offset for e in run.of(RamEndOfSection)] == eos
    # the device state begins where the walk found the first FULL section
    assert run.tail_at == lay.tail
    assert data[lay.tail] == SectionType.SECTION_FULL
    assert run.tail_json == (lay.eof, lay.json)
    (eof,) = run.of(EndOfStream)
    assert eof.offset == lay.eof
    (vmdesc,) = run.of(VmDescriptionRecord)
    assert vmdesc.offset == lay.vmdesc and vmdesc.raw_json == data[lay.json:]
    # the device sections tile the tail exactly, each ending with its own footer
    devs = run.of(DeviceSection)
    assert len(devs) == len(json.loads(vmdesc.raw_json)["devices"]) == 30
    at = lay.tail
    for d in devs:
        assert d.header.offset == at and d.raw == data[at:at + len(d.raw)]
        assert d.raw[-5] == SectionType.SECTION_FOOTER
        assert struct.unpack(">I", d.raw[-4:])[0] == d.header.section_id
        assert d.body_offset + d.body_length == len(d.raw) - 5
        at += len(d.raw)
    assert at == lay.eof


def _blocks_of(lay: Layout) -> dict[int, str | None]:
    """The block each record belongs to (CONTINUE = the last named one before it)."""
    out: dict[int, str | None] = {}
    name = None
    for r in lay.records:
        if r.block is not None:
            name = r.block
        out[id(r)] = name
    return out


@pytest.mark.parametrize("name", list(CAPTURES))
def test_capture_in_pieces(name: str) -> None:
    """Byte by byte where records begin and end, random pieces elsewhere: same events,
    same offsets, same page data as the whole input."""
    cuts = piece_cuts(name)
    assert len(cuts) > 2000
    run = drive(capture(name), cuts)
    assert run.decoder is not None and run.decoder.done
    assert run.events == whole_run(name).events
    assert run.tail_at == whole_run(name).tail_at


@pytest.mark.parametrize("name", list(CAPTURES))
def test_capture_trailing_garbage(name: str) -> None:
    """After the JSON nothing may follow: the decoder reports the extra bytes."""
    data = capture(name)
    lay = layout(name)
    desc = parse_vmdescription(data[lay.json:])
    with pytest.raises(StreamFormatError, match="garbage after the end") as ei:
        drive(data + GARBAGE, tail_description=desc, cuts=[lay.json + 1, len(data) + 1])
    assert ei.value.offset == len(data)
    # ... and the same with the description known from the start (no DeviceStateTail)
    with pytest.raises(StreamFormatError, match="garbage after the end") as ei:
        drive(data + GARBAGE, description=desc)
    assert ei.value.offset == len(data)
    assert f"{len(GARBAGE)} bytes" in str(ei.value)


@pytest.mark.parametrize("name", ["qemu7.2-precopy", "qemu10.0-mapped-ram"])
def test_capture_with_description_from_the_start(name: str) -> None:
    """A decoder that has the description splits device sections as they arrive, also
    one byte at a time (a device section cut anywhere is "not enough bytes yet")."""
    data, lay = capture(name), layout(name)
    desc = parse_vmdescription(data[lay.json:])
    whole = drive(data, description=desc)
    assert whole.tail_at is None
    cuts = piece_cuts(name) + list(range(lay.tail, lay.eof + 8))
    # (no junk after the valid bytes: see test_device_section_split_reads_past_the_buffer_end)
    pieces = drive(data, cuts, description=desc, junk=b"")
    assert pieces.events == whole.events
    assert [e for e in whole.events if not isinstance(e, DeviceStateTail)] == \
        [e for e in whole_run(name).events if not isinstance(e, DeviceStateTail)]


SUB_DEVICE = {
    "name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
    "fields": [{"name": "a", "type": "uint32", "size": 4}],
    "subsections": [{"vmsd_name": "dev/sub", "version": 1,
                     "fields": [{"name": "b", "type": "uint8", "size": 1}]}],
}
SUB_BODY = b"\x00\x00\x00\x01" + b"\x05\x07dev/sub\x00\x00\x00\x01" + b"\x2a"


def test_device_section_split_reads_past_the_buffer_end() -> None:
    raw_json = vmdesc_json([SUB_DEVICE])
    s = build_stream(devices=device_section(body=SUB_BODY), vmdesc=encode_vmdescription(raw_json))
    desc = parse_vmdescription(raw_json)
    dev_at = s.index(b"\x04\x00\x00\x00\x0a\x03dev")
    cut = dev_at + 17 + 4  # the section header and field a have arrived, the subsection not
    # A buffer exactly as long as the valid bytes: "not enough bytes yet", as it should be.
    dec = MainStreamDecoder(description=desc)
    _events, used = dec.parse(s[:cut], 0, cut, 0)
    assert used == dev_at
    # The same valid bytes in a larger receive buffer whose rest is old data.
    dec = MainStreamDecoder(description=desc)
    _events, used = dec.parse(s[:cut] + b"\xff" * 64, 0, cut, 0)
    assert used == dev_at


# --------------------------------------------------------------------------------------------
# Counts against the source's own account
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qemu7.2-precopy", "qemu10.0-precopy"])
def test_precopy_counts_match_query_migrate(name: str) -> None:
    qm = query_migrate(name)
    assert qm is not None
    run = whole_run(name)
    pages = [e for e in run.events if isinstance(e, tuple) and e[0] == "page"]
    zeros = [e for e in run.events if isinstance(e, tuple) and e[0] == "zero"]
    assert len(pages) == qm["ram"]["normal"]
    assert len(zeros) == qm["ram"]["duplicate"]
    (blocks,) = run.of(RamBlockList)
    assert blocks.total == qm["ram"]["total"] == sum(b.length for b in blocks.blocks)
    assert run.decoder is not None
    assert run.decoder.ram.page_records == len(pages)
    assert run.decoder.ram.zero_records == len(zeros)
    # every page of every block was sent exactly once (a paused guest, one pass)
    sent = Counter((e[1], e[2]) for e in pages + zeros)
    assert max(sent.values()) == 1
    assert len(sent) == blocks.total // PS


def test_multifd_main_channels_carry_zero_pages_only_in_legacy_mode() -> None:
    for name, zeros in [("qemu7.2-multifd-main", 8193), ("qemu10.0-m7.2-multifd-main", 8192),
                        ("qemu10.0-multifd-main", 0)]:
        run = whole_run(name)
        assert not [e for e in run.events if isinstance(e, tuple) and e[0] == "page"], name
        assert len([e for e in run.events if isinstance(e, tuple) and e[0] == "zero"]) == zeros
    # 10.0 with a 10.0 machine: MULTIFD_FLUSH in START, the first-pass PART and END
    assert len(whole_run("qemu10.0-multifd-main").of(RamMultifdFlush)) == 3
    assert not whole_run("qemu10.0-m7.2-multifd-main").of(RamMultifdFlush)


def test_mapped_ram_seeks_and_block_headers() -> None:
    name = "qemu10.0-mapped-ram"
    data, lay = capture(name), layout(name)
    run = whole_run(name)
    (cfg,) = run.of(Configuration)
    assert cfg.capabilities == ("mapped-ram",)
    (blocks,) = run.of(RamBlockList)
    seeks = run.of(Seek)
    assert len(seeks) == len(blocks.blocks) == len(lay.blocks) == 6
    assert not [e for e in run.events if isinstance(e, tuple)], "no page records with mapped-ram"
    for info, seek, (name_, length, entry) in zip(blocks.blocks, seeks, lay.blocks, strict=True):
        hdr = info.mapped_ram
        assert hdr is not None and (info.name, info.length) == (name_, length)
        assert hdr.version == 1 and hdr.page_size == PS
        entry_end = entry + 1 + len(info.name) + 8
        assert data[entry_end:entry_end + 28] == struct.pack(
            ">IQQQ", hdr.version, hdr.page_size, hdr.bitmap_offset, hdr.pages_offset)
        assert hdr.bitmap_offset == entry_end + 28
        assert hdr.pages_offset % (1 << 20) == 0
        assert hdr.bitmap_offset + bitmap_bytes(length // PS) <= hdr.pages_offset
        assert seek.offset == hdr.pages_offset + length
    # each seek lands on the next entry; the last one on the rest of the START section
    assert [s.offset for s in seeks[:-1]] == [e for _, _, e in lay.blocks[1:]]
    start = lay.section(SectionType.SECTION_START)
    assert data[seeks[-1].offset:seeks[-1].offset + 8] == EOS
    assert start.footer == seeks[-1].offset + 8
    # the RAM sections hold nothing but the list and EOS
    assert [r.flags for r in lay.records] == [RamFlag.EOS] * 3


def test_decoder_without_configuration_and_stream_ending_after_eof() -> None:
    """The configuration is optional (send-configuration=off); a stream without device
    sections that ends right after EOF is complete (QEMU only warns)."""
    s = encode_file_header() + ram_start() + bytes([SectionType.EOF])
    dec = MainStreamDecoder()
    events, used = dec.parse(s, 0, len(s), 0, final=True)
    assert used == len(s) and dec.done
    assert [type(e) for e in events] == [FileHeader, SectionHeader, RamBlockList,
                                         RamEndOfSection, SectionFooter, EndOfStream]


def test_tail_wait_ignores_bytes_until_description() -> None:
    s = build_stream()
    dec = MainStreamDecoder()
    events, used = dec.parse(s, 0, len(s), 0, final=True)
    (tail,) = [e for e in events if isinstance(e, DeviceStateTail)]
    assert used == tail.offset and dec.waiting_for_description
    assert dec.parse(s, used, len(s), 0, final=True) == ([], used)
    with pytest.raises(StreamFormatError):
        fork_for_tail(MainStreamDecoder(), None)
    # the fork leaves the original waiting; a wrong description does not poison it
    bad = parse_vmdescription(vmdesc_json([{**_dev(), "fields": [
        {"name": "a", "type": "uint32", "size": 4}]}]))
    trial = fork_for_tail(dec, bad)
    with pytest.raises(StreamFormatError, match="no footer"):
        trial.parse(s, used, len(s), 0, final=True)
    good = fork_for_tail(dec, parse_vmdescription(vmdesc_json()))
    events, end = good.parse(s, used, len(s), 0, final=True, max_events=1 << 30)
    assert end == len(s) and good.done
    assert [type(e) for e in events] == [DeviceSection, EndOfStream, VmDescriptionRecord]
    dec.provide_description(parse_vmdescription(vmdesc_json()))
    events2, end2 = dec.parse(s, used, len(s), 0, final=True, max_events=1 << 30)
    assert events2 == events and end2 == end


def _dev() -> dict[str, Any]:
    from hostile_source import DEVICE_JSON
    return dict(DEVICE_JSON)


def test_decoder_is_poisoned_after_an_error() -> None:
    s = bytearray(build_stream())
    s[4:8] = struct.pack(">I", 4)
    dec = MainStreamDecoder()
    with pytest.raises(StreamFormatError, match="unsupported stream version 4") as first:
        dec.parse(s, 0, len(s), 0)
    with pytest.raises(StreamFormatError) as again:
        dec.parse(build_stream(), 0, 10, 0)
    assert again.value is first.value


# --------------------------------------------------------------------------------------------
# Encoders round trip
# --------------------------------------------------------------------------------------------


def _decode_all(s: bytes, **kw: Any) -> list[Any]:
    dec = MainStreamDecoder(**kw)
    events, used = dec.parse(s, 0, len(s), 0, final=True, max_events=1 << 20)
    assert used == len(s)
    return events


def test_configuration_bytes_match_the_spec() -> None:
    # stream.md §3, captured from QEMU 7.2 (-uuid / x-ignore-shared) and 10.0 (two caps)
    assert encode_configuration("pc-i440fx-7.2", uuid=bytes.fromhex(
        "12345678123456789abcdef012345678")) == (
        b"\x07\x00\x00\x00\x0dpc-i440fx-7.2\x05\x12configuration/uuid\x00\x00\x00\x01"
        + bytes.fromhex("12345678123456789abcdef012345678"))
    assert encode_configuration("pc-i440fx-7.2", ("x-ignore-shared",)) == (
        b"\x07\x00\x00\x00\x0dpc-i440fx-7.2\x05\x1aconfiguration/capabilities"
        b"\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared")
    assert encode_configuration("pc-i440fx-10.0", ("x-ignore-shared", "mapped-ram")).endswith(
        b"\x00\x00\x00\x01\x00\x00\x00\x02\x0fx-ignore-shared\x0amapped-ram")


@settings(max_examples=150, deadline=None)
@given(machine=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                       max_size=64),
       caps=st.lists(st.sampled_from(["x-ignore-shared", "mapped-ram"]), unique=True),
       uuid=st.none() | st.binary(min_size=16, max_size=16))
def test_configuration_round_trip(machine: str, caps: list[str], uuid: bytes | None) -> None:
    raw = encode_configuration(machine, tuple(caps), uuid)
    s = encode_file_header() + raw + bytes([SectionType.EOF])
    events = _decode_all(s)
    assert events[0] == FileHeader(3, 0)
    cfg = events[1]
    assert cfg == Configuration(machine, tuple(caps), uuid, None, raw)
    assert isinstance(events[2], EndOfStream) and events[2].offset == 8 + len(raw)


def test_configuration_subsections() -> None:
    def cfg(*subs: tuple[str, int, bytes]) -> bytes:
        out = b"\x07" + struct.pack(">I", 14) + b"pc-i440fx-10.0"
        for name, version, body in subs:
            out += b"\x05" + bytes([len(name)]) + name.encode() + struct.pack(">I", version) + body
        return encode_file_header() + out + b"\x00"

    caps = ("configuration/capabilities", 1, struct.pack(">I", 1) + b"\x0amapped-ram")
    uuid = ("configuration/uuid", 1, bytes(range(16)))
    bits = ("configuration/target-page-bits", 1, struct.pack(">I", 12))
    c = _decode_all(cfg(caps, uuid, bits))[1]
    assert (c.capabilities, c.uuid, c.target_page_bits) == (("mapped-ram",), bytes(range(16)), 12)
    dec = MainStreamDecoder()
    s = cfg(caps)
    dec.parse(s, 0, len(s), 0)
    assert dec.ram.mapped_ram and not dec.ram.ignore_shared
    bad = [
        (cfg(uuid, uuid), "twice"),
        (cfg(("configuration/uuid", 2, bytes(16))), "version 2"),
        (cfg(("configuration/colours", 1, b"")), "unknown configuration subsection"),
        (cfg(("configuration/capabilities", 1, struct.pack(">I", 1) + b"\x08postcopy")),
         "unknown validated capability 'postcopy'"),
        (cfg(("configuration/capabilities", 1, struct.pack(">I", 65))),
         "capability count 65 exceeds the limit 64"),
        (cfg(("configuration/target-page-bits", 1, struct.pack(">I", 16))),
         "target page bits 16"),
        (encode_file_header() + b"\x07" + struct.pack(">I", 1 << 31) + b"pc", "machine type name"),
        (encode_file_header() + b"\x07\x00\x00\x00\x02p\xe9\x00", "not ASCII"),
    ]
    for s, match in bad:
        with pytest.raises(StreamFormatError, match=match):
            MainStreamDecoder().parse(s, 0, len(s), 0, final=True)


@settings(max_examples=100, deadline=None)
@given(sid=st.integers(0, 2**32 - 1), instance=st.integers(0, 2**32 - 1),
       version=st.integers(0, 2**32 - 1),
       idstr=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1,
                     max_size=255).filter(lambda s: s != "ram"),
       ping=st.integers(0, 2**32 - 1))
def test_section_and_command_encoders_round_trip(sid: int, instance: int, version: int,
                                                 idstr: str, ping: int) -> None:
    ram_id = (sid + 1) % 2**32
    body = b"\x00\x00\x00\x2a" + b"wxyz"
    dev = {"name": idstr, "instance_id": instance, "vmsd_name": "d", "version": 1,
           "fields": [{"name": "a", "type": "uint32", "size": 4},
                      {"name": "b", "type": "buffer", "size": 4}]}
    raw_json = json.dumps({"page_size": PS, "devices": [dev]}).encode()
    full = (encode_section_header(SectionType.SECTION_FULL, sid, idstr, instance, version)
            + body + encode_footer(sid))
    s = (encode_file_header()
         + encode_command(Command.OPEN_RETURN_PATH) + encode_command(Command.PING,
                                                                     struct.pack(">I", ping))
         + encode_section_header(SectionType.SECTION_START, ram_id, "ram", 0, 4)
         + block_list([("pc.ram", PS)]) + EOS + encode_footer(ram_id)
         + encode_section_header(SectionType.SECTION_END, ram_id) + EOS + encode_footer(ram_id)
         + encode_command(Command.SWITCHOVER_START)
         + full + b"\x00" + encode_vmdescription(raw_json))
    events = _decode_all(s, description=parse_vmdescription(raw_json))
    cmds = [e for e in events if isinstance(e, CommandRecord)]
    assert [(c.cmd, c.data) for c in cmds] == [
        (Command.OPEN_RETURN_PATH, b""), (Command.PING, struct.pack(">I", ping)),
        (Command.SWITCHOVER_START, b"")]
    hdrs = [e for e in events if isinstance(e, SectionHeader)]
    assert [(h.kind, h.section_id, h.idstr) for h in hdrs] == [
        (SectionType.SECTION_START, ram_id, "ram"), (SectionType.SECTION_END, ram_id, "ram")]
    (d,) = [e for e in events if isinstance(e, DeviceSection)]
    assert d.raw == full
    assert (d.header.section_id, d.header.idstr, d.header.instance_id, d.header.version_id) == (
        sid, idstr, instance, version)
    assert full[d.body_offset:d.body_offset + d.body_length] == body
    assert events[-1] == VmDescriptionRecord(raw_json, len(s) - len(raw_json) - 5)


def test_find_vmdescription() -> None:
    s = build_stream()
    raw = vmdesc_json()
    assert find_vmdescription(s) == (len(s) - len(raw) - 6, len(s) - len(raw), len(s))
    # once the input ended, a description followed by other bytes is found too
    assert find_vmdescription(s + b"xyz", exact=False) == (len(s) - len(raw) - 6,
                                                          len(s) - len(raw), len(s))
    assert find_vmdescription(s[:-1]) is None
    assert find_vmdescription(s + b"}") is None
    assert find_vmdescription(b"") is None
    # a length that does not reach the end exactly is not a description
    bad = bytearray(s)
    struct.pack_into(">I", bad, len(s) - len(raw) - 4, len(raw) + 1)
    assert find_vmdescription(bytes(bad)) is None


# --------------------------------------------------------------------------------------------
# RamDecoder: fast path (runs of CONTINUE records) vs one record at a time
# --------------------------------------------------------------------------------------------

BLOCKS = [("pc.ram", 64 * PS), ("pc.bios", 4 * PS), ("/rom@etc/acpi/tables", 2 * PS)]


def _start_decoder() -> RamDecoder:
    dec = RamDecoder()
    body = block_list(BLOCKS) + EOS
    out: list[Any] = []
    assert dec.parse_body(Cursor(body), SectionType.SECTION_START, out)
    assert [type(e) for e in out] == [RamBlockList, RamEndOfSection]
    return dec


@st.composite
def ram_bodies(draw: st.DrawFn) -> tuple[bytes, list[int], list[Any], tuple[int, str] | None]:
    """A PART body from a record factory, the record boundaries, and what a correct decoder
    reports: the flattened pages, or (offset, message) of the first error."""
    n = draw(st.integers(1, 40))
    out = bytearray()
    bounds = []
    expect: list[Any] = []
    error = None
    last: str | None = None
    shape = draw(st.sampled_from(["page-runs", "zero-runs", "mixed"]))
    for _ in range(n):
        kind = {"page-runs": "page", "zero-runs": "zero"}.get(shape) or draw(
            st.sampled_from(["page", "zero"]))
        cont = last is not None and draw(st.integers(0, 9)) > 0  # mostly CONTINUE runs
        block = last if cont else draw(st.sampled_from([b for b, _ in BLOCKS]))
        assert block is not None
        length = dict(BLOCKS)[block]
        # now and then one page past the end of the block
        page = draw(st.integers(0, length // PS - 1) | st.just(length // PS)) \
            if draw(st.integers(0, 30)) == 0 else draw(st.integers(0, length // PS - 1))
        offset = page * PS
        at = len(out)
        bounds.append(at)
        if kind == "page":
            data = bytes([draw(st.integers(0, 255))]) * 7 + bytes([len(out) % 251]) * (PS - 7)
            out += page_record(None if cont else block, offset, data)
            item = ("page", block, offset, hashlib.blake2b(data, digest_size=12).digest())
        else:
            fill = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0x5A]))
            out += zero_record(None if cont else block, offset, fill)
            item = ("zero", block, offset, fill)
        last = block
        if error is None:
            if offset + PS > length:
                error = (at, f"page offset {offset:#x} beyond block {block}")
            else:
                expect.append(item)
    bounds.append(len(out))
    out += EOS
    bounds.append(len(out))
    return bytes(out), bounds, expect, error


def _parse_ram(body: bytes, ends: list[int]) -> tuple[list[Any], tuple[int, str] | None]:
    """Feed ``body`` to a fresh decoder with the valid region ending at each of ``ends``."""
    dec = _start_decoder()
    items: list[Any] = []
    pos = 0
    try:
        for end in ends:
            while True:
                out: list[Any] = []
                buf = body[:end] + _JUNK
                cur = Cursor(memoryview(buf), pos, end, 0)
                done = dec.parse_body(cur, SectionType.SECTION_PART, out)
                items += flatten([e for e in out if isinstance(e, (RamPages, RamZeroPages))])
                del out
                progressed = cur.pos != pos
                pos = cur.pos
                if done:
                    assert pos == len(body)
                    return items, None
                if not progressed:
                    break
    except StreamFormatError as e:
        assert e.offset is not None
        return items, (e.offset, e.message)
    raise AssertionError("no EOS")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ram_bodies())
def test_ram_fast_path_equals_record_at_a_time(case: Any) -> None:
    body, bounds, expect, error = case
    whole_items, whole_err = _parse_ram(body, [len(body)])
    one_items, one_err = _parse_ram(body, bounds[1:])
    if error is None:
        assert whole_err is None and one_err is None
        assert whole_items == one_items == expect
    else:
        assert whole_err is not None and one_err is not None
        assert whole_err[0] == one_err[0] == error[0]
        assert error[1] in whole_err[1] and error[1] in one_err[1]
        # whatever was reported before the bad record is right
        assert one_items == expect
        assert whole_items == expect[:len(whole_items)]


def test_ram_fast_path_is_taken_and_stops_at_a_different_record() -> None:
    """A long CONTINUE run becomes one event with a strided view into the buffer; a run is
    broken by a named record, a non-zero fill, and a different record shape."""
    body = (page_record("pc.ram", 0) + b"".join(page_record(None, i * PS) for i in range(1, 9))
            + zero_record(None, 9 * PS) + zero_record(None, 10 * PS)
            + zero_record(None, 11 * PS, fill=7) + zero_record(None, 12 * PS)
            + zero_record(None, 13 * PS) + page_record("pc.bios", 0) + EOS)
    dec = _start_decoder()
    out: list[Any] = []
    assert dec.parse_body(Cursor(body), SectionType.SECTION_PART, out)
    shapes = [(type(e).__name__, e.block, e.offsets.tolist()) for e in out
              if isinstance(e, (RamPages, RamZeroPages))]
    assert shapes == [
        ("RamPages", "pc.ram", [0]),
        ("RamPages", "pc.ram", [i * PS for i in range(1, 9)]),
        ("RamZeroPages", "pc.ram", [9 * PS, 10 * PS]),
        ("RamZeroPages", "pc.ram", [11 * PS]),
        ("RamZeroPages", "pc.ram", [12 * PS, 13 * PS]),
        ("RamPages", "pc.bios", [0]),
    ]
    run = out[1]
    assert isinstance(run, RamPages) and not run.data.flags.c_contiguous
    assert run.data.base is not None  # a view, not a copy
    assert [e.fill for e in out if isinstance(e, RamZeroPages)] == [0, 7, 0]
    assert (dec.page_records, dec.zero_records) == (10, 5)


def test_ram_record_errors() -> None:
    def parse(body: bytes, *, kind: SectionType = SectionType.SECTION_PART,
              dec: RamDecoder | None = None) -> None:
        d = dec or _start_decoder()
        d.parse_body(Cursor(body + EOS), kind, [])

    cases = [
        (ram_word(0, RamFlag.PAGE | RamFlag.CONTINUE) + bytes(PS), "CONTINUE before any block",
         RamDecoder()),
        (page_record("nope", 0), "unknown block 'nope'", None),
        (ram_word(0, 0x400), "unknown RAM flags", None),
        (ram_word(0, RamFlag.FULL), "unknown RAM flags FULL", None),
        (ram_word(0, RamFlag.HOOK), "HOOK", None),
        (ram_word(0, RamFlag.PAGE | RamFlag.ZERO), "unknown combination", None),
        (ram_word(0, RamFlag.MEM_SIZE), "second RAM block list", None),
        (ram_word(0, RamFlag.XBZRLE) + b"\x06pc.ram\x02\x00\x10", "encoding flag 0x2", None),
        (ram_word(0, RamFlag.XBZRLE) + b"\x06pc.ram\x01\x10\x01", "XBZRLE length 4097", None),
        (ram_word(0, RamFlag.COMPRESS_PAGE) + b"\x06pc.ram" + struct.pack(">I", 1 << 30),
         "compressed page length", None),
        (page_record("pc.bios", 4 * PS), "page offset 0x4000 beyond block pc.bios", None),
    ]
    for body, match, dec in cases:
        with pytest.raises(StreamFormatError, match=match):
            parse(body, dec=dec)


def test_ram_block_list_errors() -> None:
    def parse(body: bytes) -> list[Any]:
        out: list[Any] = []
        RamDecoder().parse_body(Cursor(body), SectionType.SECTION_START, out)
        return out

    assert isinstance(parse(block_list(BLOCKS) + EOS)[0], RamBlockList)
    for body, cls, match in [
        (block_list([("pc.ram", PS), ("pc.ram", PS)]), StreamFormatError, "listed twice"),
        (block_list([("pc.ram", 1 << 60)], total=PS), LimitExceeded, "exceeds the limit"),
        (block_list([("pc.ram", 2 * PS)], total=PS), StreamFormatError, "left of the list"),
        (block_list([("pc.ram", PS)], total=1 << 60), LimitExceeded, "RAM total size"),
        (block_list([("pc.ram", PS + 1)], total=2 * PS), StreamFormatError, "multiple of"),
        (block_list([("pc.ram", PS)], total=2 * PS) + EOS, StreamFormatError, "empty name"),
        (block_list([("", PS)]), StreamFormatError, "empty name"),
    ]:
        with pytest.raises(cls, match=match):
            parse(body)


# --------------------------------------------------------------------------------------------
# XBZRLE
# --------------------------------------------------------------------------------------------


def _uleb(n: int) -> bytes:
    assert 0 <= n <= 0x3FFF
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


def xbzrle_encode(old: bytes, new: bytes) -> bytes:
    """A plain encoder: (unchanged run, changed run + its bytes) pairs, trailing unchanged
    bytes left out (migration/xbzrle.c's format, without its word-at-a-time tricks)."""
    assert len(old) == len(new)
    out = bytearray()
    i, n = 0, len(new)
    while i < n:
        z = i
        while z < n and old[z] == new[z]:
            z += 1
        if z == n:
            break
        nz = z
        while nz < n and old[nz] != new[nz]:
            nz += 1
        out += _uleb(z - i) + _uleb(nz - z) + new[z:nz]
        i = nz
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(seed=st.none() | st.integers(0, 2**32 - 1),
       edits=st.lists(st.tuples(st.integers(0, PS - 1), st.binary(min_size=1, max_size=300)),
                      max_size=12))
def test_xbzrle_round_trip(seed: int | None, edits: list[tuple[int, bytes]]) -> None:
    old = bytes(PS) if seed is None else random.Random(seed).randbytes(PS)
    new = bytearray(old)
    for at, data in edits:
        chunk = data[:PS - at]
        new[at:at + len(chunk)] = chunk
    enc = xbzrle_encode(old, bytes(new))
    page = bytearray(old)
    xbzrle_decode(enc, page)
    assert page == new
    page = bytearray(old)
    xbzrle_decode(memoryview(enc), memoryview(page))
    assert page == new


def test_xbzrle_whole_page_and_long_counts() -> None:
    old, new = bytes(PS), bytes([1]) * PS
    enc = xbzrle_encode(old, new)
    assert enc[:3] == b"\x00\x80\x20"  # zrun 0, nzrun 4096 as two ULEB128 bytes
    page = bytearray(old)
    xbzrle_decode(enc, page)
    assert page == new


@pytest.mark.parametrize(("enc", "match"), [
    (b"\x05", "truncated pair"),
    (b"\x00\x01", "literal run overruns"),
    (b"\x00\x01a\x00\x01b", "empty zero run"),
    (b"\x01\x00", "empty literal run"),
    (b"\x80\x80\x01", "longer than 2 bytes"),
    (b"\x81", "truncated"),
    (b"\x81\x40\x01a", "zero run overruns"),
    (b"\x00\x81\x40" + bytes(PS), "literal run overruns"),
])
def test_xbzrle_rejects(enc: bytes, match: str) -> None:
    with pytest.raises(StreamFormatError, match=match):
        xbzrle_decode(enc, bytearray(PS))


# --------------------------------------------------------------------------------------------
# Small streams: every record type the decoder must refuse, with the offset it names
# --------------------------------------------------------------------------------------------


def _fail(s: bytes, **kw: Any) -> StreamFormatError:
    def parse_all(dec: MainStreamDecoder) -> None:
        pos = 0
        for _ in range(100):
            events, pos = dec.parse(s, pos, len(s), 0, final=True, max_events=1 << 20)
            tail = [e for e in events if isinstance(e, DeviceStateTail)]
            if tail:
                dec = fork_for_tail(dec, parse_vmdescription(vmdesc_json()))

    dec = MainStreamDecoder(**kw)
    with pytest.raises(StreamFormatError) as ei:
        parse_all(dec)
    assert isinstance(ei.value, MigrationError)
    return ei.value


def test_refusals_name_the_offset() -> None:
    good = build_stream()
    hdr = len(encode_file_header())
    cfg_end = hdr + len(encode_configuration("pc-i440fx-7.2"))
    ram_end = cfg_end + len(ram_start())
    cases = [
        (b"QEVX" + good[4:], 0, "bad magic"),
        (good[:4] + struct.pack(">I", 2) + good[8:], 0, "version 2 is obsolete"),
        (good[:4] + struct.pack(">I", 4) + good[8:], 4, "unsupported stream version 4"),
        (good[:cfg_end] + b"\x09" + good[cfg_end:], cfg_end, "unknown record type 0x09"),
        (good[:ram_end] + b"\x05" + good[ram_end:], ram_end, "SUBSECTION (0x05) is not allowed"),
        (good[:cfg_end] + b"\x07" + good[cfg_end:], cfg_end, "CONFIGURATION"),
        (good[:cfg_end] + encode_command(Command.PING) + good[cfg_end:], cfg_end,
         "PING with length 0"),
        (good[:cfg_end] + struct.pack(">BHH", 8, 12, 0) + good[cfg_end:], cfg_end,
         "unknown command 12"),
        (good[:cfg_end] + struct.pack(">BHH", 8, 0, 0) + good[cfg_end:], cfg_end,
         "unknown command 0"),
        (good[:cfg_end] + encode_command(Command.POSTCOPY_LISTEN) + good[cfg_end:], cfg_end,
         "postcopy"),
        (good[:cfg_end] + ram_part(EOS) + good[cfg_end:], cfg_end, "unknown section id 2"),
        (good[:cfg_end] + encode_section_header(SectionType.SECTION_START, 7, "block", 0, 1)
         + good[cfg_end:], cfg_end, "iterable section 'block'"),
        (good[:cfg_end] + encode_section_header(SectionType.SECTION_FULL, 7, "ram", 0, 4)
         + good[cfg_end:], cfg_end, "must be iterable"),
        (good[:cfg_end] + encode_section_header(SectionType.SECTION_START, 7, "ram", 0, 3)
         + good[cfg_end:], cfg_end, "version 3"),
    ]
    for s, at, match in cases:
        e = _fail(s)
        assert match in e.message, (match, e)
        assert e.offset == at, (match, e.offset, at)


def test_refusals_in_sections() -> None:
    start = ram_start()
    ok_part = ram_part(page_record("pc.ram", 0) + EOS)
    base = encode_file_header() + encode_configuration("pc-i440fx-7.2")
    at = len(base) + len(start)
    e = _fail(build_stream(start=start + encode_section_header(SectionType.SECTION_START, 3,
                                                                "ram", 0, 4) + block_list(
        [("pc.ram", PS)]) + EOS + encode_footer(3)))
    assert "second ram START" in e.message and e.offset == at
    e = _fail(build_stream(part=ok_part[:-4] + struct.pack(">I", 9)))
    assert "footer section id 9" in e.message and e.offset == at + len(ok_part) - 5
    e = _fail(build_stream(part=ok_part[:-5] + b"\x7f" + ok_part[-4:]))
    assert "expected section footer 0x7e" in e.message and e.offset == at + len(ok_part) - 5
    e = _fail(build_stream(devices=device_section(footer_id=11)))
    assert "no footer for section id 10" in e.message
    e = _fail(build_stream(devices=device_section(idstr="other")))
    assert "not in the vmstate description" in e.message
    e = _fail(build_stream(devices=device_section() + device_section()))
    assert "used twice" in e.message
    e = _fail(build_stream(eof=b"\x00\x07"))
    assert "expected the vmstate description (0x06)" in e.message
    e = _fail(build_stream(vmdesc=b"\x06" + struct.pack(">I", (64 << 20) + 1) + b"{}"))
    assert isinstance(e, LimitExceeded) and "vmstate description length" in e.message
    e = _fail(build_stream(vmdesc=b"\x06\x00\x00\x00\x10{}"))
    assert isinstance(e, TruncatedStream)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_vmdescription_scanner_matches_the_one_shot_search(data: st.DataObject) -> None:
    """Fed a tail piece by piece, the scanner answers what ``find_vmdescription`` answers
    for the whole tail so far, and searches each byte once."""
    from livemig.wire.stream import VmDescriptionScanner, find_vmdescription

    body = data.draw(st.binary(max_size=64))
    json_text = data.draw(st.sampled_from([b"{}", b'{"a": 1}', b"}", b"{\x00}"]))
    tail = body + b"\x00" + encode_vmdescription(json_text)
    tail += data.draw(st.binary(max_size=8))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(tail)), max_size=8)))
    scanner = VmDescriptionScanner()
    buf = bytearray()
    for cut in [*cuts, len(tail)]:
        buf += tail[len(buf):max(cut, len(buf))]
        assert scanner.find(buf) == find_vmdescription(bytes(buf))
    assert scanner.bytes_scanned <= len(tail)
