"""Tests for livemig.wire.multifd: multifd packet codec and per-channel compression."""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import rss_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import (
    ConfigError,
    LimitExceeded,
    MigrationError,
    StreamFormatError,
    TruncatedStream,
)
from livemig.limits import MAX_MULTIFD_COMPRESSED_PAYLOAD, MULTIFD_PAGES_PER_PACKET
from livemig.wire.constants import MultifdCompression, MultifdFlag
from livemig.wire.multifd import (
    COMMON_HEADER_SIZE,
    DEVICE_STATE_HEADER_SIZE,
    INIT_PACKET_SIZE,
    MAX_DEVICE_STATE_PACKET,
    PAGE_SIZE,
    RAM_HEADER_SIZE,
    DeviceStatePacket,
    InitPacket,
    NoCompression,
    RamPacket,
    ZlibChannelCompressor,
    ZlibChannelDecompressor,
    ZstdChannelCompressor,
    ZstdChannelDecompressor,
    decode_device_state_header,
    decode_init_packet,
    decode_ram_packet,
    encode_device_state_header,
    encode_ram_packet,
    encode_sync_packet,
    is_device_state,
    make_compressor,
    make_decompressor,
    packet_header_size,
    page_runs,
    peek_common_header,
)

NONE, ZLIB, ZSTD = MultifdCompression.NONE, MultifdCompression.ZLIB, MultifdCompression.ZSTD
MiB = 1 << 20
BLOCKS = {"pc.ram": 256 * MiB, "pc.bios": 256 << 10, "/rom@etc/acpi/tables": 128 << 10}
UUID = bytes.fromhex("12345678123456789abcdef012345678")


# --------------------------------------------------------------------------
# factories


def raw_ram(*, magic: int = 0x11223344, version: int = 1, flags: int = 0,
            pages_alloc: int = 128, normal: int | None = None, zero: int | None = None,
            next_size: int | None = None, packet_num: int = 0,
            ramblock: bytes = b"pc.ram", offsets: list[int] | None = None,
            zero_offsets: list[int] | None = None) -> bytes:
    """A RAM packet header built field by field, without the encoder's checks."""
    offsets = [] if offsets is None else offsets
    zero_offsets = [] if zero_offsets is None else zero_offsets
    normal = len(offsets) if normal is None else normal
    zero = len(zero_offsets) if zero is None else zero
    next_size = normal * PAGE_SIZE if next_size is None else next_size
    out = bytearray(RAM_HEADER_SIZE)
    struct.pack_into(">IIIIIIQI", out, 0, magic, version, flags, pages_alloc, normal,
                     next_size, packet_num, zero)
    out[64:64 + len(ramblock)] = ramblock
    all_offsets = offsets + zero_offsets
    out[320:320 + 8 * len(all_offsets)] = b"".join(struct.pack(">Q", o) for o in all_offsets)
    return bytes(out)


def raw_dev(*, flags: int = 0x40, idstr: bytes = b"0000:00:04.0/vfio", instance_id: int = 0,
            size: int = 100, magic: int = 0x11223344, version: int = 1) -> bytes:
    return struct.pack(">III256sII", magic, version, flags, idstr, instance_id, size)


def pages(n: int, seed: int = 0) -> list[bytes]:
    """Guest-like pages: some random, some repetitive, some zero."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            out.append(rng.randbytes(PAGE_SIZE // 2) * 2)
        elif kind == 1:
            out.append(bytes([i & 0xFF]) * PAGE_SIZE)
        else:
            out.append(rng.randbytes(PAGE_SIZE))
    return out


@dataclass
class Channel:
    """What a channel's byte stream decoded into."""

    init: InitPacket
    ram: list[RamPacket] = field(default_factory=list)
    device: list[DeviceStatePacket] = field(default_factory=list)
    page_data: list[bytes] = field(default_factory=list)


def walk_channel(data: bytes, compression: MultifdCompression, *,
                 block_sizes: dict[str, int] | None = None, channels: int | None = None,
                 expected_uuid: bytes | None = None) -> Channel:
    """Decode a whole channel the way the I/O layer reads it: header, then payload."""
    mv = memoryview(data)
    init = decode_init_packet(mv, expected_uuid=expected_uuid, channels=channels)
    ch = Channel(init)
    decomp = make_decompressor(compression)
    pos = INIT_PACKET_SIZE
    index = 0
    while pos < len(data):
        try:
            size = packet_header_size(mv, pos, packet_index=index)
            if size == DEVICE_STATE_HEADER_SIZE:
                dev = decode_device_state_header(mv, pos, packet_index=index)
                ch.device.append(dev)
                pos += size
                payload = mv[pos:pos + dev.payload_size]
                if len(payload) != dev.payload_size:
                    raise TruncatedStream("device-state payload cut short", offset=pos)
                pos += dev.payload_size
            else:
                pkt = decode_ram_packet(mv, pos, compression=compression,
                                        block_sizes=block_sizes, packet_index=index)
                ch.ram.append(pkt)
                pos += size
                payload = mv[pos:pos + pkt.payload_size]
                if len(payload) != pkt.payload_size:
                    raise TruncatedStream("RAM payload cut short", offset=pos)
                pos += pkt.payload_size
                if pkt.normal_pages:
                    ch.page_data.append(bytes(decomp.decompress(payload,
                                                                pkt.page_data_size)))
        except StreamFormatError as e:
            e.locate(f"multifd channel {init.channel_id}")
            raise
        index += 1
    return ch


