"""Device state in captures: VFIO sections split without their device, the
snapshot's device-state trailer (format, hostile trailers), and the checks
``livemig receive`` applies to multifd device-state packets it keeps.

The end-to-end capture (``livemig run`` with vfio-sim devices -> ``livemig
receive`` -> ``livemig inspect``) is in ``test_vfio_engine.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import LimitExceeded, StreamFormatError, TruncatedStream
from livemig.io.channels import FileSource
from livemig.migration.destination.device_state_capture import DeviceStateRecorder
from livemig.migration.source.device_state_packets import device_state_packets
from livemig.wire.constants import SectionType
from livemig.wire.cursor import Incomplete
from livemig.wire.device_state_trailer import (
    FOOTER_SIZE,
    TRAILER_HEADER_SIZE,
    encode_trailer_footer,
    encode_trailer_header,
    scan_trailer,
)
from livemig.wire.events import DeviceSection
from livemig.wire.multifd import DEVICE_STATE_HEADER_SIZE
from livemig.wire.stream import (
    MainStreamDecoder,
    encode_configuration,
    encode_file_header,
    encode_footer,
    encode_section_header,
)
from livemig.wire.vfio_packet import encode_vfio_packet_header
from livemig.wire.vfio_section import (
    encode_complete,
    encode_config_blob,
    encode_iterate,
    encode_setup,
    iterable_body_length,
)

VFIO = "0000:00:04.0/vfio"


def join(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


# -- VFIO sections without the device -------------------------------------------------


@pytest.mark.parametrize("body", [
    encode_setup(),
    join(encode_iterate([b"a" * 100, b"b" * 7])),
    join(encode_iterate([b"x" * 3], init_data_sent=True)),
    join(encode_complete([b"y" * 5000])),
    join(encode_complete([])),
])
def test_iterable_body_length(body: bytes) -> None:
    buf = memoryview(body + b"\x99" * 9)  # bytes after the body are not its own
    assert iterable_body_length(buf, 0, len(buf)) == len(body)
    for cut in range(len(body)):
        with pytest.raises(Incomplete):
            iterable_body_length(buf, 0, cut)


def test_config_in_an_iterable_section_is_refused() -> None:
    body = encode_config_blob(b"c" * 40)
    with pytest.raises(StreamFormatError, match="DEV_CONFIG_STATE in an iterable"):
        iterable_body_length(memoryview(body), 0, len(body))


def test_unknown_marker_is_refused() -> None:
    body = struct.pack(">Q", 0xDEADBEEF)
    with pytest.raises(StreamFormatError, match="unknown VFIO marker"):
        iterable_body_length(memoryview(body), 0, len(body))


def _section(kind: SectionType, sid: int, body: bytes) -> bytes:
    head = encode_section_header(kind, sid, VFIO, 0, 1) if kind == SectionType.SECTION_START \
        else encode_section_header(kind, sid)
    return head + body + encode_footer(sid)


def test_stream_decoder_splits_vfio_sections_without_a_handler() -> None:
    """START/PART/END of a VFIO device are split by their markers, in any read size."""
    bodies = [(SectionType.SECTION_START, encode_setup()),
              (SectionType.SECTION_PART, join(encode_iterate([b"p" * 3000]))),
              (SectionType.SECTION_PART, join(encode_iterate([b"q" * 10], init_data_sent=True))),
              (SectionType.SECTION_END, join(encode_complete([b"e" * 777])))]
    stream = encode_file_header() + encode_configuration("pc", ()) + b"".join(
        _section(k, 7, b) for k, b in bodies)
    for step in (1, 13, len(stream)):
        dec = MainStreamDecoder()
        got, start, end = [], 0, 0
        while end < len(stream):
            end = min(len(stream), end + step)
            events, start = dec.parse(stream, start, end, 0)
            got += [e for e in events if isinstance(e, DeviceSection)]
        assert [(s.header.kind, bytes(s.raw[s.body_offset:s.body_offset + s.body_length]))
                for s in got] == bodies


def test_other_iterable_devices_are_still_refused() -> None:
    stream = encode_file_header() + encode_configuration("pc", ()) + _section(
        SectionType.SECTION_START, 3, b"x").replace(VFIO.encode(), b"0000:00:04.0/blk!")
    with pytest.raises(StreamFormatError, match="splits only the iterable sections"):
        MainStreamDecoder().parse(stream, 0, len(stream), 0, final=True)


# -- the trailer --------------------------------------------------------------------


def device_packets(idstr: str, data: bytes, config: bytes, max_data: int = 1000) -> list[bytes]:
    return [join(list(p.buffers)) for p in device_state_packets(
        idstr, 0, io.BytesIO(data).read, config, max_data=max_data)]


def trailer_file(tmp_path: Path, packets: list[bytes], *, stream: bytes = b"S" * 100,
                 header: bytes | None = None) -> tuple[Path, int]:
    body = b"".join(packets)
    head = encode_trailer_header(len(packets), len(body)) if header is None else header
    path = tmp_path / "snap"
    path.write_bytes(stream + head + body + encode_trailer_footer(len(stream)))
    return path, len(stream)


def scan(path: Path, start: int):  # type: ignore[no-untyped-def]
    raw = path.read_bytes()
    return scan_trailer(lambda off, n: raw[off:off + n], start, len(raw) - FOOTER_SIZE)


def test_trailer_round_trip_and_file_source_stops_before_it(tmp_path: Path) -> None:
    a = device_packets(VFIO, os.urandom(2500), b"cfg-a")
    b = device_packets("0000:00:05.0/vfio", os.urandom(10), b"cfg-b")
    mixed = [a[0], b[0], a[2], a[1], b[1], a[3]]
    path, start = trailer_file(tmp_path, mixed)
    got = scan(path, start)
    assert [(p.idstr, p.vfio.idx, p.vfio.is_config) for p in got] == [
        (VFIO, 0, False), ("0000:00:05.0/vfio", 0, False), (VFIO, 2, False), (VFIO, 1, False),
        ("0000:00:05.0/vfio", 1, True), (VFIO, 3, True)]
    raw = path.read_bytes()
    assert raw[got[0].data_offset:got[0].data_offset + got[0].data_size] == a[0][-1000:]
    src = FileSource(str(path))
    try:
        assert src.trailer == start
        buf = bytearray(1 << 16)
        n = src.readinto(memoryview(buf))
        assert bytes(buf[:n]) == b"S" * 100  # the stream ends where the trailer begins
        assert src.readinto(memoryview(buf)) == 0
    finally:
        src.close()


def test_a_file_without_a_footer_has_no_trailer(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"x" * 50)
    src = FileSource(str(path))
    assert src.trailer is None and src.end == 50
    src.close()


def test_footer_pointing_past_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"x" * 50 + encode_trailer_footer(1 << 40))
    with pytest.raises(StreamFormatError, match="footer points at offset"):
        FileSource(str(path))


def _one(tmp_path: Path) -> list[bytes]:
    return device_packets(VFIO, b"d" * 1500, b"cfg")


@pytest.mark.parametrize(("mutate", "match", "cls"), [
    (lambda p, h: (p, b"LMDSTATX" + h[8:]), "not a device-state trailer", StreamFormatError),
    (lambda p, h: (p, h[:8] + struct.pack(">I", 2) + h[12:]), "trailer version 2",
     StreamFormatError),
    (lambda p, h: (p, h[:12] + struct.pack(">I", 1) + h[16:]), "unknown flags",
     StreamFormatError),
    (lambda p, h: (p, h[:16] + struct.pack(">Q", 1 << 60) + h[24:]), "packets in",
     LimitExceeded),
    (lambda p, h: (p, h[:24] + struct.pack(">Q", 5) + h[32:]), "lie between", StreamFormatError),
    (lambda p, h: (p, h[:16] + struct.pack(">Q", 1) + h[24:]), "bytes after the device-state",
     StreamFormatError),
    (lambda p, h: ([p[0][:8] + b"\0\0\0\0" + p[0][12:], *p[1:]], h), "DEVICE_STATE",
     StreamFormatError),
    (lambda p, h: ([p[0][:DEVICE_STATE_HEADER_SIZE] + struct.pack(">I", 9)
                    + p[0][DEVICE_STATE_HEADER_SIZE + 4:], *p[1:]], h), "unknown version",
     StreamFormatError),
    (lambda p, h: ([p[0][:DEVICE_STATE_HEADER_SIZE + 4] + b"\xff" * 4
                    + p[0][DEVICE_STATE_HEADER_SIZE + 8:], *p[1:]], h), "is invalid",
     StreamFormatError),
])
def test_hostile_trailers(tmp_path: Path, mutate, match: str,  # type: ignore[no-untyped-def]
                          cls: type[Exception]) -> None:
    packets = _one(tmp_path)
    body = b"".join(packets)
    packets, head = mutate(packets, encode_trailer_header(len(packets), len(body)))
    path, start = trailer_file(tmp_path, packets, header=head)
    with pytest.raises(cls, match=match) as e:
        scan(path, start)
    assert e.value.offset is not None and start <= e.value.offset < path.stat().st_size


def test_packet_payload_past_the_footer(tmp_path: Path) -> None:
    packets = _one(tmp_path)
    last = packets[-1]
    size = struct.unpack_from(">I", last, DEVICE_STATE_HEADER_SIZE - 4)[0]
    packets[-1] = last[:DEVICE_STATE_HEADER_SIZE - 4] + struct.pack(">I", size + 100) + \
        last[DEVICE_STATE_HEADER_SIZE:]
    path, start = trailer_file(tmp_path, packets)
    with pytest.raises(TruncatedStream, match="runs past the end"):
        scan(path, start)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_trailer(tmp_path: Path, data: st.DataObject) -> None:
    """Any damage to a trailer parses or raises livemig's own error."""
    packets = device_packets(VFIO, b"z" * 300, b"cfg", max_data=100)
    body = b"".join(packets)
    raw = bytearray(encode_trailer_header(len(packets), len(body)) + body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(TRAILER_HEADER_SIZE, len(raw)))]
    with contextlib.suppress(StreamFormatError):
        scan_trailer(lambda off, n: bytes(raw[off:off + n]), 0, len(raw))


