"""Tests for migration.device_state_send / device_state_recv (multifd device state)."""

from __future__ import annotations

import io
import os
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import LimitExceeded, MigrationError, StreamFormatError, TransportError
from livemig.migration.destination.device_state_reassembly import (
    DeviceStateReassembler,
    FdLoadTarget,
)
from livemig.migration.source.device_state_packets import device_state_packets
from livemig.wire.multifd import DEVICE_STATE_HEADER_SIZE, decode_device_state_header
from livemig.wire.vfio_packet import encode_vfio_packet_header
from livemig.wire.vfio_section import encode_config_blob

DEV = ("0000:00:04.0/vfio", 0)


class Target:
    def __init__(self, fail_at: int | None = None) -> None:
        self.data = bytearray()
        self.config: bytes | None = None
        self.writes = 0
        self.fail_at = fail_at
        self.order: list[str] = []

    def write_data(self, data: memoryview) -> None:
        if self.fail_at is not None and self.writes == self.fail_at:
            raise OSError(32, "Broken pipe")
        self.writes += 1
        self.data += data
        self.order.append("data")

    def load_config(self, config: memoryview) -> None:
        self.config = bytes(config)
        self.order.append("config")


def packets(data: bytes, config: bytes, max_data: int, key=DEV) -> list[tuple[int, bytes]]:
    """(idx, payload) per packet, payload = VFIO header + data, via the sender."""
    out = []
    for p in device_state_packets(key[0], key[1], io.BytesIO(data).read, config,
                                  max_data=max_data):
        hdr = decode_device_state_header(p.buffers[0])
        assert (hdr.idstr, hdr.instance_id) == key
        payload = b"".join(bytes(b) for b in p.buffers[1:])
        assert hdr.payload_size == len(payload)
        assert p.size == DEVICE_STATE_HEADER_SIZE + len(payload)
        out.append((p.idx, payload))
    return out


def pkt(idx: int, data: bytes = b"d", *, config: bool = False) -> bytes:
    return encode_vfio_packet_header(idx, config=config) + (
        encode_config_blob(data) if config else data)


def test_sender_splits_and_puts_config_last() -> None:
    ps = list(device_state_packets(*DEV, io.BytesIO(b"x" * 25).read, b"CFG", max_data=10))
    assert [(p.idx, p.is_config, len(p.buffers[2])) for p in ps] == [
        (0, False, 10), (1, False, 10), (2, False, 5), (3, True, 8 + 3 + 8)]
    empty = list(device_state_packets(*DEV, io.BytesIO(b"").read, lambda: b"C"))
    assert [(p.idx, p.is_config) for p in empty] == [(0, True)]


def test_sender_reads_a_real_fd() -> None:
    r, w = os.pipe()
    os.write(w, b"a" * 3000)
    os.close(w)
    try:
        ps = list(device_state_packets(*DEV, r, b"", max_data=1024))
    finally:
        os.close(r)
    assert sum(len(p.buffers[2]) for p in ps if not p.is_config) == 3000
    assert ps[-1].is_config


def feed(rs: DeviceStateReassembler, plan: list[list[tuple]], start_after: int | None) -> None:
    """Feed from one thread per channel; main_stream_complete after ``start_after`` packets."""
    fed = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(ch: int, items: list[tuple]) -> None:
        try:
            for key, payload in items:
                rs.on_packet(key[0], key[1], payload, ch)
                with lock:
                    fed[0] += 1
                    if start_after is not None and fed[0] == start_after:
                        rs.main_stream_complete()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(ch, items)) for ch, items in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


