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
  mutated real multifd channel captures, and the payloads alone mutated inside their
  compressed bytes (one decompressor per channel, as the receiver has).
* Snapshots: a livemig snapshot of a real capture (with a device-state trailer) and
  QEMU's own mapped-ram file, mutated in their header, block list, bitmaps and tail
  (device sections, JSON, trailer), then ``inspect``, ``extract`` and ``receive file:``.
* The vhost-user codec and back-end session on a mutated QEMU 10 start-up sequence.
* The command line (``receive file:``, ``inspect``) on a few mutated captures.

Together they are a campaign that CI runs in bounded time (fixed example counts, no
deadline per example, about 40 s on one CPU). Besides "our error or a result" it checks
that livemig's errors are one line, that memory stays bounded over the whole campaign
(the resident set, from ``/proc/self/statm``, may grow by at most
``CAMPAIGN_RSS_GROWTH``), and that a failed capture or extraction leaves no file. With
``LIVEMIG_FUZZ_REPORT=FILE`` the campaign writes its input counts and peak RSS there.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import json
import os
import random
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from helpers import finish_cli, rss_bytes, start_cli
from hostile_source import EOS, block_list, ram_word, walk_capture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import DATA_DIR, read_capture

from livemig.errors import MigrationError, StreamFormatError
from livemig.wire import vhost_user as vu
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
# The campaign: inputs counted per target, resident memory sampled after every input
# --------------------------------------------------------------------------------------------

#: How much the resident set may grow over the whole campaign. The inputs are small
#: (< 1 MB) and every limit they can reach is far below this. Measured: 185-200 MiB of
#: growth, spread over the campaign (hypothesis's own state and the allocator's arenas:
#: the same inspect + receive repeated 150 times on a capture stays flat, and no single
#: input adds more than 5 MiB). An allocation driven by a hostile length (hundreds of
#: MiB for one input) lands above it; a small leak per input is for the targeted tests
#: to catch (``test_wire_multifd.py::test_refused_payloads_do_not_leak``).
CAMPAIGN_RSS_GROWTH = 320 << 20


class Campaign:
    def __init__(self) -> None:
        self.inputs: Counter[str] = Counter()
        self.start_rss = self.peak_rss = 0
        self.peak_at = ""
        self.started = 0.0

    def begin(self) -> None:
        self.start_rss = self.peak_rss = rss_bytes()
        self.started = time.monotonic()

    def note(self, target: str) -> None:
        self.inputs[target] += 1
        rss = rss_bytes()
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_at = f"{target} #{self.inputs[target]}"

    def summary(self) -> dict[str, object]:
        return {"inputs": sum(self.inputs.values()), "per_target": dict(self.inputs),
                "seconds": round(time.monotonic() - self.started, 1),
                "start_rss_mib": round(self.start_rss / (1 << 20), 1),
                "peak_rss_mib": round(self.peak_rss / (1 << 20), 1),
                "peak_reached_at": self.peak_at}


CAMPAIGN = Campaign()