def build_channel(compression: MultifdCompression, channel_id: int,
                  jobs: list[tuple[str, list[int], list[int]]], *,
                  first_packet_num: int = 0, seed: int = 0) -> tuple[bytes, list[bytes]]:
    """A channel stream: init packet, then one packet per job and a SYNC at the end."""
    comp = make_compressor(compression)
    parts = [InitPacket(UUID, channel_id).encode()]
    sent = []
    num = first_packet_num
    for i, (block, normal, zero) in enumerate(jobs):
        data = pages(len(normal), seed=seed * 1000 + i)
        payload = comp.compress(data) if normal else b""
        parts.append(encode_ram_packet(flags=int(compression.flag), ramblock=block,
                                       normal_offsets=normal, zero_offsets=zero,
                                       packet_num=num, payload_size=len(payload)))
        parts.append(payload)
        if normal:
            sent.append(b"".join(data))
        num += 1
    parts.append(encode_sync_packet(num))
    return b"".join(parts), sent


# --------------------------------------------------------------------------
# sizes


def test_sizes() -> None:
    assert INIT_PACKET_SIZE == 64
    assert RAM_HEADER_SIZE == 1344 == 320 + 8 * MULTIFD_PAGES_PER_PACKET
    assert COMMON_HEADER_SIZE == 12
    assert DEVICE_STATE_HEADER_SIZE == 276
    assert MAX_DEVICE_STATE_PACKET == 16 * MiB


# --------------------------------------------------------------------------
# initial packet


def test_init_packet_layout() -> None:
    raw = InitPacket(bytes(16), 1).encode()
    assert raw == bytes.fromhex("11223344 00000001") + bytes(16) + b"\x01" + bytes(39)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 254))
def test_init_packet_round_trip(uuid: bytes, channel_id: int) -> None:
    pkt = InitPacket(uuid, channel_id)
    raw = pkt.encode()
    assert len(raw) == INIT_PACKET_SIZE
    assert decode_init_packet(raw, expected_uuid=uuid, channels=channel_id + 1) == pkt
    # trailing bytes (the first packet) are not the init packet's business
    assert decode_init_packet(raw + b"\x11\x22", channels=255) == pkt
    assert decode_init_packet(b"xx" + raw, 2) == pkt


def test_init_packet_bad_magic_names_main_channel() -> None:
    raw = b"QEVM\x00\x00\x00\x03" + bytes(56)
    with pytest.raises(StreamFormatError) as info:
        decode_init_packet(raw)
    msg = str(info.value)
    assert "multifd initial packet: magic 0x5145564d, expected 0x11223344" in msg
    assert "main migration channel" in msg
    with pytest.raises(StreamFormatError, match="magic 0xdeadbeef, expected") as info:
        decode_init_packet(bytes.fromhex("deadbeef") + bytes(60))
    assert "main" not in str(info.value)


def test_init_packet_bad_version() -> None:
    raw = bytearray(InitPacket(UUID, 0).encode())
    raw[4:8] = struct.pack(">I", 2)
    with pytest.raises(StreamFormatError, match="version 2, expected 1"):
        decode_init_packet(raw)


def test_init_packet_channel_id_out_of_range() -> None:
    raw = InitPacket(UUID, 2).encode()
    assert decode_init_packet(raw, channels=3).channel_id == 2
    with pytest.raises(StreamFormatError, match=r"channel id 2, but multifd-channels is 2"):
        decode_init_packet(raw, channels=2)


def test_init_packet_uuid_mismatch() -> None:
    raw = InitPacket(UUID, 0).encode()
    with pytest.raises(StreamFormatError) as info:
        decode_init_packet(raw, expected_uuid=bytes(16))
    msg = str(info.value)
    assert "12345678-1234-5678-9abc-def012345678" in msg
    assert "00000000-0000-0000-0000-000000000000" in msg
    assert "channel 0" in msg


def test_init_packet_truncated() -> None:
    raw = InitPacket(UUID, 0).encode()
    for n in range(INIT_PACKET_SIZE):
        with pytest.raises(TruncatedStream, match=f"needs 64 bytes, only {n} present"):
            decode_init_packet(raw[:n])


def test_init_packet_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        InitPacket(b"short", 0).encode()
    with pytest.raises(ConfigError):
        InitPacket(UUID, 255).encode()
    with pytest.raises(ConfigError):
        InitPacket(UUID, -1).encode()


# --------------------------------------------------------------------------
# common header


def test_peek_common_header() -> None:
    raw = encode_sync_packet(7)
    assert peek_common_header(raw) == (0x11223344, 1, 1)
    assert not is_device_state(1)
    assert packet_header_size(raw[:COMMON_HEADER_SIZE]) == RAM_HEADER_SIZE
    dev = encode_device_state_header("dev", 0, 10)
    assert is_device_state(peek_common_header(dev)[2])
    assert packet_header_size(dev[:COMMON_HEADER_SIZE]) == DEVICE_STATE_HEADER_SIZE
    with pytest.raises(TruncatedStream):
        peek_common_header(raw[:11])
    with pytest.raises(StreamFormatError, match="packet 3: magic"):
        packet_header_size(b"QEVM" + raw[4:12], packet_index=3)
    with pytest.raises(StreamFormatError, match="version 9"):
        packet_header_size(raw[:4] + b"\0\0\0\x09" + raw[8:12])


# --------------------------------------------------------------------------
# RAM packets: valid


