"""Tests for livemig.wire.vmstate: the VMDESCRIPTION codec and the FULL-section walk.

The key acceptance is on real QEMU captures (7.2 and 10.0, pc and q35, paused
32 MiB guests, ``migrate exec:cat > file``): every FULL section walked with its
description must land exactly on its ``0x7E`` footer, and the record walk must
end exactly at the EOF byte in front of the JSON. To get there the test carries
a deliberately small main-stream walker of its own (header, configuration,
section records, RAM records, commands), independent of the library's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import lzma
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.wire.cursor import Cursor, Incomplete
from livemig.wire.vmstate import (
    MAX_DEPTH,
    MAX_SECTION_BYTES,
    Register,
    VmDescription,
    decode_fields,
    describe_sections,
    parse_vmdescription,
    section_body_length,
)

DATA = Path(__file__).parent / "data"
OWN = DATA / "vmstate"

#: Our own captures: (file, QEMU version, machine type).
OWN_CAPTURES = {
    "qemu7.2-pc": "pc-i440fx-7.2",
    "qemu7.2-q35": "pc-q35-7.2",
    "qemu10.0-pc": "pc-i440fx-10.0",
    "qemu10.0-q35": "pc-q35-10.0",
}


def _capture_paths() -> dict[str, Path]:
    paths = {name: OWN / f"{name}.stream.xz" for name in OWN_CAPTURES}
    # The project's shared captures (tests/data/make_captures.py), when present:
    # plain precopy streams and the main channel (conn0) of multifd migrations.
    for path in sorted(DATA.glob("qemu*-precopy.stream*")):
        paths[path.name] = path
    for path in sorted(DATA.glob("qemu*-multifd-*/conn0.bin*")):
        paths[f"{path.parent.name}/{path.name}"] = path
    return paths


CAPTURES = _capture_paths()


@cache
def load(name: str) -> bytes:
    path = CAPTURES[name]
    raw = path.read_bytes()
    return lzma.decompress(raw) if path.suffix == ".xz" else raw


# ---------------------------------------------------------------------------
# A minimal main-stream walker, for the tests only.

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND = range(9)
FOOTER = 0x7E
RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20
RAM_MULTIFD_FLUSH = 0x200
PAGE = 4096


@dataclass
class FullSection:
    section_id: int
    idstr: str
    instance_id: int
    version: int
    body_offset: int
    body_length: int


@dataclass
class Stream:
    data: bytes
    machine: str
    config_body: tuple[int, int]  # offset, length (bytes after the 0x07)
    eof_offset: int
    vmdesc: VmDescription
    full: list[FullSection] = field(default_factory=list)

    def body(self, sec: FullSection) -> bytes:
        return self.data[sec.body_offset:sec.body_offset + sec.body_length]


def locate_vmdesc(data: bytes) -> int:
    """Offset of the EOF byte: the ``00 06 <be32 n>`` whose JSON ends the file."""
    pos = len(data)
    while True:
        pos = data.rfind(b"\x00\x06", 0, pos)
        assert pos >= 0, "no VMDESCRIPTION record"
        if pos + 6 <= len(data):
            (n,) = struct.unpack_from(">I", data, pos + 2)
            if pos + 6 + n == len(data):
                return pos


def walk_configuration(cur: Cursor) -> str:
    name = bytes(cur.take(cur.be32())).decode()
    while cur.peek_u8() == SUBSECTION:
        cur.u8()
        sub = cur.counted_string("subsection")
        assert cur.be32() == 1
        if sub == "configuration/capabilities":
            for _ in range(cur.be32()):
                cur.counted_string("capability")
        elif sub == "configuration/uuid":
            cur.skip(16)
        elif sub == "configuration/target-page-bits":
            cur.be32()
        else:
            raise AssertionError(f"unknown configuration subsection {sub}")
    return name


def walk_ram(cur: Cursor) -> None:
    while True:
        word = cur.be64()
        flags = word & 0xFFF
        assert flags & ~(RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE
                         | RAM_MULTIFD_FLUSH) == 0, hex(flags)
        if flags & RAM_MEM_SIZE:
            total = word & ~0xFFF
            while total:
                cur.counted_string("block")
                total -= cur.be64()
        if flags & (RAM_ZERO | RAM_PAGE):
            if not flags & RAM_CONTINUE:
                cur.counted_string("block")
            cur.skip(1 if flags & RAM_ZERO else PAGE)
        if flags & RAM_EOS:
            return


def split_stream(data: bytes) -> Stream:
    eof = locate_vmdesc(data)
    vmdesc = parse_vmdescription(data[eof + 6:])
    cur = Cursor(data)
    assert cur.be32() == 0x5145564D and cur.be32() == 3
    assert cur.u8() == CONFIG
    config_start = cur.pos
    machine = walk_configuration(cur)
    stream = Stream(data, machine, (config_start, cur.pos - config_start), eof, vmdesc)
    iterable: dict[int, str] = {}
    while True:
        start = cur.pos
        kind = cur.u8()
        if kind == EOF:
            assert start == eof, f"EOF byte at {start:#x}, JSON expects it at {eof:#x}"
            return stream
        if kind == COMMAND:
            cur.be16()
            cur.skip(cur.be16())
            continue
        section_id = cur.be32()
        if kind in (START, FULL):
            idstr = cur.counted_string("idstr")
            instance = cur.be32()
            version = cur.be32()
            if kind == START:
                assert idstr == "ram", idstr
                iterable[section_id] = idstr
                walk_ram(cur)
            else:
                desc = vmdesc.device(idstr, instance)
                assert desc is not None, (idstr, instance)
                n = section_body_length(desc, data, cur.pos)
                stream.full.append(FullSection(section_id, idstr, instance, version,
                                               cur.pos, n))
                cur.skip(n)
        elif kind in (PART, END):
            assert iterable[section_id] == "ram"
            walk_ram(cur)
        else:
            raise AssertionError(f"record type {kind:#x} at {start:#x}")
        at = cur.pos
        assert cur.u8() == FOOTER, f"no footer at {at:#x} (section {section_id})"
        assert cur.be32() == section_id, f"footer at {at:#x} names another section"


@cache
def stream_of(name: str) -> Stream:
    return split_stream(load(name))


def all_sections() -> list[tuple[str, int]]:
    return [(name, i) for name in CAPTURES for i in range(len(stream_of(name).full))]


# ---------------------------------------------------------------------------
# The key acceptance: real captures split exactly.

@pytest.mark.parametrize("name", list(CAPTURES))
def test_walk_lands_on_every_footer_and_ends_at_eof(name: str) -> None:
    stream = stream_of(name)  # asserts footers and the EOF position as it goes
    described = describe_sections(stream.vmdesc)
    on_wire = [(s.idstr, s.instance_id, s.version) for s in stream.full]
    assert on_wire == described
    assert len(on_wire) >= 25
    if name in OWN_CAPTURES:
        assert stream.machine == OWN_CAPTURES[name]


@pytest.mark.parametrize("name", list(CAPTURES))
def test_description_top_level(name: str) -> None:
    stream = stream_of(name)
    desc = stream.vmdesc
    data = stream.data
    assert desc.raw_json == data[stream.eof_offset + 6:]
    assert desc.page_size == 4096
    assert desc.has_configuration == ("qemu10.0" in name)
    assert (desc.configuration is not None) == desc.has_configuration
    timer = desc.device("timer", 0)
    assert timer is not None and timer["vmsd_name"] == "timer"
    assert desc.device("dma", 1) is not None
    assert desc.device("dma", 2) is None
    assert desc.device("ram", 0) is None
    assert len(desc.devices) == len(stream.full)
    assert "devices=" in repr(desc)


@pytest.mark.parametrize("name", [n for n in CAPTURES if "qemu10.0" in n])
def test_configuration_description_walks_configuration_bytes(name: str) -> None:
    stream = stream_of(name)
    config = stream.vmdesc.configuration
    assert config is not None
    offset, length = stream.config_body
    assert section_body_length(config, stream.data, offset) == length
    decoded = decode_fields(config, stream.data[offset:offset + length])
    assert decoded["len"] == len(stream.machine)
    assert decoded["name"] == stream.machine  # a buffer holding text decodes to it


def test_capability_counted_strings_despite_wrong_json_size() -> None:
    """10.0.2 mapped-ram + x-ignore-shared capture: the JSON says 2 x 16 bytes,
    the wire has 16 + 11; the walk reads counted strings."""
    head = (OWN / "qemu10.0-mapped-ram.head.bin").read_bytes()
    raw = lzma.decompress((OWN / "qemu10.0-mapped-ram.vmdesc.json.xz").read_bytes())
    desc = parse_vmdescription(raw)
    config = desc.configuration
    assert config is not None
    caps = config["subsections"][0]["fields"][1]
    assert caps["type"] == "capability" and caps["size"] == 16 and caps["array_len"] == 2
    assert head[8] == CONFIG
    n = section_body_length(config, head, 9)
    assert head[9 + n] == START
    assert decode_fields(config, head[9:9 + n]) == {
        "len": 14,
        "name": "pc-i440fx-10.0",
        "subsections": {
            "configuration/capabilities": {
                "caps_count": 2,
                "capabilities": ["x-ignore-shared", "mapped-ram"],
            },
        },
    }
    # and the same walk one byte at a time
    for cut in range(9, 9 + n):
        with pytest.raises(Incomplete):
            section_body_length(config, head[:cut], 9)


@pytest.mark.parametrize("name", list(CAPTURES))
def test_every_body_whole_and_with_trailing_bytes(name: str) -> None:
    stream = stream_of(name)
    for sec in stream.full:
        desc = stream.vmdesc.device(sec.idstr, sec.instance_id)
        assert desc is not None
        body = stream.body(sec)
        assert section_body_length(desc, body, 0) == len(body)
        assert section_body_length(desc, memoryview(body), 0) == len(body)
        assert section_body_length(desc, body + b"\x7e\xff\xff\xff\xff", 0) == len(body)
        # in place, inside the whole stream, with a stream offset
        assert section_body_length(desc, stream.data, sec.body_offset,
                                   base=123) == len(body)


def _unique_bodies() -> list[tuple[str, dict[str, Any], bytes]]:
    """Every distinct (description, body) pair of all captures (many repeat)."""
    seen: set[tuple[str, bytes]] = set()
    out = []
    for name in CAPTURES:
        stream = stream_of(name)
        for sec in stream.full:
            desc = stream.vmdesc.device(sec.idstr, sec.instance_id)
            assert desc is not None
            key = (json.dumps(desc, sort_keys=True), stream.body(sec))
            if key not in seen:
                seen.add(key)
                out.append((f"{name}:{sec.idstr}", desc, key[1]))
    return out


def test_every_body_one_byte_at_a_time() -> None:
    """Every proper prefix of every body is Incomplete, never a short length."""
    for where, desc, body in _unique_bodies():
        for cut in range(len(body)):
            try:
                n = section_body_length(desc, memoryview(body)[:cut], 0)
            except Incomplete:
                continue
            raise AssertionError(f"{where}: prefix of {cut} bytes walked as {n}")


@pytest.mark.parametrize("name", list(CAPTURES))
def test_decode_every_section(name: str) -> None:
    stream = stream_of(name)
    for sec in stream.full:
        desc = stream.vmdesc.device(sec.idstr, sec.instance_id)
        assert desc is not None
        body = stream.body(sec)
        decoded = decode_fields(desc, body, base=sec.body_offset)
        assert isinstance(decoded, dict)
        json.dumps(decoded)  # plain data, printable by `inspect --fields`
        assert decode_fields(desc, memoryview(body)) == decoded
        with pytest.raises(StreamFormatError, match="after the described fields"):
            decode_fields(desc, body + b"\x00")
        if body:
            with pytest.raises(TruncatedStream):
                decode_fields(desc, body[:-1])


@pytest.mark.parametrize("name", list(CAPTURES))
def test_decoded_values_of_a_paused_guest(name: str) -> None:
    stream = stream_of(name)
    by_name = {(s.idstr, s.instance_id): s for s in stream.full}

    def decoded(idstr: str) -> dict[str, Any]:
        sec = by_name[(idstr, 0)]
        desc = stream.vmdesc.device(idstr, 0)
        assert desc is not None
        return decode_fields(desc, stream.body(sec))

    cpu = decoded("cpu")
    # A guest that never ran sits at the reset vector f000:fff0.
    assert cpu["env.eip"] == 0xFFF0
    regs = cpu["env.regs"]
    assert isinstance(regs, list) and len(regs) == 16
    segs = cpu["env.segs"]
    assert len(segs) == 6 and all(set(s) == {"selector", "base", "limit", "flags"}
                                  for s in segs)
    assert segs[1]["selector"] == 0xF000 and segs[1]["base"] == 0xFFFF0000
    # tmp-typed entries with inline fields decode into dicts
    fpregs = cpu["env.fpregs"]
    assert len(fpregs) == 8 and set(fpregs[0]["tmp"]) == {"tmp_mant", "tmp_exp"}

    timer = decoded("timer")
    assert set(timer) == {"cpu_ticks_offset", "unused", "cpu_clock_offset"}
    assert timer["unused"] == "00" * 8

    glob = decoded("globalstate")
    assert glob["runstate"] in ("prelaunch", "paused")  # text, NUL padding dropped
    assert isinstance(glob["size"], Register) and str(glob["size"]) == hex(glob["size"])

    pckbd = decoded("pckbd")  # a subsection inside a struct field
    assert "pckbd/extended_state" in pckbd["kbd"]["subsections"]


# ---------------------------------------------------------------------------
# Bytes that disagree with the description.

def _device_with_subsections(stream: Stream) -> tuple[FullSection, dict[str, Any]]:
    for sec in stream.full:
        desc = stream.vmdesc.device(sec.idstr, sec.instance_id)
        if desc and desc.get("subsections"):
            return sec, desc
    raise AssertionError("no device with subsections")


@pytest.mark.parametrize("name", list(CAPTURES))
def test_subsection_mismatches(name: str) -> None:
    stream = stream_of(name)
    sec, desc = _device_with_subsections(stream)
    body = stream.body(sec)
    bare = {k: v for k, v in desc.items() if k != "subsections"}
    at = section_body_length(bare, body, 0)
    sub = desc["subsections"][0]
    assert body[at] == SUBSECTION

    wrong = bytearray(body)
    wrong[at] = FOOTER
    with pytest.raises(StreamFormatError) as info:
        section_body_length(desc, bytes(wrong), 0, base=1000)
    assert (f"expected subsection marker 0x05 for {sub['vmsd_name']!r}, found 0x7e"
            in str(info.value))
    assert info.value.offset == 1000 + at

    wrong = bytearray(body)
    wrong[at + 2] ^= 0x20  # first letter of the name
    with pytest.raises(StreamFormatError, match="expected subsection"):
        section_body_length(desc, bytes(wrong), 0)

    wrong = bytearray(body)
    wrong[at + 2 + body[at + 1] + 3] += 1  # low byte of the version
    with pytest.raises(StreamFormatError, match="on the wire"):
        section_body_length(desc, bytes(wrong), 0)

    # A description that forgets a subsection stops in front of it.
    assert section_body_length(bare, body, 0) < len(body)
    with pytest.raises(StreamFormatError):
        decode_fields(bare, body)


# ---------------------------------------------------------------------------
# Hostile descriptions.

def _dev(fields: list[Any], subsections: list[Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": "x", "instance_id": 0, "vmsd_name": "x", "version": 1,
                         "fields": fields}
    if subsections is not None:
        d["subsections"] = subsections
    return d


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff{}", "not UTF-8"),
    (b"{", "not valid JSON"),
    (b"[]", "not an object"),
    (b'{"devices": []}', "no 'page_size'"),
    (b'{"page_size": true, "devices": []}', "page_size"),
    (b'{"page_size": 4096.0, "devices": []}', "page_size"),
    (b'{"page_size": 4095, "devices": []}', "page_size"),
    (b'{"page_size": NaN, "devices": []}', "not valid JSON"),
    (b'{"page_size": 4096}', "no 'devices'"),
    (b'{"page_size": 4096, "devices": {}}', "'devices' is not a list"),
    (b'{"page_size": 4096, "devices": [1]}', "device 0 is not an object"),
    (b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0}, {"instance_id": 0}]}',
     "device 1 has no 'name'"),
    (b'{"page_size": 4096, "devices": [{"name": 5, "instance_id": 0}]}', "not a string"),
    (b'{"page_size": 4096, "devices": [{"name": "a"}]}', "no 'instance_id'"),
    (b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": -1}]}', "instance_id"),
    (b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 4294967296}]}',
     "instance_id"),
    (b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0, "version": "1"}]}',
     "'version'"),
    ((b'{"page_size": 4096, "devices": [{"name": "a", "instance_id": 0},'
      b' {"name": "a", "instance_id": 0}]}'), "described twice"),
    (b'{"configuration": 1, "page_size": 4096, "devices": []}', "'configuration'"),
    (b"[" * 100_000 + b"]" * 100_000, "vmstate description"),
    (b'{"page_size": 1' + b"0" * 5000 + b', "devices": []}', "not valid JSON"),
])
def test_parse_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(StreamFormatError, match=message) as info:
        parse_vmdescription(raw)
    assert str(info.value).startswith("vmstate description")


def test_parse_minimal_and_limit() -> None:
    desc = parse_vmdescription(memoryview(b'{"page_size":4096,"devices":[]}'))
    assert desc.devices == [] and not desc.has_configuration
    assert describe_sections(desc) == []
    old_style = parse_vmdescription(json.dumps({"page_size": 4096, "devices": [
        {"name": "slirp", "instance_id": 0, "size": 3,
         "fields": [{"name": "data", "size": 3, "type": "buffer"}]}]}).encode())
    assert describe_sections(old_style) == [("slirp", 0, None)]
    dev = old_style.device("slirp", 0)
    assert dev is not None and section_body_length(dev, b"abcd", 0) == 3
    with pytest.raises(LimitExceeded):
        parse_vmdescription(bytes((64 << 20) + 1))


@pytest.mark.parametrize(("desc", "buf", "exc", "message"), [
    (_dev([{"name": "a", "type": "uint8", "size": -1}]), b"", StreamFormatError, "size"),
    (_dev([{"name": "a", "type": "uint8", "size": True}]), b"", StreamFormatError, "size"),
    (_dev([{"name": "a", "type": "uint8"}]), b"", StreamFormatError, "no 'size'"),
    (_dev([{"name": "a", "size": 1}]), b"", StreamFormatError, "no 'type'"),
    (_dev([{"type": "uint8", "size": 1}]), b"", StreamFormatError, "no 'name'"),
    (_dev([7]), b"", StreamFormatError, "not an object"),
    (_dev("nope"), b"", StreamFormatError, "'fields' is not a list"),  # type: ignore[arg-type]
    (_dev([], "nope"), b"", StreamFormatError, "'subsections'"),  # type: ignore[arg-type]
    (_dev([], [{"version": 1}]), b"", StreamFormatError, "no 'vmsd_name'"),
    (_dev([], [{"vmsd_name": "x/a", "version": "1"}]), b"\x05", StreamFormatError, "version"),
    (_dev([{"name": "a", "type": "uint8", "size": 1, "array_len": -3}]), b"",
     StreamFormatError, "array_len"),
    (_dev([{"name": "a", "type": "uint8", "size": 1, "index": None}]), b"",
     StreamFormatError, "index"),
    (_dev([{"name": "a", "type": "buffer", "size": MAX_SECTION_BYTES + 1}]), b"",
     LimitExceeded, "exceed"),
    (_dev([{"name": "a", "type": "uint64", "size": 8, "array_len": 10**30}]), b"",
     LimitExceeded, "exceed"),
    (_dev([{"name": "a", "type": "struct", "size": 0}]), b"", StreamFormatError, "'struct'"),
    (_dev([{"name": "a", "type": "struct", "size": 9, "array_len": 2 * 10**6,
            "struct": {"fields": [], "subsections": [{"vmsd_name": "s/a", "version": 1}]}}]),
     b"\x05\x03s/a\x00\x00\x00\x01" * 2, LimitExceeded, "steps"),
    (_dev([{"name": "a", "type": "struct", "size": 1, "array_len": 2 * 10**6,
            "struct": {"fields": [{"name": "c", "type": "capability", "size": 1}]}}]),
     b"\x00" * 2, LimitExceeded, "steps"),
    (_dev([{"name": "a", "type": "struct", "size": 4,
            "struct": {"fields": [{"name": "b", "type": "uint8", "size": 1}]}}]),
     b"\0" * 8, StreamFormatError, "took 1 bytes, the description says 4"),
    (_dev([{"name": "a", "type": "capability", "size": 1}]), b"\x02\xff\xfe",
     StreamFormatError, "not ASCII"),
])
def test_walk_rejects(desc: dict[str, Any], buf: bytes, exc: type[Exception],
                      message: str) -> None:
    with pytest.raises(exc, match=message):
        section_body_length(desc, buf, 0)
    with pytest.raises(exc, match=message):
        decode_fields(desc, buf)


def test_fixed_layout_struct_arrays_are_not_walked_element_by_element() -> None:
    desc = _dev([{"name": "a", "type": "struct", "size": 0, "array_len": 10**12,
                  "struct": {"fields": []}},
                 {"name": "b", "type": "struct", "size": 2, "array_len": 3 << 20,
                  "struct": {"fields": [{"name": "c", "type": "uint16", "size": 2}]}}])
    body = bytes(6 << 20)
    assert section_body_length(desc, body, 0) == len(body)
    with pytest.raises(Incomplete):
        section_body_length(desc, body[:-1], 0)
    with pytest.raises(LimitExceeded, match="steps"):
        decode_fields(desc, body)  # decoding would build 10**12 entries


def test_nesting_depth_is_bounded() -> None:
    inner: dict[str, Any] = {"vmsd_name": "s", "fields": []}
    for _ in range(MAX_DEPTH + 5):
        inner = {"vmsd_name": "s", "fields": [
            {"name": "n", "type": "struct", "size": 0, "struct": inner}]}
    with pytest.raises(LimitExceeded, match="nested deeper"):
        section_body_length(_dev(inner["fields"]), b"", 0)
    sub: dict[str, Any] = {"vmsd_name": "x/s", "fields": []}
    wire = b""
    for _ in range(MAX_DEPTH + 5):
        sub = {"vmsd_name": "x/s", "version": 1, "fields": [], "subsections": [sub]}
    wire = b"\x05\x03x/s\x00\x00\x00\x01" * (MAX_DEPTH + 6)
    with pytest.raises(LimitExceeded, match="nested deeper"):
        section_body_length(_dev([], [sub]), wire, 0)


def test_decode_types() -> None:
    fields = [
        {"name": "b", "type": "bool", "size": 1},
        {"name": "i8", "type": "int8", "size": 1},
        {"name": "u16", "type": "uint16 equal", "size": 2},
        {"name": "i32", "type": "int32", "size": 4},
        {"name": "le", "type": "int32 le", "size": 4},
        {"name": "i64", "type": "int64", "size": 8},
        {"name": "d", "type": "CPU_Double_U", "size": 8},
        {"name": "t", "type": "timer", "size": 8},
        {"name": "bm", "type": "bitmap", "size": 16},
        {"name": "np", "type": "nullptr", "size": 1},
        {"name": "big", "type": "buffer", "size": 100},
        {"name": "odd", "type": "uint32", "size": 3},
        {"name": "arr", "type": "uint8", "size": 1, "array_len": 3},
        {"name": "ix", "type": "uint8", "size": 1, "index": 0},
        {"name": "ix", "type": "uint8", "size": 1, "index": 1},
        {"name": "sub", "type": "pci config", "size": 2},
    ]
    body = (b"\x01" + b"\xff" + b"\x00\x07" + b"\xff\xff\xff\xfe" + b"\x02\x00\x00\x00"
            + (1 << 40).to_bytes(8, "big") + b"\x00\x00\x00\x01\x00\x00\x00\x02"
            + b"\xff" * 8 + (5).to_bytes(8, "big") + (6).to_bytes(8, "big") + b"0"
            + bytes(range(100)) + b"abc" + b"\x01\x02\x03" + b"\x09\x0a" + b"\xbe\xef"
            + b"\x05\x03x/s\x00\x00\x00\x02" + b"\x00\x2a")
    desc = _dev(fields, [{"vmsd_name": "x/s", "version": 2,
                          "fields": [{"name": "v", "type": "uint16", "size": 2}]}])
    assert section_body_length(desc, body, 0) == len(body)
    out = decode_fields(desc, body)
    assert out == {
        "b": True, "i8": -1, "u16": 7, "i32": -2, "le": 2, "i64": 1 << 40,
        "d": (1 << 32) | 2, "t": -1, "bm": [5, 6], "np": None,
        "big": bytes(range(64)).hex() + "... (100 bytes)", "odd": b"abc".hex(),
        "arr": [1, 2, 3], "ix": [9, 10], "sub": "beef",
        "subsections": {"x/s": {"v": 42}},
    }


def test_text_buffers_and_registers() -> None:
    """A buffer holding a NUL-padded printable string reads as the string; one with
    bytes after the NUL, or unprintable ones, stays hex. 32/64-bit unsigned fields
    are Registers: ints (JSON writes them in decimal) that print in hex."""
    fields = [{"name": "s", "type": "buffer", "size": 8},
              {"name": "full", "type": "buffer", "size": 3},
              {"name": "tail", "type": "buffer", "size": 4},
              {"name": "ctl", "type": "buffer", "size": 2},
              {"name": "r", "type": "uint64", "size": 8},
              {"name": "w", "type": "uint16", "size": 2}]
    body = b"paused\0\0" + b"abc" + b"ab\0c" + b"a\n" + (0xFFF0).to_bytes(8, "big") + b"\0\x10"
    out = decode_fields(_dev(fields), body)
    assert out == {"s": "paused", "full": "abc", "tail": b"ab\0c".hex(), "ctl": b"a\n".hex(),
                   "r": 0xFFF0, "w": 16}
    assert isinstance(out["r"], Register) and str(out["r"]) == "0xfff0"
    assert json.dumps(out["r"]) == "65520"
    assert not isinstance(out["w"], Register)


# ---------------------------------------------------------------------------
# Fuzz: parse, or raise our error, nothing else.

def _real_devices() -> list[tuple[dict[str, Any], bytes]]:
    out = []
    for name in OWN_CAPTURES:
        stream = stream_of(name)
        for sec in stream.full:
            desc = stream.vmdesc.device(sec.idstr, sec.instance_id)
            assert desc is not None
            out.append((desc, stream.body(sec)))
    return out


REAL = _real_devices()

_KEYS = ["name", "type", "size", "array_len", "index", "struct", "fields", "subsections",
         "vmsd_name", "version", "instance_id", "page_size", "devices", "configuration"]
_TYPES = ["struct", "uint8", "int32 le", "capability", "tmp", "bool", "bitmap", "nullptr",
          "buffer", "CPU_Double_U", "timer"]
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                | st.integers(-3, 70) | st.floats(allow_nan=False)
                | st.sampled_from(_TYPES) | st.text(max_size=6))
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), kids, max_size=6),
    max_leaves=15)

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check_walk(desc: Any, body: bytes) -> None:
    try:
        n = section_body_length(desc, body, 0)
    except (Incomplete, StreamFormatError):
        pass
    else:
        assert 0 <= n <= len(body)
        # what the walk delimits, the decoder accepts (and the other way round)
        try:
            decode_fields(desc, body[:n])
        except LimitExceeded:
            pass  # decoding also counts array elements against MAX_WALK_STEPS
        except StreamFormatError as exc:  # pragma: no cover - reported with context
            raise AssertionError(f"walk accepted {n} bytes, decode refused: {exc}") from exc
    try:
        out = decode_fields(desc, body)
    except StreamFormatError:
        pass
    else:
        assert isinstance(out, dict)
        assert section_body_length(desc, body, 0) == len(body)


@FUZZ
@given(st.sampled_from(range(len(REAL))), st.binary(max_size=600))
def test_fuzz_random_body(which: int, body: bytes) -> None:
    _check_walk(REAL[which][0], body)


@FUZZ
@given(st.sampled_from(range(len(REAL))), st.data())
def test_fuzz_mutated_body(which: int, data: st.DataObject) -> None:
    desc, body = REAL[which]
    wrong = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(wrong)))
        if op == "flip" and pos < len(wrong):
            wrong[pos] = data.draw(st.sampled_from([0x05, 0x7E, 0x00, 0xFF, wrong[pos] ^ 1]))
        elif op == "cut":
            del wrong[pos:pos + data.draw(st.integers(1, 8))]
        else:
            wrong[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _check_walk(desc, bytes(wrong))


def _slots(node: Any, out: list[tuple[Any, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((node, key))
            _slots(value, out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((node, i))
            _slots(value, out)


@FUZZ
@given(st.sampled_from(range(len(REAL))), st.data())
def test_fuzz_mutated_description(which: int, data: st.DataObject) -> None:
    desc, body = REAL[which]
    desc = copy.deepcopy(desc)
    for _ in range(data.draw(st.integers(1, 3))):
        slots: list[tuple[Any, Any]] = []
        _slots(desc, slots)
        if not slots:
            break
        parent, key = data.draw(st.sampled_from(slots))
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = data.draw(json_values)
    _check_walk(desc, body)
    _check_walk(desc, body + b"\x7e")


@FUZZ
@given(json_values, st.binary(max_size=64))
def test_fuzz_random_description(desc: Any, body: bytes) -> None:
    _check_walk(desc, body)
    with contextlib.suppress(StreamFormatError):
        parse_vmdescription(json.dumps(desc).encode())


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(_KEYS), json_values, max_size=5),
                max_size=3),
       st.binary(max_size=64))
def test_fuzz_random_devices(devices: list[dict[str, Any]], body: bytes) -> None:
    raw = json.dumps({"page_size": 4096, "devices": devices}).encode()
    try:
        desc = parse_vmdescription(raw)
    except StreamFormatError:
        return
    assert desc.raw_json == raw
    for idstr, instance, _version in describe_sections(desc):
        dev = desc.device(idstr, instance)
        assert dev is not None
        _check_walk(dev, body)


@FUZZ
@given(st.sampled_from(list(OWN_CAPTURES)), st.data())
def test_fuzz_mutated_json_bytes(name: str, data: st.DataObject) -> None:
    raw = bytearray(stream_of(name).vmdesc.raw_json)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        desc = parse_vmdescription(bytes(raw))
    except StreamFormatError:
        return
    stream = stream_of(name)
    for sec in stream.full:
        dev = desc.device(sec.idstr, sec.instance_id)
        if dev is not None:
            _check_walk(dev, stream.body(sec))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_json_bytes(raw: bytes) -> None:
    with contextlib.suppress(StreamFormatError):
        parse_vmdescription(raw)
