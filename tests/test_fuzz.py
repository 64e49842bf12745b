"""Fuzz targets with one invariant: parse, or raise livemig's own error, nothing else.

"Nothing else" means no IndexError, struct.error, ValueError, zlib.error, MemoryError,
RecursionError, ... escaping from a decoder, and no decoder that stops making progress.

* ``MainStreamDecoder.parse`` on random bytes (behind more and more of a valid prefix, so
  that the bytes land in the header, the configuration, the records, a RAM section body
  and the block list), and on real captures mutated with bit flips, byte replacements,
  truncations, insertions and deletions in their first 64 KB and in their tail (device
  sections, EOF, JSON); each input fed whole and in random piece sizes, ``final=True``
  at the end. The tail is handled as ``MainChannelLoader`` does it: find the JSON, parse it,
  ``fork_for_tail``, parse the device sections with it.
* The loader itself (``inspect``'s path: ``MainChannelLoader`` over a file, with a sink that
  allocates per page) on mutated captures.
* The multifd decoders (initial packet, packet headers, zlib/zstd/none payloads) on
  mutated real multifd channel captures.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from functools import cache
from pathlib import Path

import pytest
from hostile_source import EOS, block_list, ram_word, walk_capture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import DATA_DIR, read_capture

from livemig.errors import MigrationError, StreamFormatError
from livemig.wire.constants import MultifdCompression, RamFlag, SectionType
from livemig.wire.events import DeviceStateTail, Seek
from livemig.wire.multifd import (
    COMMON_HEADER_SIZE,
    INIT_PACKET_SIZE,
    decode_device_state_header,
    decode_init_packet,
    decode_ram_packet,
    is_device_state,
    make_decompressor,
    packet_header_size,
    peek_common_header,
)
from livemig.wire.stream import (
    MainStreamDecoder,
    encode_configuration,
    encode_file_header,
    encode_section_header,
    find_vmdescription,
    fork_for_tail,
)
from livemig.wire.vmstate import parse_vmdescription

PS = 4096
FUZZ = settings(max_examples=300, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MAIN_CAPTURES = ["qemu7.2-precopy.stream", "qemu10.0-precopy.stream",
                 "qemu10.0-multifd-none-2ch/conn0.bin", "qemu10.0-mapped-ram.bin"]


@cache
def capture(name: str) -> bytes:
    return read_capture(name)


# --------------------------------------------------------------------------------------------
# Driving the main-stream decoder the way the loader does
# --------------------------------------------------------------------------------------------

#: Bound on parse() calls for one input: far more than any input here needs, so hitting it
#: means the decoder stopped making progress.
MAX_CALLS = 200_000


class Stuck(AssertionError):
    pass


def decode_main(data: bytes | bytearray, pieces: random.Random | None = None) -> str:
    """Run the decoder over ``data``; returns how it ended ("done", "truncated tail", ...);
    livemig's errors propagate, anything else is a bug the caller reports."""
    n = len(data)
    mv = memoryview(data)
    dec = MainStreamDecoder()
    pos = 0
    fed = n if pieces is None else 0
    calls = 0
    tail_from: int | None = None

    def more() -> bool:
        nonlocal fed
        if fed >= n:
            return False
        assert pieces is not None
        fed = min(n, fed + pieces.choice((1, 2, 7, 64, 1000, 4104, 9000, 65536)))
        return True

    while True:
        calls += 1
        if calls > MAX_CALLS:
            raise Stuck(f"no end after {MAX_CALLS} parse calls at {pos:#x} in {dec.expecting()}")
        if tail_from is None:
            events, used = dec.parse(mv[pos:fed], 0, fed - pos, pos, final=fed == n)
            progressed = used > 0 or bool(events)
            last = events[-1] if events else None
            del events
            pos += used
            if isinstance(last, Seek):
                if last.offset < 0:
                    raise AssertionError(f"negative seek {last.offset}")
                pos = min(last.offset, n)  # a file: what lies before `fed` is there
                fed = n if pieces is None else max(fed, pos)
                continue
            if isinstance(last, DeviceStateTail):
                tail_from = last.offset
                if tail_from != pos:
                    raise AssertionError("DeviceStateTail is not where the decoder stopped")
                continue
            if dec.done:
                return "done"
            if progressed:
                continue
            if not more():
                if fed == n and not dec.waiting_for_description:
                    raise Stuck(f"final parse neither ended nor failed in {dec.expecting()}")
                return "waiting"
        else:
            tail = bytes(mv[tail_from:fed])
            loc = find_vmdescription(tail)
            if loc is not None:
                desc = parse_vmdescription(tail[loc[1]:])
                trial = fork_for_tail(dec, desc)
                events, used = trial.parse(tail, 0, len(tail), tail_from, final=True,
                                           max_events=1 << 30)
                del events
                if trial.done and used == len(tail):
                    return "done"
                # the loader refuses these itself ("device sections do not end where
                # the vmstate description begins")
                return "tail not finished"
            if not more():
                return "no description"