def _offsets(max_pages: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, max_pages - 1).map(lambda p: p * PAGE_SIZE),
                    max_size=MULTIFD_PAGES_PER_PACKET)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    normal=_offsets(BLOCKS["pc.ram"] // PAGE_SIZE),
    zero=_offsets(BLOCKS["pc.ram"] // PAGE_SIZE),
    compression=st.sampled_from(list(MultifdCompression)),
    sync=st.booleans(),
    packet_num=st.integers(0, 2**64 - 1),
    payload=st.integers(0, MAX_MULTIFD_COMPRESSED_PAYLOAD),
)
def test_ram_packet_round_trip(normal: list[int], zero: list[int],
                               compression: MultifdCompression, sync: bool,
                               packet_num: int, payload: int) -> None:
    zero = zero[:MULTIFD_PAGES_PER_PACKET - len(normal)]
    if compression is NONE or not normal:
        payload = len(normal) * PAGE_SIZE
    flags = int(compression.flag) | (int(MultifdFlag.SYNC) if sync else 0)
    raw = encode_ram_packet(flags=flags, ramblock="pc.ram", normal_offsets=normal,
                            zero_offsets=zero, packet_num=packet_num, payload_size=payload)
    assert len(raw) == RAM_HEADER_SIZE
    for buf in (raw, bytearray(raw), memoryview(raw), raw + b"payload"):
        pkt = decode_ram_packet(buf, compression=compression, block_sizes=BLOCKS)
        assert pkt.flags == flags
        assert pkt.is_sync == sync
        assert pkt.compression == compression.flag
        assert pkt.pages_alloc == MULTIFD_PAGES_PER_PACKET
        assert (pkt.normal_pages, pkt.zero_pages) == (len(normal), len(zero))
        assert pkt.normal.dtype == np.uint64 and pkt.zero.dtype == np.uint64
        assert pkt.normal.tolist() == normal
        assert pkt.zero.tolist() == zero
        assert pkt.packet_num == packet_num
        assert pkt.ramblock == "pc.ram"
        assert pkt.payload_size == (payload if normal else 0)
        assert pkt.page_data_size == len(normal) * PAGE_SIZE


def test_ram_packet_offsets_are_owned_copies() -> None:
    buf = bytearray(raw_ram(offsets=[0x1000, 0x2000], zero_offsets=[0x5000]))
    pkt = decode_ram_packet(buf, compression=NONE)
    buf[:] = bytes(len(buf))  # the I/O layer reuses its receive buffer
    assert pkt.normal.tolist() == [0x1000, 0x2000]
    assert pkt.zero.tolist() == [0x5000]


def test_ram_packet_at_offset_and_one_byte_at_a_time() -> None:
    raw = raw_ram(offsets=[0x3000], packet_num=5)
    stream = b"\xAA" * 10 + raw
    buf = bytearray()
    for i, b in enumerate(stream):
        buf.append(b)
        if len(buf) < 10 + RAM_HEADER_SIZE:
            with pytest.raises(TruncatedStream) as info:
                decode_ram_packet(buf, 10, compression=NONE)
            assert info.value.offset == 10
        else:
            assert i == len(stream) - 1
    pkt = decode_ram_packet(buf, 10, compression=NONE)
    assert pkt.normal.tolist() == [0x3000]
    assert pkt.packet_num == 5


def test_sync_packet_10_0_style() -> None:
    raw = encode_sync_packet(42)
    assert raw == raw_ram(flags=1, pages_alloc=0, next_size=0, packet_num=42, ramblock=b"")
    for compression in MultifdCompression:
        pkt = decode_ram_packet(raw, compression=compression, block_sizes=BLOCKS)
        assert pkt.is_sync and pkt.flags == 1
        assert (pkt.pages_alloc, pkt.normal_pages, pkt.zero_pages) == (0, 0, 0)
        assert pkt.ramblock == "" and pkt.payload_size == 0
        assert pkt.normal.size == 0 and pkt.zero.size == 0


def test_7_2_sync_with_data_and_method_bits() -> None:
    # 7.2 merges a SYNC request with a pending job: ZLIB|SYNC with one page.
    raw = raw_ram(flags=0x03, offsets=[0x3F000], next_size=188, packet_num=6,
                  ramblock=b"pc.bios")
    pkt = decode_ram_packet(raw, compression=ZLIB, block_sizes=BLOCKS, packet_index=4)
    assert pkt.is_sync and pkt.compression == MultifdFlag.ZLIB
    assert pkt.normal.tolist() == [0x3F000]
    assert pkt.payload_size == 188


def test_7_2_empty_packet_with_stale_fields() -> None:
    # ...followed by an empty packet, flags 0, stale next_packet_size and name.
    raw = raw_ram(flags=0, normal=0, next_size=188416, packet_num=6, ramblock=b"pc.bios")
    # no block lookup although the stale name is unknown
    pkt = decode_ram_packet(raw, compression=ZLIB, block_sizes={"pc.ram": 1 << 30})
    assert pkt.next_packet_size == 188416
    assert pkt.payload_size == 0
    assert pkt.ramblock == "pc.bios"
    # and a 7.2 SYNC-only packet: flags 0x01, pages_alloc 128, stale fields
    raw = raw_ram(flags=1, normal=0, next_size=4096, ramblock=b"pc.ram")
    pkt = decode_ram_packet(raw, compression=ZSTD, block_sizes={})
    assert pkt.is_sync and pkt.payload_size == 0


def test_10_0_zero_only_packet_carries_method_bit() -> None:
    raw = raw_ram(flags=0x04, next_size=0, zero_offsets=[0x3000, 0x2000],
                  ramblock=b"/rom@etc/acpi/tables")
    pkt = decode_ram_packet(raw, compression=ZSTD, block_sizes=BLOCKS)
    assert pkt.normal_pages == 0 and pkt.zero.tolist() == [0x3000, 0x2000]
    assert pkt.payload_size == 0
    # without the method bit it is refused: it lists pages
    with pytest.raises(StreamFormatError, match="compression flags 0x0"):
        decode_ram_packet(raw_ram(flags=0, next_size=0, zero_offsets=[0x3000]),
                          compression=ZSTD)


def test_7_2_sender_zero_pages_field_reads_zero() -> None:
    raw = bytearray(raw_ram(offsets=[0]))
    assert raw[32:40] == bytes(8)
    assert decode_ram_packet(raw, compression=NONE).zero_pages == 0


def test_ramblock_field_byte_255_is_nul() -> None:
    # 256 non-NUL bytes: like QEMU, byte 255 is taken as NUL -> a 255-char name
    raw = raw_ram(normal=0, ramblock=b"b" * 256)
    assert decode_ram_packet(raw, compression=NONE).ramblock == "b" * 255
    # padding after the NUL is not looked at
    raw = raw_ram(offsets=[0], ramblock=b"pc.ram\0garbage")
    assert decode_ram_packet(raw, compression=NONE, block_sizes=BLOCKS).ramblock == "pc.ram"


# --------------------------------------------------------------------------
# RAM packets: malformed


MALFORMED = [
    (raw_ram(magic=0x5145564D), StreamFormatError, "magic 0x5145564d, expected 0x11223344"),
    (raw_ram(version=2), StreamFormatError, "version 2, expected 1"),
    (raw_ram(pages_alloc=129), LimitExceeded, "pages_alloc 129 exceeds 128"),
    (raw_ram(pages_alloc=4, normal=5), StreamFormatError,
     "normal_pages 5 exceeds pages_alloc 4"),
    (raw_ram(pages_alloc=4, normal=3, zero=2), StreamFormatError,
     "zero_pages 2 exceeds pages_alloc 4 - normal_pages 3"),
    (raw_ram(flags=0x80, offsets=[0]), StreamFormatError, "unknown flag bits 0x80"),
    (raw_ram(flags=0x100000, offsets=[0]), StreamFormatError, "unknown flag bits 0x100000"),
    (raw_ram(flags=0x40, offsets=[0]), StreamFormatError, "device-state packet"),
    (raw_ram(flags=0x02, offsets=[0]), StreamFormatError,
     r"compression flags 0x2 \(zlib\), but multifd-compression here is none"),
    (raw_ram(flags=0x01 | 0x04, normal=0), StreamFormatError,
     r"compression flags 0x4 \(zstd\)"),
    (raw_ram(offsets=[0], ramblock=b"pc.r\xe4m"), StreamFormatError, "not ASCII"),
    (raw_ram(offsets=[0], ramblock=b"b" * 256), StreamFormatError,
     "unknown RAM block 'bbbb"),
    (raw_ram(offsets=[0], ramblock=b"pc.rom"), StreamFormatError, "unknown RAM block 'pc.rom'"),
    (raw_ram(offsets=[0x1000, 0x1234], packet_num=3), StreamFormatError,
     r"page offset 0x1234 \(normal page 1\) in block pc.ram is not 4096-byte aligned"),
    (raw_ram(offsets=[0x1000], zero_offsets=[0, 0x10000000]), StreamFormatError,
     r"page offset 0x10000000 \(zero page 1\) beyond block pc.ram \(256 MiB\)"),
    (raw_ram(offsets=[0x20000], ramblock=b"/rom@etc/acpi/tables"), StreamFormatError,
     r"page offset 0x20000 \(normal page 0\) beyond block /rom@etc/acpi/tables \(0.125 MiB\)"),
    (raw_ram(offsets=[0xFFFFFFFFFFFFF000]), StreamFormatError, "beyond block pc.ram"),
    (raw_ram(offsets=[0], next_size=4095), StreamFormatError,
     "payload size 4095 for 1 uncompressed pages, expected 4096"),
    (raw_ram(offsets=[0, 0x1000], next_size=0), StreamFormatError,
     "payload size 0 for 2 uncompressed pages"),
]


@pytest.mark.parametrize(("raw", "cls", "message"), MALFORMED)
def test_ram_packet_malformed(raw: bytes, cls: type[Exception], message: str) -> None:
    with pytest.raises(cls, match=message) as info:
        decode_ram_packet(b"\0" * 8 + raw, 8, compression=NONE, block_sizes=BLOCKS)
    assert info.value.offset == 8  # type: ignore[attr-defined]


def test_ram_packet_unaligned_checked_without_block_sizes() -> None:
    with pytest.raises(StreamFormatError, match="not 4096-byte aligned"):
        decode_ram_packet(raw_ram(offsets=[0x10]), compression=NONE)
    # but sizes are not known: a far offset passes
    pkt = decode_ram_packet(raw_ram(offsets=[1 << 40]), compression=NONE)
    assert pkt.normal.tolist() == [1 << 40]


def test_block_smaller_than_a_page() -> None:
    with pytest.raises(StreamFormatError, match="beyond block tiny"):
        decode_ram_packet(raw_ram(offsets=[0], ramblock=b"tiny"), compression=NONE,
                          block_sizes={"tiny": 100})


def test_compressed_payload_too_large() -> None:
    raw = raw_ram(flags=0x02, offsets=[0], next_size=MAX_MULTIFD_COMPRESSED_PAYLOAD + 1)
    with pytest.raises(LimitExceeded, match="compressed payload size 1048577 exceeds"):
        decode_ram_packet(raw, compression=ZLIB)
    raw = raw_ram(flags=0x02, offsets=[0], next_size=MAX_MULTIFD_COMPRESSED_PAYLOAD)
    assert decode_ram_packet(raw, compression=ZLIB).payload_size == MAX_MULTIFD_COMPRESSED_PAYLOAD


def test_wrong_method_on_data_packet() -> None:
    raw = raw_ram(flags=0x02, offsets=[0], next_size=100)
    with pytest.raises(StreamFormatError, match=r"\(zlib\), but multifd-compression here is zstd"):
        decode_ram_packet(raw, compression=ZSTD)
    raw = raw_ram(flags=0x08, offsets=[0], next_size=100)
    with pytest.raises(StreamFormatError, match=r"0x8 \(qpl\)"):
        decode_ram_packet(raw, compression=ZLIB)


def test_ram_packet_truncated() -> None:
    raw = raw_ram(offsets=[0])
    for n in (0, 1, 11, 12, 63, 320, RAM_HEADER_SIZE - 1):
        with pytest.raises(TruncatedStream, match=f"needs 1344 bytes, only {n} present"):
            decode_ram_packet(raw[:n], compression=NONE)


def test_error_message_names_packet_and_channel() -> None:
    raw = raw_ram(offsets=[0x1F000000], packet_num=18)
    with pytest.raises(StreamFormatError) as info:
        decode_ram_packet(raw, compression=NONE, block_sizes=BLOCKS, packet_index=18)
    err = info.value.locate("multifd channel 2", base_offset=0x4000)
    assert str(err) == ("multifd channel 2, offset 0x4000: packet 18: page offset 0x1f000000 "
                        "(normal page 0) beyond block pc.ram (256 MiB)")


def test_encode_ram_packet_refuses_bad_arguments() -> None:
    ok: dict[str, Any] = {"flags": 0, "ramblock": "pc.ram", "normal_offsets": [0],
                          "zero_offsets": [], "packet_num": 0, "payload_size": 4096}
    encode_ram_packet(**ok)
    changes: list[dict[str, Any]] = [{"flags": 0x40}, {"flags": 0x80}, {"ramblock": "x" * 256},
               {"ramblock": "pc.r\xe4m"}, {"normal_offsets": list(range(129))},
               {"normal_offsets": [-1]}, {"pages_alloc": 129},
               {"normal_offsets": [0, 1], "pages_alloc": 1}, {"payload_size": 1 << 32},
               {"packet_num": -1}]
    for change in changes:
        with pytest.raises(ConfigError):
            encode_ram_packet(**{**ok, **change})


# --------------------------------------------------------------------------
# page_runs


def _runs_reference(offsets: list[int], page_size: int = PAGE_SIZE) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for o in offsets:
        if runs and runs[-1][0] + runs[-1][1] == o:
            runs[-1][1] += page_size
        else:
            runs.append([o, page_size])
    return [(a, b) for a, b in runs]


def test_page_runs_examples() -> None:
    arr = np.array([0x3000, 0x4000, 0x5000, 0x1000, 0x2000, 0x9000, 0x8000], dtype=np.uint64)
    assert page_runs(arr) == [(0x3000, 0x3000), (0x1000, 0x2000), (0x9000, 0x1000),
                              (0x8000, 0x1000)]
    assert page_runs(np.empty(0, dtype=np.uint64)) == []
    assert page_runs(np.array([0x7000], dtype=np.uint64)) == [(0x7000, 0x1000)]
    # a uint64 wrap-around is not a run
    wrap = np.array([2**64 - PAGE_SIZE, 0], dtype=np.uint64)
    assert page_runs(wrap) == [(2**64 - PAGE_SIZE, PAGE_SIZE), (0, PAGE_SIZE)]
    # big-endian views straight from a packet work too
    be = np.frombuffer(struct.pack(">3Q", 0, 0x1000, 0x2000), dtype=">u8")
    assert page_runs(be) == [(0, 0x3000)]
    assert all(type(x) is int for run in page_runs(arr) for x in run)


def test_page_runs_shuffled() -> None:
    rng = random.Random(7)
    for _ in range(50):
        offsets = [p * PAGE_SIZE for p in range(200)]
        # shuffle chunks so that runs of various lengths survive
        chunks = []
        while offsets:
            n = rng.randint(1, 9)
            chunks.append(offsets[:n])
            offsets = offsets[n:]
        rng.shuffle(chunks)
        order = [o for c in chunks for o in c]
        runs = page_runs(np.array(order, dtype=np.uint64))
        assert runs == _runs_reference(order)
        assert sum(n for _, n in runs) == 200 * PAGE_SIZE


@given(st.lists(st.integers(0, 64).map(lambda p: p * PAGE_SIZE), max_size=128))
def test_page_runs_matches_reference(offsets: list[int]) -> None:
    assert page_runs(np.array(offsets, dtype=np.uint64)) == _runs_reference(offsets)


def test_packet_runs_cover_payload_in_order() -> None:
    # a receiver scatters the payload run by run; check it lands where the
    # offsets say
    order = [0x5000, 0x6000, 0x0, 0x1000, 0x3000]
    data = pages(len(order), seed=3)
    raw = raw_ram(offsets=order)
    pkt = decode_ram_packet(raw, compression=NONE)
    payload = memoryview(b"".join(data))
    memory = bytearray(0x7000)
    pos = 0
    for start, length in page_runs(pkt.normal):
        memory[start:start + length] = payload[pos:pos + length]
        pos += length
    assert pos == len(payload)
    for off, page in zip(order, data, strict=True):
        assert memory[off:off + PAGE_SIZE] == page


# --------------------------------------------------------------------------
# device-state packets


@given(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=255),
       st.integers(0, 2**32 - 1), st.integers(1, MAX_DEVICE_STATE_PACKET))