@given(data=st.binary(max_size=3000), data2=st.binary(max_size=500),
       max_data=st.integers(1, 700), seed=st.integers(0, 2**32 - 1),
       channels=st.integers(1, 4), start=st.sampled_from(["before", "middle", "after"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_order_any_channels_reassembles(data: bytes, data2: bytes, max_data: int,
                                            seed: int, channels: int, start: str) -> None:
    dev2 = ("0000:00:05.0/vfio", 1)
    all_packets = [(DEV, p) for _, p in packets(data, b"config-1", max_data)]
    all_packets += [(dev2, p) for _, p in packets(data2, b"config-2", max_data, dev2)]
    rnd = random.Random(seed)
    rnd.shuffle(all_packets)
    plan: list[list[tuple]] = [[] for _ in range(channels)]
    for item in all_packets:
        plan[rnd.randrange(channels)].append(item)
    t1, t2 = Target(), Target()
    rs = DeviceStateReassembler({DEV: t1, dev2: t2})
    if start == "before":
        rs.main_stream_complete()
    feed(rs, plan, len(all_packets) // 2 + 1 if start == "middle" else None)
    if start == "after":
        rs.main_stream_complete()
    rs.no_more_packets()
    stats = rs.finish(timeout=20)
    assert bytes(t1.data) == data and t1.config == b"config-1"
    assert bytes(t2.data) == data2 and t2.config == b"config-2"
    assert t1.order[-1] == "config" and t1.order.count("config") == 1
    assert stats[DEV].loaded and stats[DEV].data_bytes == len(data)
    assert rs.buffered == 0


def fails(rs: DeviceStateReassembler, payload: bytes, match: str, *, key=DEV,
          channel: int | None = 3, cls: type = StreamFormatError) -> MigrationError:
    with pytest.raises(cls, match=match) as info:
        rs.on_packet(key[0], key[1], payload, channel)
    text = str(info.value)
    if channel is not None:
        assert f"multifd channel {channel}" in text
    # poisoned: everything after fails fast with the first error
    with pytest.raises(MigrationError) as again:
        rs.on_packet(DEV[0], DEV[1], pkt(50), 0)
    assert again.value is info.value
    rs.abort()
    return info.value


def test_short_packet() -> None:
    e = fails(DeviceStateReassembler({DEV: Target()}), b"\0" * 5, "shorter than its 12-byte")
    assert "device 0000:00:04.0/vfio instance 0" in str(e)


def test_unknown_version() -> None:
    fails(DeviceStateReassembler({DEV: Target()}), b"\0\0\0\x02" + b"\0" * 8,
          "unknown version 2")


def test_invalid_idx() -> None:
    fails(DeviceStateReassembler({DEV: Target()}), b"\0" * 4 + b"\xff" * 4 + b"\0" * 4,
          "idx 0xffffffff is invalid")


def test_duplicate_idx() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(3), 1)
    e = fails(rs, pkt(3), "duplicate idx 3")
    assert "VFIO packet idx 3" in str(e)


def test_idx_already_loaded() -> None:
    t = Target()
    rs = DeviceStateReassembler({DEV: t})
    rs.main_stream_complete()
    rs.on_packet(*DEV, pkt(0, b"abc"), 0)
    deadline = time.monotonic() + 10
    while t.writes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    fails(rs, pkt(0, b"abc"), "idx 0 was already loaded")


def test_data_after_config() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(2, b"c", config=True), 0)
    fails(rs, pkt(3), "data packet idx 3 after the config packet")
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(5), 0)
    fails(rs, pkt(2, b"c", config=True), "data after the config packet")


def test_second_config_packet() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(2, b"c", config=True), 0)
    fails(rs, pkt(4, b"c", config=True), "second config packet")


def test_bad_config_blob() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    fails(rs, encode_vfio_packet_header(0, config=True) + b"\0" * 16,
          "config packet: expected DEV_CONFIG_STATE")


def test_unknown_device() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    fails(rs, pkt(0), "not a device loading its state over multifd", key=("other/vfio", 0))


def test_limit() -> None:
    """Over the bound with no device taking anything: the held channel fails."""
    rs = DeviceStateReassembler({DEV: Target()}, max_buffered=100, stall_timeout=0.2)
    rs.on_packet(*DEV, pkt(1, b"x" * 60), 0)
    t0 = time.monotonic()
    fails(rs, pkt(2, b"x" * 60), "above the limit 100, and the devices took none of it",
          cls=LimitExceeded)
    assert time.monotonic() - t0 >= 0.2


class SlowTarget(Target):
    def write_data(self, data: memoryview) -> None:
        time.sleep(0.002)
        super().write_data(data)