# -- what receive keeps ---------------------------------------------------------------


def pkt(idx: int, data: bytes = b"d", *, config: bool = False) -> memoryview:
    payload = encode_config_blob(data) if config else data
    return memoryview(encode_vfio_packet_header(idx, config=config) + payload)


def recorder() -> tuple[DeviceStateRecorder, list[tuple[bytes, bytes]]]:
    kept: list[tuple[bytes, bytes]] = []
    return DeviceStateRecorder(lambda h, p: kept.append((h, bytes(p)))), kept


def test_recorder_keeps_packets_in_any_order() -> None:
    rec, kept = recorder()
    rec.on_packet(VFIO, 0, pkt(2, config=True), 1)
    rec.on_packet(VFIO, 0, pkt(1, b"bb"), 0)
    rec.on_packet(VFIO, 0, pkt(0, b"a"), 2)
    rec.finish()
    assert len(kept) == 3 and rec.devices[(VFIO, 0)].data_bytes == 3
    assert kept[1][1] == bytes(pkt(1, b"bb"))


@pytest.mark.parametrize(("plan", "match"), [
    ([(0, False), (0, False)], "duplicate idx 0"),
    ([(3, True), (4, False)], "data packet idx 4 after the config packet"),
    ([(1, False), (0, True)], "data after the config packet"),
    ([(2, True), (3, True)], "second config packet"),
])
def test_recorder_refuses_misplaced_packets(plan: list[tuple[int, bool]], match: str) -> None:
    rec, kept = recorder()
    for idx, cfg in plan[:-1]:
        rec.on_packet(VFIO, 0, pkt(idx, config=cfg), 3)
    idx, cfg = plan[-1]
    with pytest.raises(StreamFormatError, match=match) as e:
        rec.on_packet(VFIO, 0, pkt(idx, config=cfg), 3)
    assert "multifd channel 3" in str(e.value) and VFIO in str(e.value)
    assert len(kept) == len(plan) - 1