def test_device_state_round_trip(idstr: str, instance_id: int, size: int) -> None:
    raw = encode_device_state_header(idstr, instance_id, size)
    assert len(raw) == DEVICE_STATE_HEADER_SIZE
    assert is_device_state(peek_common_header(raw)[2])
    pkt = decode_device_state_header(raw + b"payload")
    assert pkt == DeviceStatePacket(idstr, instance_id, size)


DEV_MALFORMED = [
    (raw_dev(magic=0x5145564D), StreamFormatError, "magic 0x5145564d"),
    (raw_dev(version=0), StreamFormatError, "version 0, expected 1"),
    (raw_dev(flags=0x41), StreamFormatError, "SYNC is not allowed"),
    (raw_dev(flags=0x42), StreamFormatError, "compression zlib is not allowed"),
    (raw_dev(flags=0x00), StreamFormatError, "DEVICE_STATE is not set"),
    (raw_dev(flags=0xC0), StreamFormatError, "unknown flag bits 0x80"),
    (raw_dev(idstr=b"x" * 256), StreamFormatError, "not NUL-terminated"),
    (raw_dev(idstr=b"dev\xff"), StreamFormatError, "not ASCII"),
    (raw_dev(size=0), StreamFormatError, "empty payload"),
    (raw_dev(size=MAX_DEVICE_STATE_PACKET + 1), LimitExceeded, "exceeds the limit 16777216"),
]