@pytest.fixture(scope="module", autouse=True)
def campaign() -> Iterator[Campaign]:
    CAMPAIGN.begin()
    yield CAMPAIGN
    summary = CAMPAIGN.summary()
    report = os.environ.get("LIVEMIG_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(summary, indent=1) + "\n")
    growth = CAMPAIGN.peak_rss - CAMPAIGN.start_rss
    assert growth < CAMPAIGN_RSS_GROWTH, f"memory grew by {growth >> 20} MiB: {summary}"


def one_line(e: MigrationError) -> None:
    text = str(e)
    assert text and "\n" not in text, repr(text)


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
    if pieces is None:  # each input runs whole, then in pieces: counted once
        CAMPAIGN.note("main stream (decoder)")
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
    CAMPAIGN.note("main stream (loader: inspect --fields)")
    out = work / "out.snap"
    try:
        receive(f"file:{path}", str(out))
    except MigrationError as e:
        assert "\n" not in str(e)
        assert sorted(p.name for p in work.iterdir()) == ["m.stream"]
    else:
        assert out.exists()
    CAMPAIGN.note("main stream (loader: receive)")


# --------------------------------------------------------------------------------------------
# multifd channels
# --------------------------------------------------------------------------------------------

MULTIFD = {
    "qemu7.2-multifd-none-2ch": MultifdCompression.NONE,
    "qemu7.2-multifd-zlib-2ch": MultifdCompression.ZLIB,
    "qemu7.2-multifd-zstd-2ch": MultifdCompression.ZSTD,
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
    CAMPAIGN.note("multifd channel")
    try:
        decode_channel(buf, MULTIFD[name], blocks)
    except MigrationError as e:
        assert "\n" not in str(e)


@FUZZ
@given(junk=st.binary(max_size=3000),
       head=st.sampled_from([b"", b"\x11\x22\x33\x44\x00\x00\x00\x01"]),
       compression=st.sampled_from(list(MultifdCompression)))
def test_random_multifd_channel(junk: bytes, head: bytes, compression: MultifdCompression) -> None:
    CAMPAIGN.note("multifd channel")
    with contextlib.suppress(MigrationError):
        decode_channel(head + junk, compression, {"pc.ram": 1 << 20})


# --------------------------------------------------------------------------------------------
# multifd payloads: the compressed bytes themselves
# --------------------------------------------------------------------------------------------

COMPRESSED = [n for n, c in MULTIFD.items() if c is not MultifdCompression.NONE]


@cache
def payload_spans(name: str) -> tuple[tuple[int, int], ...]:
    """Where the compressed payloads of a real channel are: ``(offset, size)`` each."""
    buf, blocks = multifd_channel(name)
    out = []
    offset = INIT_PACKET_SIZE
    while len(buf) - offset >= COMMON_HEADER_SIZE:
        size = packet_header_size(buf, offset)
        pkt = decode_ram_packet(buf, offset, compression=MULTIFD[name], block_sizes=blocks)
        if pkt.normal_pages and pkt.payload_size:
            out.append((offset + size, pkt.payload_size))
        offset += size + pkt.payload_size
    return tuple(out)


@pytest.mark.parametrize("name", COMPRESSED)
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_multifd_payloads(name: str, data: st.DataObject) -> None:
    """Bytes changed inside zlib/zstd payloads (the headers stay valid), decoded in order
    with one decompressor for the channel, as the receiver does: the page data, or
    livemig's error (a poisoned stream, more or less data than announced)."""
    buf = bytearray(multifd_channel(name)[0])
    spans = payload_spans(name)
    for _ in range(data.draw(st.integers(1, 3))):
        first, size = spans[data.draw(st.integers(0, min(len(spans), 8) - 1))]
        at = first + data.draw(st.integers(0, size - 1))
        op = data.draw(st.sampled_from(["flip", "set", "word", "zeros"]))
        if op == "flip":
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "word":
            buf[at:at + 4] = data.draw(st.sampled_from(
                [0, 0xFFFFFFFF, 0x28B52FFD, 0x7FFFFFFF, 0x00010000])).to_bytes(4, "big")
        else:
            n = min(data.draw(st.integers(1, 64)), first + size - at)
            buf[at:at + n] = bytes(n)
    CAMPAIGN.note("multifd payload")
    try:
        decode_channel(buf, MULTIFD[name], multifd_channel(name)[1])
    except MigrationError as e:
        one_line(e)


# --------------------------------------------------------------------------------------------
# Snapshots: mapped-ram files (header, block list, bitmaps, tail, device-state trailer)
# --------------------------------------------------------------------------------------------


@cache
def snapshot_seeds() -> dict[str, Path]:
    """A livemig snapshot of a real QEMU 10 capture with a device-state trailer added, and
    QEMU 10's own mapped-ram file, in a folder removed when the test process exits."""
    from livemig.commands.receive import receive
    from livemig.migration.source.device_state_packets import device_state_packets
    from livemig.wire.device_state_trailer import encode_trailer_footer, encode_trailer_header

    folder = Path(tempfile.mkdtemp(prefix="livemig-fuzz-seeds-"))
    atexit.register(shutil.rmtree, folder, True)
    stream = folder / "precopy.stream"
    stream.write_bytes(capture("qemu10.0-precopy.stream"))
    snap = folder / "livemig.snap"
    receive(f"file:{stream}", str(snap))
    stream.unlink()
    packets = [b"".join(bytes(b) for b in p.buffers) for p in device_state_packets(
        "0000:00:04.0/vfio", 0, io.BytesIO(b"d" * 2500).read, b"c" * 40, max_data=1000)]
    body = b"".join(packets)
    end = snap.stat().st_size
    with snap.open("ab") as f:
        f.write(encode_trailer_header(len(packets), len(body)) + body
                + encode_trailer_footer(end))
    qemu = folder / "qemu.snap"
    qemu.write_bytes(capture("qemu10.0-mapped-ram.bin"))
    return {"livemig": snap, "qemu": qemu}


@cache
def snapshot_regions(name: str) -> dict[str, tuple[int, int]]:
    """``[start, end)`` of the parts of a seed snapshot worth changing."""
    from livemig.commands.inspect import load_file
    from livemig.wire.ram import bitmap_bytes

    path = snapshot_seeds()[name]
    load, _ = load_file(str(path))
    size = path.stat().st_size
    regions: dict[str, tuple[int, int]] = {}
    headers = [b.mapped_ram for b in load.blocks if b.mapped_ram is not None]
    first_bitmap = min(h.bitmap_offset for h in headers)
    regions["header and block list"] = (0, min(first_bitmap, 1 << 16))
    big = max(load.blocks, key=lambda b: b.length)
    assert big.mapped_ram is not None
    regions["bitmap"] = (big.mapped_ram.bitmap_offset,
                         big.mapped_ram.bitmap_offset + bitmap_bytes(big.length // PS))
    pages_end = max(b.mapped_ram.pages_offset + b.length for b in load.blocks
                    if b.mapped_ram is not None)
    regions["tail"] = (pages_end, size)
    return regions


def test_unmutated_snapshots_are_read(tmp_path: Path) -> None:
    """The harness: both seeds inspect, extract and receive without an error."""
    from livemig.commands.inspect import extract, inspect_file
    from livemig.commands.receive import receive

    for name, path in snapshot_seeds().items():
        report = inspect_file(str(path))
        assert report["format"] == "mapped-ram snapshot", name
        assert bool(report["device_state"]) == (name == "livemig"), name
        assert extract(str(path), "pc.ram", str(tmp_path / f"{name}.raw")) > 0
        receive(f"file:{path}", str(tmp_path / f"{name}.snap"))
        assert set(snapshot_regions(name)) == {"header and block list", "bitmap", "tail"}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_snapshot(tmp_path: Path, data: st.DataObject) -> None:
    """A snapshot changed in place (and restored after), then ``inspect``, ``extract`` and
    ``receive file:`` of it: each gives a result or livemig's one-line error, and a
    failed ``extract`` or ``receive`` leaves nothing in its output folder."""
    from livemig.commands.inspect import extract, inspect_file
    from livemig.commands.receive import receive

    name = data.draw(st.sampled_from(sorted(snapshot_seeds())))
    path = snapshot_seeds()[name]
    regions = snapshot_regions(name)
    size = path.stat().st_size
    undo: list[tuple[int, bytes]] = []
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(data.draw(st.integers(1, 3))):
            start, end = regions[data.draw(st.sampled_from(sorted(regions)))]
            at = data.draw(st.integers(start, max(start, end - 1)))
            op = data.draw(st.sampled_from(["flip", "set", "be32", "be64", "le64", "truncate"]))
            old = os.pread(fd, 8, at)
            if op == "truncate":
                if at < regions["tail"][0]:
                    continue  # cuts the page area: restoring it would rewrite the file
                undo.append((at, os.pread(fd, size - at, at)))
                os.ftruncate(fd, at)
                continue
            undo.append((at, old))
            if op == "flip" and old:
                new = bytes([old[0] ^ (1 << data.draw(st.integers(0, 7)))])
            elif op in ("be32", "be64", "le64"):
                value = data.draw(st.sampled_from([0, 1, 0x1000, 0xFFFFFFFF, 1 << 40,
                                                   (1 << 64) - 1, size, size - 8]))
                fmt = {"be32": ">I", "be64": ">Q", "le64": "<Q"}[op]
                new = struct.pack(fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
            else:
                new = bytes([data.draw(st.integers(0, 255))])
            os.pwrite(fd, new, at)
        CAMPAIGN.note("snapshot")
        with contextlib.suppress(MigrationError):
            try:
                inspect_file(str(path))
            except MigrationError as e:
                one_line(e)
                raise
        out = Path(tempfile.mkdtemp(dir=tmp_path))
        for run in (lambda: extract(str(path), "pc.ram", str(out / "pc.ram.raw")),
                    lambda: receive(f"file:{path}", str(out / "copy.snap"))):
            try:
                run()
            except MigrationError as e:
                one_line(e)
                assert list(out.iterdir()) == [], "a failed command left its output behind"
            else:
                for p in out.iterdir():
                    p.unlink()
    finally:
        for at, old in reversed(undo):
            os.pwrite(fd, old, at)
        os.ftruncate(fd, size)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# vhost-user: the codec and the back-end session table
# --------------------------------------------------------------------------------------------

_VU_FEATURES = 0x144000000
_VU_PROTO = 0x8800A  # LOG_SHMFD, REPLY_ACK, CONFIGURE_MEM_SLOTS, DEVICE_STATE


@cache
def vhost_user_startup() -> tuple[tuple[bytes, tuple[int, ...]], ...]:
    """What QEMU 10's vhost-user-fs front-end sends a back-end up to a state transfer,
    each message encoded with the file descriptors it carries."""
    req = vu.Request
    msgs = [vu.Message(req.GET_FEATURES), vu.Message(req.GET_PROTOCOL_FEATURES),
            vu.Message(req.SET_PROTOCOL_FEATURES, 1, vu.U64(_VU_PROTO)),
            vu.Message(req.SET_OWNER)]
    for i in (0, 1):
        msgs += [vu.Message(req.SET_VRING_CALL, 1, vu.U64(i), (10,)),
                 vu.Message(req.SET_VRING_ERR, 1, vu.U64(i), (11,))]
    msgs += [vu.Message(req.SET_FEATURES, 1, vu.U64(0x140000000)),
             vu.Message(req.ADD_MEM_REG, 0x9,
                        vu.SingleMemoryRegion(vu.MemoryRegion(0, 0xC0000, 1, 0)), (5,)),
             vu.Message(req.SET_LOG_BASE, 1, vu.LogDescription(8192, 0), (6,)),
             vu.Message(req.SET_DEVICE_STATE_FD, 1, vu.DeviceStateTransfer(0, 0), (9,)),
             vu.Message(req.CHECK_DEVICE_STATE)]
    return tuple((vu.encode_message(m), m.fds) for m in msgs)


def run_backend(raw: bytes, fds_at: dict[int, tuple[int, ...]], step: int) -> int:
    """Feed ``raw`` to a decoder in ``step``-byte pieces (descriptors with the piece
    that starts where their message started) and every message to a back-end session."""
    dec = vu.MessageDecoder(replies=False)
    session = vu.BackendSession(_VU_FEATURES, _VU_PROTO)
    accepted = 0
    cuts = sorted({*range(0, len(raw), step), *(a for a in fds_at if a < len(raw)), len(raw)})
    for at, upto in itertools.pairwise(cuts):
        dec.feed(raw[at:upto], fds_at.get(at, ()))
        while (m := dec.next_message()) is not vu.NEED_DATA:
            assert isinstance(m, vu.Message)
            session.receive(m)
            accepted += 1
    return accepted


def test_unmutated_vhost_user_startup_is_accepted() -> None:
    raw, fds_at = _vhost_user_input()
    assert run_backend(raw, fds_at, len(raw)) == len(vhost_user_startup())
    assert run_backend(raw, fds_at, 1) == len(vhost_user_startup())


def _vhost_user_input() -> tuple[bytearray, dict[int, tuple[int, ...]]]:
    raw = bytearray()
    fds_at: dict[int, tuple[int, ...]] = {}
    for data, fds in vhost_user_startup():
        if fds:
            fds_at[len(raw)] = fds
        raw += data
    return raw, fds_at


@settings(max_examples=400, deadline=None)
@given(data=st.data(), step=st.sampled_from([1, 3, 12, 64, 1 << 16]))
def test_mutated_vhost_user_session(data: st.DataObject, step: int) -> None:
    raw, fds_at = _vhost_user_input()
    for _ in range(data.draw(st.integers(1, 3))):
        if not raw:
            break
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "le32", "insert", "delete", "truncate"]))
        if op == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "le32":
            raw[at:at + 4] = struct.pack("<I", data.draw(st.sampled_from(
                [0, 1, 5, 8, 0x1000, 0x1001, 0xFFFFFFFF, 1 << 31])))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del raw[at:at + data.draw(st.integers(1, 12))]
        else:
            del raw[at:]
    CAMPAIGN.note("vhost-user")
    try:
        run_backend(bytes(raw), fds_at, step)
    except MigrationError as e:
        one_line(e)


# --------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit 1, nothing left behind
# --------------------------------------------------------------------------------------------


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_capture_through_the_command_line(tmp_path: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["qemu7.2-precopy.stream", "qemu10.0-precopy.stream"]))
    blob = data.draw(mutations(name))
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    bad = work / "bad.stream"
    bad.write_bytes(blob)
    out = work / "out"
    out.mkdir()
    runs = {"receive": ["receive", f"file:{bad}", "-o", str(out / "vm.snap"), "-q"],
            "inspect": ["inspect", str(bad)]}
    started = time.monotonic()
    procs = {k: start_cli(a) for k, a in runs.items()}
    CAMPAIGN.note("command line")
    for k, p in procs.items():
        r = finish_cli(p, runs[k], started, 120.0)
        if r.rc == 0:
            continue
        assert r.rc == 1, f"{k}: exit {r.rc}: {r.stderr}"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"livemig {k}: error: "), r.stderr
        if k == "receive":
            assert list(out.iterdir()) == [], "a failed receive left a file behind"