def test_recorder_refuses_a_bad_config_blob_and_short_packets() -> None:
    rec, _ = recorder()
    bad = memoryview(encode_vfio_packet_header(0, config=True) + b"not a config")
    with pytest.raises(StreamFormatError, match="config packet"):
        rec.on_packet(VFIO, 0, bad)
    with pytest.raises(StreamFormatError, match="shorter than its"):
        rec.on_packet(VFIO, 0, memoryview(b"\0" * 5))


@pytest.mark.parametrize(("plan", "match"), [
    ([(0, False), (1, False)], "no config packet arrived"),
    ([(0, False), (3, True)], r"idx 1-2 never arrived \(config packet idx 3\)"),
])
def test_recorder_finish_names_what_is_missing(plan: list[tuple[int, bool]], match: str) -> None:
    rec, _ = recorder()
    for idx, cfg in plan:
        rec.on_packet(VFIO, 0, pkt(idx, config=cfg))
    with pytest.raises(StreamFormatError, match=match):
        rec.finish()


def test_recorder_limit() -> None:
    rec = DeviceStateRecorder(lambda h, p: None, max_bytes=100)
    rec.on_packet(VFIO, 0, pkt(0, b"x" * 50))
    with pytest.raises(LimitExceeded, match="more than 100 bytes"):
        rec.on_packet(VFIO, 0, pkt(1, b"x" * 50))