@pytest.mark.parametrize(("raw", "cls", "message"), DEV_MALFORMED)
def test_device_state_malformed(raw: bytes, cls: type[Exception], message: str) -> None:
    with pytest.raises(cls, match=message):
        decode_device_state_header(raw, packet_index=1)


def test_device_state_truncated() -> None:
    raw = raw_dev()
    for n in range(DEVICE_STATE_HEADER_SIZE):
        with pytest.raises(TruncatedStream, match="needs 276 bytes"):
            decode_device_state_header(raw[:n])
    assert decode_device_state_header(raw).idstr == "0000:00:04.0/vfio"


def test_device_state_encode_refuses_bad_arguments() -> None:
    for args in (("x" * 256, 0, 1), ("d\xe9v", 0, 1), ("dev", 0, 0),
                 ("dev", 0, MAX_DEVICE_STATE_PACKET + 1), ("dev", 2**32, 1)):
        with pytest.raises(ConfigError):
            encode_device_state_header(*args)


# --------------------------------------------------------------------------
# compression


@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
def test_one_stream_per_channel(compression: MultifdCompression) -> None:
    comp = make_compressor(compression)
    batches = [pages(n, seed=n) for n in (1, 128, 37)]
    payloads = [comp.compress(b) for b in batches]
    if compression is ZLIB:
        assert payloads[0][:2] == b"\x78\x01"
        assert all(p.endswith(b"\x00\x00\xff\xff") for p in payloads)
        assert not payloads[1].startswith(b"\x78\x01")
    else:
        assert payloads[0][:4] == b"\x28\xb5\x2f\xfd"
        assert all(b"\x28\xb5\x2f\xfd" not in p for p in payloads[1:])
    decomp = make_decompressor(compression)
    for batch, payload in zip(batches, payloads, strict=True):
        out = decomp.decompress(memoryview(payload), len(batch) * PAGE_SIZE)
        assert bytes(out) == b"".join(batch)
    # a later payload does not decode on its own
    with pytest.raises(StreamFormatError, match="one stream per channel"):
        make_decompressor(compression).decompress(payloads[1], 128 * PAGE_SIZE)


