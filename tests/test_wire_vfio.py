"""Tests for livemig.wire.vfio_section (VFIO main-stream bodies) and wire.vfio_packet."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import ConfigError, LimitExceeded, StreamFormatError, TruncatedStream
from livemig.wire.vfio_packet import (
    VFIO_INVALID_IDX,
    VfioPacketFlag,
    decode_vfio_packet_header,
    encode_vfio_packet_header,
)
from livemig.wire.vfio_section import (
    MAX_VFIO_DATA_CHUNK,
    VfioConfig,
    VfioData,
    VfioDataHeader,
    VfioEndOfState,
    VfioInitDataSent,
    VfioMigFlag,
    VfioSectionDecoder,
    VfioSetup,
    decode_config_blob,
    encode_complete,
    encode_config,
    encode_config_blob,
    encode_end_of_state,
    encode_iterate,
    encode_setup,
)

BE64 = struct.Struct(">Q")


def be64(v: int) -> bytes:
    return BE64.pack(v)


def join(bufs: list) -> bytes:
    return b"".join(bytes(b) for b in bufs)


def decode(body: bytes, *, mode: str = "whole", final: bool = False, **kw) -> tuple[list, int]:
    """Decode ``body`` whole or one byte at a time; returns (summarised events, consumed).

    Data pieces are joined per chunk so both modes give the same result.
    """
    dec = VfioSectionDecoder(**kw)
    events: list = []
    if mode == "whole":
        evs, pos = dec.parse(body, 0, len(body), final=final)
        events.extend(evs)
    else:
        buf = bytearray()
        pos = 0  # position reached in the stream
        for i in range(len(body)):
            buf += body[i:i + 1]
            evs, used = dec.parse(bytes(buf), 0, len(buf), base=pos,
                                  final=final and i == len(body) - 1)
            events.extend((type(e), bytes(e.data)) if isinstance(e, (VfioData, VfioConfig))
                          else e for e in evs)
            del buf[:used]
            pos += used
            if dec.done:
                break
    out: list[Any] = []
    for event in events:
        e = (type(event), bytes(event.data)) if isinstance(event, (VfioData, VfioConfig)) \
            else event
        if isinstance(e, tuple) and e[0] is VfioData and out and isinstance(out[-1], tuple) \
                and out[-1][0] is VfioData:
            out[-1] = (VfioData, out[-1][1] + e[1])
        else:
            out.append(e)
    return out, pos


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("trailing", [b"", b"\x7e\x00\x00\x00\x05"])
def test_qemu_bodies(mode: str, trailing: bytes) -> None:
    setup = encode_setup()
    assert setup == be64(VfioMigFlag.DEV_SETUP_STATE) + be64(VfioMigFlag.END_OF_STATE)
    evs, pos = decode(setup + trailing, mode=mode)
    assert evs == [VfioSetup(0)] and pos == len(setup)

    part = join(encode_iterate([b"abc"]))
    assert part == (be64(VfioMigFlag.DEV_DATA_STATE) + be64(3) + b"abc"
                    + be64(VfioMigFlag.END_OF_STATE))
    evs, pos = decode(part + trailing, mode=mode)
    assert evs == [VfioDataHeader(3, 0), (VfioData, b"abc"), VfioEndOfState(19)]
    assert pos == len(part)

    part = join(encode_iterate([b"x" * 10], init_data_sent=True))
    evs, pos = decode(part + trailing, mode=mode)
    assert evs[-1] == VfioInitDataSent(26) and pos == len(part)

    end = join(encode_complete([b"1" * 5, b"", b"22"]))
    evs, pos = decode(end + trailing, mode=mode)
    assert evs == [VfioDataHeader(5, 0), (VfioData, b"11111"), VfioDataHeader(2, 21),
                   (VfioData, b"22"), VfioEndOfState(39)]

    full = join(encode_config(b"CFG"))
    evs, pos = decode(full + trailing, mode=mode, config_size=3)
    assert evs == [(VfioConfig, b"CFG")] and pos == len(full)

    assert decode(encode_end_of_state() + trailing, mode=mode)[0] == [VfioEndOfState(0)]


def test_config_to_end_of_body_needs_final() -> None:
    full = encode_config_blob(b"config!")
    dec = VfioSectionDecoder()
    assert dec.parse(full, 0, len(full)) == ([], 8)  # waits for the end of the body
    evs, pos = dec.parse(full, 8, len(full), final=True)
    assert bytes(evs[0].data) == b"config!" and pos == len(full) and dec.done
    assert bytes(decode_config_blob(full)) == b"config!"


def test_qemu_7_2_zero_size_data_chunk() -> None:
    body = be64(VfioMigFlag.DEV_DATA_STATE) + be64(0) + be64(VfioMigFlag.END_OF_STATE)
    evs, _ = decode(body)
    assert evs == [VfioDataHeader(0, 0), VfioEndOfState(16)]


@pytest.mark.parametrize(("body", "match"), [
    (be64(VfioMigFlag.DEV_SETUP_STATE) + be64(VfioMigFlag.DEV_DATA_STATE), "not END_OF_STATE"),
    (be64(0x1234), "unknown VFIO marker 0x0000000000001234"),
    (be64(VfioMigFlag.DEV_DATA_STATE_COMPLETE), "RFC"),
    (be64(VfioMigFlag.DEV_CONFIG_STATE) + b"ab" + be64(VfioMigFlag.END_OF_STATE), "multifd"),
])
def test_bad_bodies(body: bytes, match: str) -> None:
    dec = VfioSectionDecoder(multifd_transfer=True, where="section x/vfio")
    with pytest.raises(StreamFormatError, match=match) as info:
        dec.parse(body, final=True)
    assert info.value.where == "section x/vfio"
    with pytest.raises(StreamFormatError):  # poisoned
        dec.parse(encode_setup())


def test_limits_and_truncation() -> None:
    big = be64(VfioMigFlag.DEV_DATA_STATE) + be64(MAX_VFIO_DATA_CHUNK + 1)
    with pytest.raises(LimitExceeded, match="exceeds the limit"):
        VfioSectionDecoder().parse(big)
    cut = be64(VfioMigFlag.DEV_DATA_STATE) + be64(10) + b"abc"
    with pytest.raises(TruncatedStream, match="inside device data"):
        VfioSectionDecoder().parse(cut, final=True)
    with pytest.raises(StreamFormatError, match="followed by"):
        VfioSectionDecoder(config_size=2).parse(encode_config_blob(b"abc"))
    with pytest.raises(StreamFormatError, match="expected DEV_CONFIG_STATE"):
        decode_config_blob(encode_setup())
    with pytest.raises(StreamFormatError, match="after the config"):
        decode_config_blob(encode_config_blob(b"a") + b"x", config_size=1)
    with pytest.raises(ConfigError):
        VfioSectionDecoder(config_size=-1)


chunks = st.lists(st.binary(min_size=0, max_size=300), max_size=6)


@given(chunks, st.booleans(), st.integers(1, 64))
def test_round_trip(data: list[bytes], init_sent: bool, step: int) -> None:
    body = join(encode_iterate(data, init_data_sent=init_sent))
    dec = VfioSectionDecoder()
    got, headers, pos, end = b"", 0, 0, 0
    while not dec.done:
        end = min(len(body), end + step)  # the bytes that have "arrived"
        evs, pos = dec.parse(body, pos, end)
        for e in evs:
            if isinstance(e, VfioData):
                got += bytes(e.data)
            elif isinstance(e, VfioDataHeader):
                headers += 1
    assert got == b"".join(data)
    assert headers == sum(1 for d in data if d)
    assert isinstance(evs[-1], VfioInitDataSent if init_sent else VfioEndOfState)


@given(st.binary(max_size=200), st.booleans(), st.booleans())
@settings(max_examples=300)
def test_fuzz_parse_or_our_error(blob: bytes, final: bool, multifd: bool) -> None:
    markers = [be64(f) for f in VfioMigFlag]
    # Bias towards valid markers so the decoder gets past the first word.
    body = b"".join(markers[b % len(markers)] if b < 64 else bytes([b]) for b in blob)
    dec = VfioSectionDecoder(multifd_transfer=multifd)
    with contextlib.suppress(StreamFormatError):
        dec.parse(body, final=final)


@given(st.binary(max_size=40))
def test_fuzz_packet_header(blob: bytes) -> None:
    try:
        h = decode_vfio_packet_header(blob)
    except StreamFormatError:
        return
    assert encode_vfio_packet_header(h.idx, config=h.is_config) == blob[:12]


def test_packet_header() -> None:
    assert encode_vfio_packet_header(5) == b"\0\0\0\0\0\0\0\x05\0\0\0\0"
    h = decode_vfio_packet_header(encode_vfio_packet_header(7, config=True) + b"data")
    assert (h.version, h.idx, h.flags, h.is_config) == (0, 7, VfioPacketFlag.CONFIG_STATE, True)
    with pytest.raises(StreamFormatError, match="shorter than its 12-byte header"):
        decode_vfio_packet_header(b"\0" * 11)
    with pytest.raises(StreamFormatError, match="unknown version 1"):
        decode_vfio_packet_header(struct.pack(">III", 1, 0, 0))
    with pytest.raises(StreamFormatError, match="invalid"):
        decode_vfio_packet_header(struct.pack(">III", 0, VFIO_INVALID_IDX, 0))
    with pytest.raises(StreamFormatError, match="unknown flag bits 0x2"):
        decode_vfio_packet_header(struct.pack(">III", 0, 3, 2))
    with pytest.raises(ConfigError):
        encode_vfio_packet_header(VFIO_INVALID_IDX)