def check_invariant(data: bytes | bytearray, pieces: random.Random | None = None) -> str:
    try:
        return decode_main(data, pieces)
    except MigrationError as e:
        # livemig's errors are fine; they must render as one line
        text = str(e)
        assert "\n" not in text, text
        if isinstance(e, StreamFormatError) and e.offset is not None:
            assert 0 <= e.offset <= len(data) + (1 << 62), e.offset
        return type(e).__name__


# --------------------------------------------------------------------------------------------
# Random bytes behind a growing valid prefix
# --------------------------------------------------------------------------------------------

_HDR = encode_file_header()
_CFG = encode_configuration("pc-i440fx-10.0")
_RAM = encode_section_header(SectionType.SECTION_START, 1, "ram", 0, 4)
_LIST = block_list([("pc.ram", 1 << 20), ("pc.bios", 1 << 18)])
_PART = EOS + b"\x7e\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x01" + ram_word(0, RamFlag.PAGE) \
    + b"\x06pc.ram" + bytes(PS)
PREFIXES = [
    b"",
    _HDR,
    _HDR + _CFG,
    _HDR + _CFG + _RAM,
    _HDR + _CFG + _RAM + _LIST[:8],
    _HDR + _CFG + _RAM + _LIST,
    _HDR + _CFG + _RAM + _LIST + _PART,
    _HDR + encode_configuration("pc", ("mapped-ram",)) + _RAM + _LIST[:8],
    _HDR + encode_configuration("pc", ("x-ignore-shared",)) + _RAM + _LIST[:8],
]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), junk=st.binary(max_size=3000), seed=st.integers())
def test_random_bytes(prefix: bytes, junk: bytes, seed: int) -> None:
    data = prefix + junk
    check_invariant(data)
    check_invariant(data, random.Random(seed))


@FUZZ
@given(prefix=st.sampled_from(PREFIXES),
       words=st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(0, 0x3FF)), max_size=40),
       junk=st.binary(max_size=64))
def test_random_ram_records(prefix: bytes, words: list[tuple[int, int]], junk: bytes) -> None:
    """Record words with random flags (any combination of the 10 known bits) and offsets,
    each followed by a bit of random payload, after a valid block list."""
    body = b"".join(ram_word(off * PS, flags) + junk[:flags % 17] for off, flags in words)
    check_invariant(_HDR + _CFG + _RAM + _LIST + body)


# --------------------------------------------------------------------------------------------
# Mutated real captures
# --------------------------------------------------------------------------------------------


@st.composite
def mutations(draw: st.DrawFn, name: str) -> bytearray:
    data = bytearray(capture(name))
    n = len(data)
    lay = walk_capture(capture(name))
    # the first 64 KB (header, configuration, block list, first records), the device
    # sections and EOF, the JSON; the first 512 bytes and the device state more often
    where = (st.integers(0, 511) | st.integers(0, min(n, 1 << 16) - 1)
             | st.integers(lay.tail, lay.vmdesc + 8) | st.integers(lay.tail, n - 1))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "word"]))
        at = min(draw(where), len(data) - 1)
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x05, 0x06, 0x7E, 0x7F, 0x80, 0xFF]) |
                            st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        else:  # an interesting be32/be64 value over whatever is there
            value = draw(st.sampled_from([0, 1, 0xFF, 0x1000, 0xFFFFFFFF, 1 << 31]))
            size = draw(st.sampled_from([4, 8]))
            data[at:at + size] = value.to_bytes(size, "big")
        if not data:
            break
    return data


@pytest.mark.parametrize("name", MAIN_CAPTURES)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), seed=st.integers())
def test_mutated_capture(name: str, data: st.DataObject, seed: int) -> None:
    blob = data.draw(mutations(name))
    check_invariant(blob)
    check_invariant(blob, random.Random(seed))


@pytest.mark.parametrize("name", ["qemu7.2-precopy.stream", "qemu10.0-precopy.stream"])
def test_unmutated_captures_end_done(name: str) -> None:
    """The harness itself: an intact capture decodes to the end, whole and in pieces."""
    assert decode_main(capture(name)) == "done"
    assert decode_main(capture(name), random.Random(1)) == "done"


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_capture_through_the_loader(tmp_path: Path, data: st.DataObject) -> None:
    """The loader over a mutated file, both ways the command line uses it: ``inspect
    --fields`` (counting sink, vmstate field decoding) and ``receive file:`` (the snapshot
    writer). Its result or livemig's error, and a failed receive leaves no file behind."""
    from livemig.commands.inspect import inspect_file
    from livemig.commands.receive import receive

    name = data.draw(st.sampled_from(["qemu7.2-precopy.stream", "qemu10.0-precopy.stream",
                                      "qemu10.0-mapped-ram.bin"]))
    blob = data.draw(mutations(name))
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    path = work / "m.stream"
    path.write_bytes(blob)
    try:
        inspect_file(str(path), fields=True)
    except MigrationError as e:
        assert "\n" not in str(e)
    out = work / "out.snap"
    try:
        receive(f"file:{path}", str(out))
    except MigrationError as e:
        assert "\n" not in str(e)
        assert sorted(p.name for p in work.iterdir()) == ["m.stream"]
    else:
        assert out.exists()