@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
def test_decompressor_wrong_length_and_poisoned(compression: MultifdCompression) -> None:
    comp = make_compressor(compression)
    p1 = comp.compress(pages(4))
    p2 = comp.compress(pages(2, seed=1))
    decomp = make_decompressor(compression)
    with pytest.raises(StreamFormatError, match="more than the 12288 bytes"):
        decomp.decompress(p1, 3 * PAGE_SIZE)
    # the stream is out of step now: fail fast
    with pytest.raises(StreamFormatError, match="already failed"):
        decomp.decompress(p2, 2 * PAGE_SIZE)
    decomp = make_decompressor(compression)
    with pytest.raises(StreamFormatError, match="decompresses to 16384 bytes, expected 20480"):
        decomp.decompress(p1, 5 * PAGE_SIZE)


@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
def test_decompression_bomb_is_bounded(compression: MultifdCompression) -> None:
    # 64 MiB of zeros compress to a few KiB; the packet announces one page
    if compression is ZLIB:
        c = zlib.compressobj(9)
        payload = c.compress(bytes(64 * MiB)) + c.flush(zlib.Z_SYNC_FLUSH)
    else:
        payload = ZstdChannelCompressor(level=1).compress([bytes(64 * MiB)])
    assert len(payload) < MAX_MULTIFD_COMPRESSED_PAYLOAD
    with pytest.raises(StreamFormatError, match="more than the 4096 bytes"):
        make_decompressor(compression).decompress(payload, PAGE_SIZE)


@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
def test_refused_payloads_do_not_leak(compression: MultifdCompression) -> None:
    # Each refusal needs a fresh decompressor (a failed one fails fast). Before the
    # fix every zstd refusal kept about 1 MiB: the stream writer's output buffer
    # (leaked by python-zstandard when the sink raised) and the poisoned
    # decompressor kept alive by its own error's traceback.
    payload = make_compressor(compression).compress(pages(MULTIFD_PAGES_PER_PACKET))
    before = rss_bytes()
    for _ in range(300):
        with pytest.raises(StreamFormatError, match="more than the 4096 bytes") as info:
            make_decompressor(compression).decompress(payload, PAGE_SIZE)
        del info
    assert rss_bytes() - before < 24 * MiB


@pytest.mark.parametrize("compression", [ZLIB, ZSTD])
@settings(max_examples=100)
@given(data=st.binary(max_size=512))
def test_decompressor_garbage(compression: MultifdCompression, data: bytes) -> None:
    try:
        out = make_decompressor(compression).decompress(data, PAGE_SIZE)
    except StreamFormatError:
        return
    assert len(out) == PAGE_SIZE


def test_zlib_stream_end_refused() -> None:
    payload = zlib.compress(bytes(PAGE_SIZE))  # Z_FINISH: QEMU never ends the stream
    with pytest.raises(StreamFormatError, match="stream ended"):
        ZlibChannelDecompressor().decompress(payload, PAGE_SIZE)


def test_decompressor_refuses_impossible_length() -> None:
    for d in (ZlibChannelDecompressor(), ZstdChannelDecompressor(), NoCompression()):
        with pytest.raises(ConfigError):
            d.decompress(b"", 513 << 10)