def test_slow_devices_hold_channels_back_within_the_bound() -> None:
    """Devices slower than the channels: memory stays at the bound, nothing fails, and
    every byte arrives in order."""
    data = os.urandom(200 * 1000)
    plan = packets(data, b"cfg", 1000)
    target = SlowTarget()
    rs = DeviceStateReassembler({DEV: target}, max_buffered=10_000, stall_timeout=5)
    rs.main_stream_complete()
    peak = [0]
    lanes = [plan[i::4] for i in range(4)]

    def channel(ch: int) -> None:
        for _, payload in lanes[ch]:
            rs.on_packet(*DEV, payload, ch)
            peak[0] = max(peak[0], rs.buffered)

    threads = [threading.Thread(target=channel, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rs.no_more_packets()
    rs.finish(30)
    assert bytes(target.data) == data and target.config == b"cfg"
    # at most the hard limit (twice the bound: a held packet is taken when no device
    # can move for 50 ms, which a starved channel thread can look like on a busy
    # machine) plus the device's next packet
    assert peak[0] <= rs.hard_limit + 1000


def test_held_channel_is_released_by_abort() -> None:
    rs = DeviceStateReassembler({DEV: Target()}, max_buffered=100, stall_timeout=30)
    rs.on_packet(*DEV, pkt(1, b"x" * 60), 0)
    err: list[BaseException] = []

    def held() -> None:
        try:
            rs.on_packet(*DEV, pkt(2, b"x" * 60), 1)
        except MigrationError as e:
            err.append(e)

    t = threading.Thread(target=held)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    rs.abort()
    t.join(5)
    assert not t.is_alive() and err


def test_missing_config_at_end() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.main_stream_complete()
    rs.on_packet(*DEV, pkt(0), 0)
    with pytest.raises(StreamFormatError, match="no config packet arrived"):
        rs.no_more_packets()
    with pytest.raises(StreamFormatError, match="no config packet arrived"):
        rs.finish(timeout=5)


def test_missing_config_timeout() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.main_stream_complete()
    rs.on_packet(*DEV, pkt(0), 0)
    t0 = time.monotonic()
    with pytest.raises(StreamFormatError, match=r"after 0\.2 s.*no config packet arrived"):
        rs.finish(timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_missing_idx() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(0), 0)
    rs.on_packet(*DEV, pkt(4, b"c", config=True), 0)
    rs.on_packet(*DEV, pkt(2), 0)
    rs.main_stream_complete()
    with pytest.raises(StreamFormatError, match=r"idx 1, 3 never arrived \(config packet idx 4"):
        rs.finish(timeout=0.2)


def test_no_switchover_start() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.on_packet(*DEV, pkt(0, b"c", config=True), 0)
    with pytest.raises(StreamFormatError, match="without SWITCHOVER_START"):
        rs.finish(timeout=1)


def test_nothing_loads_before_switchover_start() -> None:
    t = Target()
    rs = DeviceStateReassembler({DEV: t})
    rs.on_packet(*DEV, pkt(0, b"a"), 0)
    rs.on_packet(*DEV, pkt(1, b"c", config=True), 0)
    time.sleep(0.05)
    assert t.writes == 0 and rs.buffered > 0
    rs.main_stream_complete()
    rs.finish(timeout=5)
    assert bytes(t.data) == b"a" and t.config == b"c"


def test_device_write_error_reported() -> None:
    rs = DeviceStateReassembler({DEV: Target(fail_at=1)})
    rs.main_stream_complete()
    for i in range(3):
        rs.on_packet(*DEV, pkt(i), 0)
    rs.on_packet(*DEV, pkt(3, b"c", config=True), 0)
    with pytest.raises(TransportError, match="VFIO packet idx 1: loading into the device failed"):
        rs.finish(timeout=5)


def test_abort_unblocks_waiting_threads() -> None:
    rs = DeviceStateReassembler({DEV: Target()})
    rs.main_stream_complete()
    rs.on_packet(*DEV, pkt(1), 0)  # idx 0 never comes: the load thread waits
    t0 = time.monotonic()
    rs.abort()
    assert time.monotonic() - t0 < 2
    assert rs.buffered == 0
    with pytest.raises(MigrationError, match="aborted"):
        rs.on_packet(*DEV, pkt(0), 0)


def test_fd_load_target_into_a_pipe() -> None:
    r, w = os.pipe()
    got = bytearray()
    configs: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        rs = DeviceStateReassembler({DEV: FdLoadTarget(w, lambda c: configs.append(bytes(c)))})
        rs.main_stream_complete()
        data = bytes(range(256)) * 1000
        for _idx, payload in packets(data, b"cfg", 70000):
            rs.on_packet(*DEV, payload, 0)
        rs.finish(timeout=10)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == data and configs == [b"cfg"]


def test_packets_a_device_needs_behind_a_held_one() -> None:
    """The device's next packet is queued behind a held one on the same channel: the
    held packet is taken past the bound (up to twice it) and everything loads."""
    target = Target()
    rs = DeviceStateReassembler({DEV: target}, max_buffered=50, stall_timeout=5)
    rs.main_stream_complete()
    data = [bytes([i]) * 40 for i in range(3)]
    lanes = [[pkt(2, data[2]), pkt(0, data[0])],
             [pkt(3, b"cfg", config=True), pkt(1, data[1])]]
    errors: list[BaseException] = []

    def channel(ch: int) -> None:
        try:
            for payload in lanes[ch]:
                rs.on_packet(*DEV, payload, ch)
        except BaseException as e:  # noqa: BLE001 - checked below
            errors.append(e)

    # channel 1 first: its config packet fits, its next one is held behind nothing
    threads = [threading.Thread(target=channel, args=(c,)) for c in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    rs.no_more_packets()
    rs.finish(10)
    assert bytes(target.data) == b"".join(data) and target.config == b"cfg"
