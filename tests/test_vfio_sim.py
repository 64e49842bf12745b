"""Tests for livemig.vfio.sim_device (vfio-sim) and livemig.vfio.sim_format, and both
transfer paths."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import MigrationError, StateError, StreamFormatError
from livemig.migration.destination.device_state_reassembly import DeviceStateReassembler
from livemig.migration.source.device_state_packets import device_state_packets
from livemig.vfio import sim_format as fmt
from livemig.vfio.sim_device import VfioSimDevice, read_data
from livemig.vfio.state_machine import DeviceState, IllegalTransition, MigrationFlag
from livemig.wire.vfio_section import (
    VfioData,
    VfioSectionDecoder,
    encode_complete,
    encode_iterate,
)

S = DeviceState
F = MigrationFlag
MiB = 1 << 20
ALL = F.STOP_COPY | F.P2P | F.PRE_COPY


def read_to_eof(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, MiB):
        out += chunk
    return bytes(out)


def resume(dst: VfioSimDevice, stream: bytes, config: bytes) -> None:
    dst.set_state(S.STOP)
    fd = dst.set_state(S.RESUMING)
    assert fd is not None
    try:
        view = memoryview(stream)
        with contextlib.suppress(BrokenPipeError):  # the device refused the data: see below
            while view:
                view = view[os.write(fd, view):]
        dst.load_config(config)
        dst.set_state(S.RUNNING)
    finally:
        os.close(fd)


@pytest.mark.parametrize("features", [F.STOP_COPY, F.STOP_COPY | F.P2P])
def test_stop_copy_only(features: int) -> None:
    with VfioSimDevice("src", mem_size=MiB, features=features, seed=1) as src, \
            VfioSimDevice("dst", mem_size=MiB, features=features, seed=2) as dst:
        src.mutate(0.5)
        assert src.set_state(S.STOP) is None
        est = src.stop_copy_size()
        fd = src.set_state(S.STOP_COPY)
        assert fd is not None and src.state == S.STOP_COPY
        stream = read_to_eof(fd)
        os.close(fd)
        assert len(stream) == est
        src.set_state(S.STOP)
        with pytest.raises(StateError):
            src.mutate(0.1)
        assert dst.digest() != src.digest() and not dst.verified
        resume(dst, stream, src.save_config())
        assert dst.state == S.RUNNING
        assert dst.verified and dst.digest() == src.digest()
        dst.mutate(0.1)  # a running device changes; it no longer equals the source
        assert not dst.verified


def test_precopy_with_workload() -> None:
    with VfioSimDevice("src", mem_size=2 * MiB, chunk_size=64 << 10, seed=3) as src, \
            VfioSimDevice("dst", mem_size=2 * MiB, chunk_size=64 << 10, seed=4) as dst:
        with pytest.raises(StateError, match="PRECOPY_INFO"):
            src.precopy_info()
        fd = src.set_state(S.PRE_COPY)
        assert fd is not None
        initial0, dirty0 = src.precopy_info()
        assert initial0 >= 32 * (64 << 10) and dirty0 == 0
        stop = threading.Event()

        def workload() -> None:
            while not stop.is_set():
                src.mutate(0.05)
                time.sleep(0.002)

        w = threading.Thread(target=workload)
        w.start()
        stream = bytearray()
        saw_dirty = False
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                initial, dirty = src.precopy_info()
                saw_dirty |= initial == 0 and dirty > 0
                stream += read_data(fd, 256 << 10)
                if saw_dirty and len(stream) > 3 * initial0:
                    break
        finally:
            stop.set()
            w.join(10)
        assert saw_dirty
        # VM stop as QEMU does it: PRE_COPY -> PRE_COPY_P2P -> STOP_COPY, same fd
        assert src.set_state(S.PRE_COPY_P2P) is None
        assert src.set_state(S.STOP_COPY) is None
        with pytest.raises(IllegalTransition, match="blocked"):
            src.set_state(S.PRE_COPY)
        stream += read_to_eof(fd)
        os.close(fd)
        src.set_state(S.STOP)
        resume(dst, bytes(stream), src.save_config())
        assert dst.verified and dst.digest() == src.digest()


def test_precopy_temporary_end() -> None:
    with VfioSimDevice("src", mem_size=MiB, seed=5) as src:
        fd = src.set_state(S.PRE_COPY)
        assert fd is not None
        got = 0
        deadline = time.monotonic() + 10
        while src.precopy_info() != (0, 0) and time.monotonic() < deadline:
            got += len(read_data(fd, MiB))
        assert src.precopy_info() == (0, 0)
        with pytest.raises(BlockingIOError):  # the sim's ENOMSG
            os.read(fd, 100)
        assert read_data(fd, 100) == b""
        src.mutate(0.0)  # one chunk
        deadline = time.monotonic() + 10
        while src.precopy_info()[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert src.precopy_info()[0] == 0
        assert 0 < src.precopy_info()[1] <= fmt.record_size(64 << 10)
        os.close(fd)
        src.set_state(S.RUNNING)  # ends the session


def stream_of(src: VfioSimDevice) -> bytes:
    src.set_state(S.STOP)
    fd = src.set_state(S.STOP_COPY)
    assert fd is not None
    try:
        return read_to_eof(fd)
    finally:
        os.close(fd)
        src.set_state(S.STOP)


def test_corrupt_stream_fails_resume_and_writer_sees_epipe() -> None:
    with VfioSimDevice("src", mem_size=MiB, seed=6) as src, \
            VfioSimDevice("dst", mem_size=MiB, seed=7) as dst:
        stream = bytearray(stream_of(src))
        stream[100] ^= 0xFF
        dst.set_state(S.STOP)
        fd = dst.set_state(S.RESUMING)
        assert fd is not None
        def write_until_refused() -> None:
            for _ in range(100):  # the device stops reading once it sees the bad record
                os.write(fd, bytes(stream))
                time.sleep(0.01)

        with pytest.raises(BrokenPipeError):
            write_until_refused()
        os.close(fd)
        with pytest.raises(StreamFormatError, match="CRC"):
            dst.set_state(S.RUNNING)
        assert dst.state == S.ERROR
        with pytest.raises(IllegalTransition, match="ERROR"):
            dst.set_state(S.STOP)
        dst.reset()
        assert dst.state == S.RUNNING


def test_incomplete_stream_fails_resume() -> None:
    with VfioSimDevice("src", mem_size=MiB, seed=6) as src, \
            VfioSimDevice("dst", mem_size=MiB, seed=7) as dst:
        stream = stream_of(src)
        with pytest.raises(StreamFormatError, match="ended before its END record"):
            resume(dst, stream[:len(stream) // 2], src.save_config())
        assert dst.state == S.ERROR and not dst.verified


def test_other_geometry_refused() -> None:
    with VfioSimDevice("src", mem_size=MiB, seed=6) as src, \
            VfioSimDevice("dst", mem_size=2 * MiB, seed=7) as dst, \
            pytest.raises(StreamFormatError, match="1048576 bytes of memory"):
        resume(dst, stream_of(src), src.save_config())


def test_config_checks() -> None:
    with VfioSimDevice("dst", mem_size=MiB) as dst:
        with pytest.raises(StateError):
            dst.load_config(bytes(256))  # RUNNING
        dst.set_state(S.STOP)
        with pytest.raises(StreamFormatError, match="config state of 3 bytes"):
            dst.load_config(b"abc")


def test_both_transfer_paths_end_to_end() -> None:
    """Precopy through main-stream PART sections, stop-copy through shuffled multifd packets."""
    key = ("0000:00:04.0/vfio", 0)
    with VfioSimDevice("src", mem_size=4 * MiB, seed=8) as src, \
            VfioSimDevice("dst", mem_size=4 * MiB, seed=9) as dst:
        dst.set_state(S.STOP)
        dfd = dst.set_state(S.RESUMING)
        assert dfd is not None
        sfd = src.set_state(S.PRE_COPY)
        assert sfd is not None
        # precopy: a few iterations, each one PART body, decoded and written to the dst fd
        for _ in range(6):
            src.mutate(0.02)
            body = b"".join(bytes(b) for b in encode_iterate([read_data(sfd, MiB)]))
            dec = VfioSectionDecoder(where="section 0000:00:04.0/vfio")
            events, _ = dec.parse(body, final=True)
            for ev in events:
                if isinstance(ev, VfioData):
                    os.write(dfd, ev.data)
        # switchover: the END body of a multifd-transfer device is just END_OF_STATE
        assert b"".join(bytes(b) for b in encode_complete([])) == bytes.fromhex(
            "ffffffffef100001")
        src.set_state(S.STOP_COPY)
        out = list(device_state_packets(*key, sfd, src.save_config, max_data=200_000))
        os.close(sfd)
        src.set_state(S.STOP)
        random.Random(1).shuffle(out)
        rs = DeviceStateReassembler({key: dst.load_target(dfd)})
        rs.main_stream_complete()  # SWITCHOVER_START
        chans: list[list] = [out[i::3] for i in range(3)]
        threads = [threading.Thread(target=lambda c=c, n=n: [
            rs.on_packet(p.idstr, p.instance_id,
                         b"".join(bytes(b) for b in p.buffers[1:]), n) for p in c])
            for n, c in enumerate(chans)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        rs.no_more_packets()
        rs.finish(timeout=30)
        os.close(dfd)
        dst.set_state(S.RUNNING)
        assert dst.verified and dst.digest() == src.digest()


def test_cancel_unblocks_a_writer() -> None:
    with VfioSimDevice("dst", mem_size=MiB) as dst:
        dst.set_state(S.STOP)
        fd = dst.set_state(S.RESUMING)
        assert fd is not None
        target = dst.load_target(fd)
        target.cancel()
        def write_until_refused() -> None:
            for _ in range(100):
                target.write_data(memoryview(bytes(1 << 20)))

        with pytest.raises(BrokenPipeError):
            write_until_refused()
        os.close(fd)
        with pytest.raises(MigrationError, match="cancelled"):
            dst.set_state(S.STOP)


def test_sizes_checked() -> None:
    with pytest.raises(Exception, match="chunk size"):
        VfioSimDevice(mem_size=MiB, chunk_size=3000)
    with pytest.raises(Exception, match="outside"):
        VfioSimDevice(mem_size=2 << 30)


def test_sim_format_round_trip_and_checks() -> None:
    mem, chunk = 4 * 4096, 4096
    body = bytes(range(256)) * 16
    stream = (fmt.encode_header(mem, chunk)
              + b"".join(bytes(b) for b in fmt.encode_chunk(4096, body))
              + fmt.encode_end(1, b"m" * 32, b"s" * 32))
    for step in (1, 7, len(stream)):
        dec = fmt.SimStreamDecoder(mem, chunk)
        recs: list = []
        buf, base = b"", 0
        for i in range(0, len(stream), step):
            buf += stream[i:i + step]
            got, pos = dec.parse(buf, 0, len(buf), base)
            recs += [(type(r), bytes(r.data) if isinstance(r, fmt.SimChunk) else None)
                     for r in got]
            buf, base = buf[pos:], base + pos
        assert dec.complete and [t for t, _ in recs] == [fmt.SimHeader, fmt.SimChunk,
                                                          fmt.SimEnd]
        assert recs[1][1] == body
    dec = fmt.SimStreamDecoder(mem, chunk)
    with pytest.raises(StreamFormatError, match="after the END"):
        dec.parse(stream + stream[:24])
    bad = fmt.encode_header(mem, chunk) + b"".join(
        bytes(b) for b in fmt.encode_chunk(3 * 4096 + 8, b"x"))
    with pytest.raises(StreamFormatError, match="does not fit"):
        fmt.SimStreamDecoder(mem, chunk).parse(bad)
    with pytest.raises(StreamFormatError, match="before the HEADER"):
        fmt.SimStreamDecoder(mem, chunk).parse(fmt.encode_end(0, b"m" * 32, b"s" * 32))
    with pytest.raises(StreamFormatError, match="END counts 2"):
        fmt.SimStreamDecoder(mem, chunk).parse(fmt.encode_header(mem, chunk)
                                               + fmt.encode_end(2, b"m" * 32, b"s" * 32))


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_sim_format_fuzz(blob: bytes) -> None:
    prefix = fmt.encode_header(8192, 4096)
    dec = fmt.SimStreamDecoder(8192, 4096)
    with contextlib.suppress(StreamFormatError):
        dec.parse(prefix + blob)


def test_mutate_marks_dirty_chunks() -> None:
    with VfioSimDevice("d", mem_size=MiB, chunk_size=64 << 10, seed=None) as d:
        before = d.memory.copy()
        n = d.mutate(0.25, rng=np.random.default_rng(0))
        changed = np.flatnonzero((d.memory != before).reshape(16, -1).any(axis=1))
        assert n == 4 and set(changed) <= set(np.flatnonzero(d.dirty))