def test_no_compression() -> None:
    data = pages(2)
    payload = NoCompression().compress(data)
    assert NoCompression().decompress(payload, 2 * PAGE_SIZE) == payload
    assert bytes(NoCompression().decompress(bytearray(payload), 2 * PAGE_SIZE)) == payload
    with pytest.raises(StreamFormatError, match="8191 bytes, expected 8192"):
        NoCompression().decompress(payload[:-1], 2 * PAGE_SIZE)


def test_compressor_levels() -> None:
    with pytest.raises(ConfigError):
        ZlibChannelCompressor(level=10)
    with pytest.raises(ConfigError):
        ZstdChannelCompressor(level=0)
    data = pages(8)
    for level in (1, 9):
        payload = ZlibChannelCompressor(level).compress(data)
        assert ZlibChannelDecompressor().decompress(payload, 8 * PAGE_SIZE) == b"".join(data)
    payload = ZstdChannelCompressor(19).compress(data)
    assert ZstdChannelDecompressor().decompress(payload, 8 * PAGE_SIZE) == b"".join(data)


# --------------------------------------------------------------------------
# whole channels


@pytest.mark.parametrize("compression", list(MultifdCompression))
def test_channel_end_to_end(compression: MultifdCompression) -> None:
    jobs = [
        ("pc.ram", [p * PAGE_SIZE for p in range(128)], []),
        ("pc.bios", [0x3F000, 0x3E000], [0x0, 0x1000]),
        ("/rom@etc/acpi/tables", [], [0x3000, 0x2000]),  # zero-only (10.0)
        ("pc.ram", [0x10000000 - PAGE_SIZE], list(range(0, 0x7F000, PAGE_SIZE))),
    ]
    data, sent = build_channel(compression, 1, jobs, first_packet_num=100)
    ch = walk_channel(data, compression, block_sizes=BLOCKS, channels=2, expected_uuid=UUID)
    assert ch.init == InitPacket(UUID, 1)
    assert [p.packet_num for p in ch.ram] == [100, 101, 102, 103, 104]
    assert [p.ramblock for p in ch.ram] == [j[0] for j in jobs] + [""]
    assert ch.ram[-1].is_sync
    assert ch.page_data == sent
    for pkt, (_, normal, zero) in zip(ch.ram, jobs, strict=False):  # ch.ram ends in a sync
        assert pkt.normal.tolist() == normal and pkt.zero.tolist() == zero


def test_channel_error_is_located() -> None:
    jobs: list[tuple[str, list[int], list[int]]] = [("pc.ram", [0], []),
                                                    ("pc.ram", [0x1F000000], [])]
    data, _ = build_channel(NONE, 2, jobs)
    with pytest.raises(StreamFormatError) as info:
        walk_channel(data, NONE, block_sizes=BLOCKS)
    assert info.value.offset == INIT_PACKET_SIZE + RAM_HEADER_SIZE + PAGE_SIZE == 0x1580
    assert str(info.value) == (
        "multifd channel 2, offset 0x1580: packet 1: page offset 0x1f000000 (normal page 0) "
        "beyond block pc.ram (256 MiB)")


def test_channel_with_device_state_packets() -> None:
    parts = [InitPacket(bytes(16), 0).encode(), encode_sync_packet(0)]
    blob = os.urandom(1000)
    parts += [encode_device_state_header("0000:00:04.0/vfio", 0, len(blob)), blob]
    parts += [encode_ram_packet(flags=0, ramblock="pc.ram", normal_offsets=[0],
                                zero_offsets=None, packet_num=1, payload_size=PAGE_SIZE),
              bytes(PAGE_SIZE)]
    ch = walk_channel(b"".join(parts), NONE, block_sizes=BLOCKS)
    assert ch.device == [DeviceStatePacket("0000:00:04.0/vfio", 0, 1000)]
    assert [p.packet_num for p in ch.ram] == [0, 1]


# --------------------------------------------------------------------------
# fuzz: decode, or raise our error, nothing else