# --------------------------------------------------------------------------------------------
# multifd channels
# --------------------------------------------------------------------------------------------

MULTIFD = {
    "qemu7.2-multifd-none-2ch": MultifdCompression.NONE,
    "qemu7.2-multifd-zlib-2ch": MultifdCompression.ZLIB,
    "qemu10.0-multifd-none-2ch": MultifdCompression.NONE,
    "qemu10.0-multifd-zlib-2ch": MultifdCompression.ZLIB,
    "qemu10.0-multifd-zstd-2ch": MultifdCompression.ZSTD,
}


@cache
def multifd_channel(name: str) -> tuple[bytes, dict[str, int]]:
    """The larger multifd channel of a capture, and the block sizes from its main channel."""
    chans, main = [], None
    for p in sorted((DATA_DIR / name).glob("conn*.bin.xz")):
        raw = read_capture(f"{name}/{p.name}")
        if raw[:4] == b"QEVM":
            main = raw
        else:
            chans.append(raw)
    assert main is not None and len(chans) == 2
    lay = walk_capture(main)
    return max(chans, key=len), {n: length for n, length, _ in lay.blocks}


def decode_channel(buf: bytes | bytearray, compression: MultifdCompression,
                   blocks: dict[str, int]) -> int:
    """Walk one multifd channel as the receiver does; returns the number of packets."""
    decode_init_packet(buf, channels=2)
    decomp = make_decompressor(compression)
    offset = INIT_PACKET_SIZE
    index = 0
    while len(buf) - offset >= COMMON_HEADER_SIZE:
        size = packet_header_size(buf, offset, packet_index=index)
        if len(buf) - offset < size:
            break  # the receiver would report the truncation itself
        if is_device_state(peek_common_header(buf, offset)[2]):
            dev = decode_device_state_header(buf, offset, packet_index=index)
            offset += size + dev.payload_size
        else:
            pkt = decode_ram_packet(buf, offset, compression=compression, block_sizes=blocks,
                                    packet_index=index)
            payload = bytes(buf[offset + size:offset + size + pkt.payload_size])
            if len(payload) < pkt.payload_size:
                break
            if pkt.normal_pages:
                out = decomp.decompress(payload, pkt.page_data_size)
                assert len(out) == pkt.page_data_size
            offset += size + pkt.payload_size
        index += 1
    return index


@pytest.mark.parametrize("name", list(MULTIFD))
def test_unmutated_multifd_channels_decode(name: str) -> None:
    buf, blocks = multifd_channel(name)
    assert decode_channel(buf, MULTIFD[name], blocks) > 1


@st.composite
def channel_mutations(draw: st.DrawFn, name: str) -> bytearray:
    buf = bytearray(multifd_channel(name)[0])
    # mostly in the initial packet and the first packet headers (64 + 1344 bytes each)
    where = st.integers(0, 4 * 1408) | st.integers(0, min(len(buf), 1 << 16) - 1)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "word", "insert", "truncate"]))
        at = min(draw(where), len(buf) - 1)
        if op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[at] = draw(st.integers(0, 255))
        elif op == "word":
            at &= ~3
            value = draw(st.sampled_from([0, 1, 2, 0x40, 0x80, 129, 1024, 0xFFFFFFFF,
                                          (1 << 20) | 0x1000, 0x11223344]))
            buf[at:at + 4] = value.to_bytes(4, "big")
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at:]
        if not buf:
            break
    return buf


@pytest.mark.parametrize("name", list(MULTIFD))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_multifd_channel(name: str, data: st.DataObject) -> None:
    buf = data.draw(channel_mutations(name))
    _, blocks = multifd_channel(name)
    try:
        decode_channel(buf, MULTIFD[name], blocks)
    except MigrationError as e:
        assert "\n" not in str(e)


@FUZZ
@given(junk=st.binary(max_size=3000),
       head=st.sampled_from([b"", b"\x11\x22\x33\x44\x00\x00\x00\x01"]),
       compression=st.sampled_from(list(MultifdCompression)))
def test_random_multifd_channel(junk: bytes, head: bytes, compression: MultifdCompression) -> None:
    with contextlib.suppress(MigrationError):
        decode_channel(head + junk, compression, {"pc.ram": 1 << 20})