def _must_parse_or_fail_cleanly(fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(MigrationError):
        fn(*args, **kwargs)


@settings(max_examples=300)
@given(data=st.binary(max_size=1500), offset=st.integers(0, 8),
       compression=st.sampled_from(list(MultifdCompression)),
       blocks=st.sampled_from([None, BLOCKS, {}]), channels=st.sampled_from([None, 1, 4]))
def test_fuzz_arbitrary_bytes(data: bytes, offset: int, compression: MultifdCompression,
                              blocks: dict[str, int] | None, channels: int | None) -> None:
    _must_parse_or_fail_cleanly(decode_init_packet, data, offset, channels=channels,
                                expected_uuid=bytes(16))
    _must_parse_or_fail_cleanly(decode_ram_packet, data, offset, compression=compression,
                                block_sizes=blocks)
    _must_parse_or_fail_cleanly(decode_device_state_header, data, offset)
    _must_parse_or_fail_cleanly(packet_header_size, data, offset)


_VALID_HEADERS = [
    InitPacket(UUID, 1).encode(),
    raw_ram(offsets=[0, 0x1000], zero_offsets=[0x8000]),
    raw_ram(flags=0x03, offsets=[0x3F000], next_size=188, ramblock=b"pc.bios"),
    encode_sync_packet(3),
    raw_dev(),
]


@settings(max_examples=500)
@given(base=st.sampled_from(_VALID_HEADERS),
       edits=st.lists(st.tuples(st.integers(0, RAM_HEADER_SIZE - 1), st.integers(0, 255)),
                      max_size=8),
       cut=st.integers(0, RAM_HEADER_SIZE),
       compression=st.sampled_from(list(MultifdCompression)),
       blocks=st.sampled_from([None, BLOCKS]))
def test_fuzz_mutated_headers(base: bytes, edits: list[tuple[int, int]], cut: int,
                              compression: MultifdCompression,
                              blocks: dict[str, int] | None) -> None:
    buf = bytearray(base)
    for pos, value in edits:
        if pos < len(buf):
            buf[pos] = value
    # also reach the count and flag fields more often than uniform edits would
    if edits and len(buf) > 24:
        buf[edits[0][1] % 24] ^= 0xFF
    buf = buf[:cut] if cut < len(buf) else buf
    _must_parse_or_fail_cleanly(decode_init_packet, buf, channels=2, expected_uuid=UUID)
    _must_parse_or_fail_cleanly(decode_ram_packet, buf, compression=compression,
                                block_sizes=blocks, packet_index=0)
    _must_parse_or_fail_cleanly(decode_device_state_header, buf)


# --------------------------------------------------------------------------
# real captures from QEMU 7.2 and 10.0 (tests/data, recorded by make_captures.py)


DATA = Path(__file__).parent / "data"


def _multifd_captures() -> list[dict[str, Any]]:
    index = DATA / "captures.json"
    if not index.exists():
        return []
    captures = json.loads(index.read_text())["captures"]
    return [c for c in captures if c["kind"] == "multifd"]


def _read_capture(directory: Path, conn: dict[str, Any]) -> bytes:
    path = directory / conn["file"]
    data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    assert len(data) == conn["nbytes"]
    return data


def _blob(size: int, seed: int) -> bytes:
    """The blob content the capture's guest was loaded with (see captures.json)."""
    words = np.random.default_rng(seed).bit_generator.random_raw((size + 7) // 8)
    return np.asarray(words, dtype="<u8").tobytes()[:size]


def _ram_block_sizes(main: bytes) -> dict[str, int]:
    """The MEM_SIZE block list at the start of the main stream's "ram" section.

    Just enough of the main stream for these tests: header, CONFIGURATION
    section, then the first SECTION_START, which is "ram" in every capture.
    """
    assert main[:8] == b"QEVM\x00\x00\x00\x03"
    pos = 8
    if main[pos] == 0x07:  # CONFIGURATION: be32 length + machine name
        (n,) = struct.unpack_from(">I", main, pos + 1)
        pos += 5 + n
    assert main[pos] == 0x01  # SECTION_START
    pos += 5
    name = main[pos + 1:pos + 1 + main[pos]]
    assert name == b"ram"
    pos += 1 + len(name) + 8  # idstr, instance_id, version_id
    (word,) = struct.unpack_from(">Q", main, pos)
    assert word & 0x4  # RAM_SAVE_FLAG_MEM_SIZE
    total = word & ~0xFFF
    pos += 8
    blocks: dict[str, int] = {}
    while sum(blocks.values()) < total:
        n = main[pos]
        idstr = main[pos + 1:pos + 1 + n].decode("ascii")
        (blocks[idstr],) = struct.unpack_from(">Q", main, pos + 1 + n)
        pos += 1 + n + 8
    assert sum(blocks.values()) == total
    return blocks


CAPTURES = _multifd_captures()


@pytest.mark.skipif(not CAPTURES, reason="no multifd captures in tests/data")
@pytest.mark.parametrize("capture", CAPTURES, ids=[c["name"] for c in CAPTURES])
def test_qemu_capture(capture: dict[str, Any]) -> None:
    """Every multifd connection of a real migration decodes end to end.

    Initial packet, then every packet to the end of the connection with one
    decompressor per channel; every payload has exactly the announced size, the
    page count matches what QEMU reported, and the pages rebuild the guest's
    known RAM content.
    """
    directory = DATA / capture["files"]["dir"]
    compression = MultifdCompression(capture["parameters"]["multifd-compression"])
    channels = capture["parameters"]["multifd-channels"]
    uuid = bytes(16) if capture["uuid"] is None else bytes.fromhex(
        capture["uuid"].replace("-", ""))
    conns = capture["connections"]
    main = next(c for c in conns if c["role"] == "main")
    blocks = _ram_block_sizes(_read_capture(directory, main))
    assert blocks["pc.ram"] == capture["memory_bytes"]

    decoded = []
    for conn in conns:
        if conn["role"] != "multifd":
            continue
        data = _read_capture(directory, conn)
        ch = walk_channel(data, compression, block_sizes=blocks, channels=channels,
                          expected_uuid=uuid)
        assert ch.init.channel_id == conn["channel_id"]
        assert any(p.is_sync for p in ch.ram)
        assert not ch.device
        decoded.append(ch)
    assert sorted(ch.init.channel_id for ch in decoded) == list(range(channels))

    # every page QEMU counted as "normal" went through a channel
    query = json.loads((DATA / capture["files"]["query_migrate"]).read_text())
    assert sum(p.normal_pages for ch in decoded for p in ch.ram) == query["ram"]["normal"]

    # rebuild pc.ram: the blobs are where captures.json says, the rest is zero
    ram = bytearray(blocks["pc.ram"])
    for ch in decoded:
        data_packets = [p for p in ch.ram if p.normal_pages]
        assert len(data_packets) == len(ch.page_data)
        for pkt, page_data in zip(data_packets, ch.page_data, strict=True):
            assert len(page_data) == pkt.page_data_size
            if pkt.ramblock != "pc.ram":
                continue
            pos = 0
            for start, length in page_runs(pkt.normal):
                ram[start:start + length] = page_data[pos:pos + length]
                pos += length
        for pkt in ch.ram:
            if pkt.ramblock == "pc.ram":
                for start, length in page_runs(pkt.zero):
                    ram[start:start + length] = bytes(length)
    expected = bytearray(blocks["pc.ram"])
    for blob in capture["blobs"]:
        expected[blob["addr"]:blob["addr"] + blob["size"]] = _blob(blob["size"], blob["seed"])
    assert ram == expected
